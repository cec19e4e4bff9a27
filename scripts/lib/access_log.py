#!/usr/bin/env python3
"""Writes a growing web access log, one JSON object per line (nginx's `escape=json` style).

Used by the demo (scripts/demo), the pipeline test and the bench. Each line carries what a
check needs to find every line again in the archive:
  n           the line's number in the whole log (0, 1, 2, ...), across rotations;
  remote_addr the client, the partition key the agent takes (`--partition-key field:remote_addr`);
  client_seq  the line's number among its client's lines, to check order per key.

    access_log.py PATH --lines N [--rate LINES_PER_S] [--rotate-at LINE] [--clients C] [--seed S]

With --rotate-at, the log is rotated by rename once that many lines were written, as logrotate
does: PATH becomes PATH.1 and a new PATH is created. When done, prints the number of lines.
"""

import argparse
import json
import os
import random
import sys
import time
import uuid
from datetime import datetime, timezone

PATHS = ["/", "/index.html", "/api/orders", "/api/orders/{id}", "/api/cart", "/static/app.js",
         "/static/site.css", "/login", "/search?q={q}", "/api/users/{id}"]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Safari/605.1.15",
          "curl/8.5.0", "kube-probe/1.31", "python-requests/2.32.3"]
WORDS = ["shoes", "laptop", "coffee", "books", "garden", "camera"]
# Lines between two flushes of the file: a tailing reader sees the log grow in small steps.
FLUSH_EVERY = 20


def line(n, client, client_seq, rng):
    path = rng.choice(PATHS).format(id=rng.randint(1, 99999), q=rng.choice(WORDS))
    method = "POST" if path.startswith("/api/") and rng.random() < 0.2 else "GET"
    status = rng.choices([200, 201, 304, 404, 500], weights=[80, 5, 8, 6, 1])[0]
    return json.dumps({
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "remote_addr": client,
        "method": method,
        "path": path,
        "status": status,
        "bytes": rng.randint(200, 60000),
        "duration_ms": rng.randint(1, 900),
        "user_agent": rng.choice(AGENTS),
        "request_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "n": n,
        "client_seq": client_seq,
    }, separators=(",", ":"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0, help="lines per second (0: at once)")
    parser.add_argument("--rotate-at", type=int, default=None)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    clients = [f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
               for _ in range(args.clients)]
    seqs = {}
    out = open(args.path, "a", encoding="utf-8")
    start = time.monotonic()
    for n in range(args.lines):
        if args.rotate_at is not None and n == args.rotate_at:
            out.close()
            os.rename(args.path, args.path + ".1")
            out = open(args.path, "a", encoding="utf-8")
        client = rng.choice(clients)
        seqs[client] = seqs.get(client, -1) + 1
        out.write(line(n, client, seqs[client], rng) + "\n")
        if n % FLUSH_EVERY == FLUSH_EVERY - 1:
            out.flush()
        if args.rate > 0:
            ahead = start + (n + 1) / args.rate - time.monotonic()
            if ahead > 0:
                out.flush()
                time.sleep(ahead)
    out.close()
    print(args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
