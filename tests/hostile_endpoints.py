"""Scripted HTTP endpoints for the endpoint client's tests: a real threaded `http.server` on
loopback whose answers a test writes, honest or hostile (never answering, dripping, huge,
malformed, lying, redirecting). What each connection received and what it was sent are kept,
so a test can check that nothing was sent past a refusal and that the transcript's hashes are
those of the bodies on the wire.

The honest answer is a toy model behind Open Inference Protocol v2: input `x` FP32 [-1, 4];
labels (`label`, INT64 [-1]) are the argmax of the first three features, scores (`scores`,
FP32 [-1, 3]) those three features normalised to sum to one.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

MODEL = "m"


def metadata(kind: str = "labels") -> dict[str, Any]:
    output = ({"name": "label", "datatype": "INT64", "shape": [-1]} if kind == "labels" else
              {"name": "scores", "datatype": "FP32", "shape": [-1, 3]})
    return {"name": MODEL, "versions": ["1"], "platform": "toy",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": [output]}


def honest_answers(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "labels":
        return x[:, :3].argmax(axis=1).astype(np.int64)
    scores = np.abs(x[:, :3]).astype(np.float32) + np.float32(1e-3)
    return scores / scores.sum(axis=1, keepdims=True)


def infer_reply(request: dict[str, Any], answers: np.ndarray, kind: str) -> dict[str, Any]:
    name, datatype = ("label", "INT64") if kind == "labels" else ("scores", "FP32")
    return {"model_name": MODEL, "model_version": "1", "id": request.get("id"),
            "outputs": [{"name": name, "datatype": datatype, "shape": list(answers.shape),
                         "data": answers.reshape(-1).tolist()}]}


def request_inputs(request: dict[str, Any]) -> np.ndarray:
    tensor = request["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


@dataclass
class Seen:
    """One request as the server received it, and the body it answered with (b"" if none)."""

    method: str
    path: str
    body: bytes
    answered: bytes = b""


class Handler(BaseHTTPRequestHandler):
    """Hands each request to the server's script; the script writes the whole answer."""

    protocol_version = "HTTP/1.1"
    server: EndpointServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        seen = Seen(self.command, self.path, self.rfile.read(length))
        with self.server.lock:
            self.server.seen.append(seen)
        self.server.script(self, seen)

    do_GET = do_POST = _handle

    def send_json(self, seen: Seen, obj: Any, status: int = 200) -> None:
        self.send_body(seen, json.dumps(obj).encode(), status)

    def send_body(self, seen: Seen, body: bytes, status: int = 200,
                  headers: dict[str, str] | None = None) -> None:
        seen.answered = body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


Script = Callable[[Handler, Seen], None]


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set on exit: scripts that stall wake up and return
        self.bytes_sent = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is what several scripts provoke (the key server
        stops reading an answer it has refused): not this server's error, and no traceback
        in the suite's output."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def infers(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]


def honest(kind: str = "labels", *, answers: Callable[[np.ndarray], np.ndarray] | None = None,
           meta: dict[str, Any] | None = None) -> Script:
    """An honest endpoint (or one whose infer answers `answers` computes instead)."""

    def script(handler: Handler, seen: Seen) -> None:
        if seen.method == "GET":
            handler.send_json(seen, meta or metadata(kind))
            return
        request = json.loads(seen.body)
        x = request_inputs(request)
        got = answers(x) if answers is not None else honest_answers(x, kind)
        handler.send_json(seen, infer_reply(request, got, kind))

    return script


@contextmanager
def endpoint(script: Script) -> Iterator[EndpointServer]:
    server = EndpointServer(script)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Resolver:
    """A scripted DNS: answers[i] for the i-th lookup (the last one repeated), counted."""

    answers: list[list[str]]
    calls: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        addresses = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        return [(2, 1, 6, "", (address, port)) for address in addresses]
