"""What the encrypted disk spool costs an upload, against one kept in memory.

    PYTHONPATH=client:keyserver:lab .venv/bin/python bench/spool.py [--sizes 64,256,1024] [--json out/bench_spool.json]

In process, no network: `rpc.uploads.spooled` is fed the client's 1 MiB chunks of random
bytes, once with a memory budget that holds the upload (the floor: hashed into a sealed
memory file as it arrives) and once with none (`--spool-memory-bytes 0`: hashed and sealed
segment by segment into the disk spool as it arrives, then decrypted into a sealed memory
file once it checks out). The spool directory is in the temporary directory, on its disk.
Columns: seconds to receive (hash, and write or seal), seconds to read back (decrypt; the
floor has none), their sum as a ratio of the floor's, and the receive rate; medians of
`--repeats`. A minute or two on two shared cores for the default sizes, and twice the
largest size free in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _table import print_table, write_json

from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.rpc.uploads import Spool, spooled

MiB = 1 << 20
CHUNK = MiB  # freemark.rpc.DEFAULT_CHUNK_SIZE


def _once(data: bytes, directory: Path, memory_bytes: int) -> tuple[float, float]:
    """(receive seconds, read-back seconds) of one upload of `data`."""
    spool = Spool(directory, quota_bytes=len(data), memory_bytes=memory_bytes)
    header = pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                             format=pb.MODEL_FORMAT_PT2)
    received: list[float] = []

    def chunks() -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            yield bytes(view[start:start + CHUNK])  # a fresh message, as gRPC hands it over
        received.append(time.perf_counter())  # every byte written (or sealed) by now

    started = time.perf_counter()
    with spooled(chunks(), header, cap=len(data), spool=spool, principal="bench",
                 suffix=".pt2") as path:
        ready = time.perf_counter()
        assert path.stat().st_size == len(data)
    return received[0] - started, ready - received[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="upload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            data = os.urandom(size * MiB)
            figures = {}
            for name, budget in (("memory (floor)", len(data)), ("encrypted disk spool", 0)):
                runs = [_once(data, Path(folder) / "spool", budget) for _ in range(args.repeats)]
                figures[name] = (statistics.median(r[0] for r in runs),
                                 statistics.median(r[1] for r in runs))
            floor = sum(figures["memory (floor)"])
            for name, (receive, back) in figures.items():
                rows.append([size, name, round(receive, 3), round(back, 3),
                             round((receive + back) / floor, 2),
                             round(size * MiB / receive / 1e9, 2)])
                print(rows[-1], file=sys.stderr, flush=True)
            del data
    print_table("an upload through the spool, in process (medians)",
                ["MiB", "where", "receive s", "read back s", "x floor", "receive GB/s"], rows)
    if args.json:
        write_json(args.json, {"spool": [
            dict(zip(("mib", "where", "receive_s", "read_back_s", "ratio", "receive_gb_s"), row,
                     strict=True)) for row in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
