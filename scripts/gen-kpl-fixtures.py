#!/usr/bin/env python3
"""Writes KPL-aggregated test records made by an independent aggregator.

The fixtures in kcl-core/tests/fixtures/kpl/ were produced with the `aws_kinesis_agg`
package (PyPI, 1.2.3), AWS's own Python implementation of the KPL aggregation format, so that
the de-aggregator is tested against bytes this project did not write. To regenerate:

    python3 -m venv /tmp/kplvenv && /tmp/kplvenv/bin/pip install aws_kinesis_agg==1.2.3 six
    /tmp/kplvenv/bin/python scripts/gen-kpl-fixtures.py

Each fixture NAME.bin is an aggregated record's data; fixtures.json lists, per fixture, the
outer partition key and explicit hash key the KPL would put the record with, and the user
records it contains (partition key, explicit hash key or null, data in base64).
"""
import base64
import json
import os

from aws_kinesis_agg.aggregator import RecordAggregator

OUT = os.path.join(os.path.dirname(__file__), "..", "kcl-core", "tests", "fixtures", "kpl")


def aggregate(records):
    agg = RecordAggregator()
    for partition_key, data, explicit_hash_key in records:
        assert agg.add_user_record(partition_key, data, explicit_hash_key) is None, "one record"
    return agg.clear_and_get()


CASES = {
    # Distinct partition keys.
    "five_keys": [(f"key-{i}", f"record {i}".encode(), None) for i in range(5)],
    # Twenty records over three keys: the key table is shared.
    "shared_keys": [(f"key-{i % 3}", f"{{\"n\": {i}}}".encode(), None) for i in range(20)],
    # Explicit hash keys, as a producer routing records to chosen shards sets them.
    "explicit_hash_keys": [
        ("a", b"low", "1"),
        ("b", b"high", str(2**128 - 2)),
        ("c", b"middle", str(2**127)),
    ],
    # Payloads that are not UTF-8, and an empty one.
    "binary_data": [("bin", bytes([0xFF, 0x00, 0xFE, i]), None) for i in range(4)] + [("empty", b"", None)],
    # One user record.
    "single": [("only", b"alone", None)],
}


def main():
    os.makedirs(OUT, exist_ok=True)
    index = {}
    for name, records in CASES.items():
        agg_record = aggregate(records)
        partition_key, explicit_hash_key, data = agg_record.get_contents()
        with open(os.path.join(OUT, f"{name}.bin"), "wb") as f:
            f.write(data)
        index[name] = {
            "outer_partition_key": partition_key,
            "outer_explicit_hash_key": explicit_hash_key,
            "records": [
                {
                    "partition_key": pk,
                    "explicit_hash_key": ehk,
                    "data_base64": base64.b64encode(d).decode(),
                }
                for pk, d, ehk in records
            ],
        }
    with open(os.path.join(OUT, "fixtures.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
