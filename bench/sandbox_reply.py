"""What a sandbox reply costs the key server's memory, per reply size (issue 18, item 8).

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/sandbox_reply.py [--json out/bench_sandbox_reply.json]

(tests/ on the path: the bench reuses the tests' digits host, `ttp_fixtures.build_models`, the
wide suspect and the peak measurement.) One in-process key server (SQLite, the real warm pool,
two workers) with a registered digits host; for each reply size, Verify of a suspect whose key
layer answers that many bytes of float32 activations on the host's 100 triggers (its input
repeated: little work in the child), alone and two at once. The figure is the rise of the
server process's peak resident set during the calls (the kernel's high-water mark, reset
before them), as a multiple of the reply size: what `docs/operations.md` budgets per worker.
About 2 minutes on two shared cores, and up to 4 GiB free memory (two children).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

from _table import print_table, write_json

from freemark.derive import derive_key
from freemark.errors import FreemarkError
from freemark.formats.pt2 import load_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.triggers import load_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import Rate, ServerConfig
from freemark_keyserver.server import create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import build_models, resident_peak, wide_suspect

MiB = 1 << 20
SIZES_MIB = (32, 128, 256)
TRIGGERS = 100  # the digits host's trigger set: 10 per class


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-reply-") as folder:
        rows = _measure(Path(folder))
    print_table("server peak RSS rise per sandbox reply (Verify, 2 workers)",
                ["reply MiB", "calls at once", "peak rise MiB", "x reply per call"], rows)
    if args.json:
        write_json(args.json, {"reply_memory": [
            dict(zip(("reply_mib", "concurrent", "peak_rise_mib", "ratio"), row, strict=True))
            for row in rows]})
    return 0


def _measure(folder: Path) -> list[list[object]]:
    files = build_models(folder)
    running = create_server(ServerConfig(
        data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1, sandbox_workers=2,
        verify_rate_principal=Rate.parse("off"), verify_rate_registration=Rate.parse("off")))
    try:
        token = new_token()
        running.ctx.store.add_principal(Principal("owner", "owner", hash_token(token), 0))
        target = f"127.0.0.1:{running.port}"
        with KeyServiceClient(target, token=token, timeout=600) as client:
            registration = client.register(derive_key(
                load_program(files.host), layer="act", owner="owner",
                triggers=load_triggers(files.triggers)), files.host).registration_id
        rows: list[list[object]] = []
        for size in SIZES_MIB:
            suspect = wide_suspect(folder / f"wide-{size}.pt2", size * MiB, rows=TRIGGERS)
            for concurrent in (1, 2):
                with resident_peak() as rise:
                    _verify_at_once(target, token, registration, suspect, concurrent)
                rows.append([size, concurrent, round(rise() / MiB),
                             round(rise() / (size * MiB * concurrent), 2)])
                print(rows[-1], file=sys.stderr, flush=True)
        return rows
    finally:
        running.stop(grace=1)


def _verify_at_once(target: str, token: str, registration: str, suspect: Path,
                    concurrent: int) -> None:
    """`concurrent` Verify calls of `suspect` at once; each is refused (the key layer is not
    the key's width) only after its reply was decoded, which is what is measured."""
    def call() -> None:
        with KeyServiceClient(target, token=token, timeout=600) as client:
            try:
                client.verify(registration, suspect)
            except FreemarkError:
                pass
    threads = [threading.Thread(target=call) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
