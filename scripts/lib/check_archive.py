#!/usr/bin/env python3
"""Checks an archive written by kcl-archive against the access log scripts/lib/access_log.py wrote.

    check_archive.py LINES_WRITTEN ARCHIVE_JSONL

ARCHIVE_JSONL is the output of `kcl-archive read`: one JSON object per stored object, with its
key, size, stream, shard, first sequence number and its lines. Prints lines written, archived,
missing and archived twice, the objects per hourly prefix with their sizes, and whether order
was kept per shard and per key (client) across the split; exits 1 unless nothing is missing,
nothing is twice and order is kept.

Order in an archive: a shard's lines are read object by object in sequence-number order. The
agent ships lines in file order with one call in flight, so per shard the lines' numbers `n`
must grow. Per key, the lines of one client move from a parent shard to a child at the split:
within each shard its `client_seq` must grow, and the shards' ranges must not interleave (the
parent's lines all come before the child's).
"""

import json
import sys
from collections import defaultdict

MARKER = "#kcl-base64:"


def main():
    written = int(sys.argv[1])
    objects = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]

    seen = defaultdict(int)
    undecodable = 0
    by_shard = defaultdict(list)
    for obj in objects:
        by_shard[obj["shard_id"]].append(obj)
    shard_order = True
    per_key = defaultdict(lambda: defaultdict(list))
    for shard, objs in by_shard.items():
        objs.sort(key=lambda o: (int(o["sequence_number"]), int(o["sub_sequence_number"])))
        last_n = -1
        for obj in objs:
            for text in obj["lines"]:
                if text.startswith(MARKER):
                    undecodable += 1
                    continue
                record = json.loads(text)
                n = record["n"]
                seen[n] += 1
                if n <= last_n:
                    shard_order = False
                last_n = n
                per_key[record["remote_addr"]][shard].append(record["client_seq"])

    key_order = True
    for shards in per_key.values():
        ranges = []
        for seqs in shards.values():
            if any(b <= a for a, b in zip(seqs, seqs[1:])):
                key_order = False
            ranges.append((seqs[0], seqs[-1]))
        ranges.sort()
        if any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:])):
            key_order = False

    missing = sum(1 for n in range(written) if seen.get(n, 0) == 0)
    twice = sum(1 for count in seen.values() if count > 1)
    archived = sum(seen.values())

    prefixes = defaultdict(lambda: [0, 0])
    for obj in objects:
        prefix = obj["key"].rsplit("/", 1)[0] + "/"
        prefixes[prefix][0] += 1
        prefixes[prefix][1] += obj["size"]
    print(f"   objects:              {len(objects)} from {len(by_shard)} shards")
    for prefix, (count, size) in sorted(prefixes.items()):
        print(f"     {prefix:<40} {count:>4} objects {size:>10,} bytes gzipped")
    for obj in sorted(objects, key=lambda o: o["key"])[:3]:
        print(f"     e.g. {obj['key']} ({obj['size']:,} bytes, {len(obj['lines'])} lines)")
    print(f"   lines written:        {written}")
    print(f"   lines archived:       {archived}")
    print(f"   lines missing:        {missing}")
    print(f"   lines archived twice: {twice}")
    print(f"   not JSON (base64):    {undecodable}")
    print(f"   order per shard:      {'kept' if shard_order else 'BROKEN'}")
    print(f"   order per key:        {'kept across the split' if key_order else 'BROKEN'}")
    ok = not missing and not twice and not undecodable and shard_order and key_order
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
