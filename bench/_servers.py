"""Server processes for bench/keyserver.py: the bare gRPC floor, and a key server whose sandbox
replays recorded answers.

    python bench/_servers.py floor
    python bench/_servers.py replay --replay TABLE.npz --data-dir D --db DB \\
        --master-key-file K --signing-key-file S

Each prints ``listening on 127.0.0.1:PORT`` once it serves, then runs until SIGTERM.

floor: a unary echo and a client-streaming sink on raw bytes (no protobuf, no auth, no
storage), on a server built with the key server's thread pool and limits: what any gRPC
service in Python costs on this machine, the floor the key server is compared with.

replay: the real key server (`create_server`, same servicer, store, crypto and log), except
that the sandbox answers from a table of results recorded ahead of time (keyed by the model
file's SHA-256) instead of starting a worker that imports torch. It isolates what the TTP's own
work costs (auth, upload, judging, sealing, storing, logging, signing) from the 2-3 s of CPU
a sandbox run costs.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from freemark.errors import ModelFileError
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.config import DEFAULT_MAX_CONCURRENT_RPCS, UNLIMITED, ServerConfig
from freemark_keyserver.sandbox.runner import ModelIdentity, SandboxResult
from freemark_keyserver.server import create_server

FLOOR_SERVICE = "bench.Floor"
MAX_MESSAGE = 16 * 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_replay_table(path: Path, results: dict[str, SandboxResult]) -> None:
    """Write recorded sandbox answers, keyed by model SHA-256, for `replay`."""
    arrays: dict[str, np.ndarray] = {}
    for sha, result in results.items():
        arrays[f"{sha}.activations"] = result.activations
        arrays[f"{sha}.identity"] = np.frombuffer(result.identity.to_bytes(), dtype=np.uint8)
    np.savez(path, allow_pickle=False, **arrays)


class ReplaySandbox:
    """`sandbox.run_model`'s signature, answering from a recorded table."""

    def __init__(self, table: Path) -> None:
        with np.load(table, allow_pickle=False) as data:
            self._results = {
                name.removesuffix(".activations"): SandboxResult(data[name], ModelIdentity.from_bytes(
                    data[name.replace(".activations", ".identity")].tobytes()))
                for name in data.files if name.endswith(".activations")
            }

    def __call__(self, model_path: Path, *, layer: str, pooling: int, triggers: TriggerSet,
                 weights_path: Path | None = None, **_limits: Any) -> SandboxResult:
        try:
            return self._results[file_sha256(Path(model_path))]
        except KeyError:
            raise ModelFileError("this model was not recorded for the replay sandbox") from None


    def batch(self, model_path: Path, runs: Sequence[Any], *, then: Any = None,
              **_options: Any) -> tuple[ModelIdentity, list[Any]]:
        """`sandbox.run_batch`'s signature: Register's own run answers from the table; the
        prior-claim runs it asks for next (`then`) were not recorded, and each answers as a
        failed run, which Register treats as no claim."""
        result = self(model_path, layer="", pooling=0, triggers=None)  # type: ignore[arg-type]
        identity = result.identity
        answers: list[Any] = [result.activations] * len(runs)
        missing = ModelFileError("prior-claim runs are not recorded for the replay sandbox")
        while then is not None and (more := list(then(identity, answers))):
            answers = answers + [missing] * len(more)
        return identity, answers


def _sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    received = sum(len(chunk) for chunk in requests)
    return received.to_bytes(8, "big")


def serve_floor() -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=DEFAULT_MAX_CONCURRENT_RPCS),
        maximum_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    handlers = grpc.method_handlers_generic_handler(FLOOR_SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Sink": grpc.stream_unary_rpc_method_handler(_sink),
    })
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    return server


def serve_replay(args: argparse.Namespace) -> Any:
    config = ServerConfig(data_dir=Path(args.data_dir), db=args.db, listen="127.0.0.1:0",
                          master_key_file=Path(args.master_key_file),
                          signing_key_file=Path(args.signing_key_file), grace_seconds=5,
                          # the benchmark measures the server, not its per-principal limits
                          verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED,
                          register_rate_principal=UNLIMITED,
                          max_calls_per_principal=DEFAULT_MAX_CONCURRENT_RPCS)
    running = create_server(config)
    replay = ReplaySandbox(Path(args.replay))
    running.ctx.sandbox, running.ctx.batch = replay, replay.batch
    print(f"listening on 127.0.0.1:{running.port}", flush=True)
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("floor")
    replay = sub.add_parser("replay")
    for option in ("--replay", "--data-dir", "--db", "--master-key-file", "--signing-key-file"):
        replay.add_argument(option, required=True)
    args = parser.parse_args(argv)
    running = serve_floor() if args.kind == "floor" else serve_replay(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    running.stop(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
