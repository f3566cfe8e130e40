"""Real Open Inference Protocol v2 servers for the tests: MLServer, started as a process.

MLServer pins protobuf 6 and the project's venv has protobuf 7, so it runs from its own
virtualenv (`make oip` builds `.venv-oip`; FREEMARK_OIP_VENV names another) and never shares
an interpreter with the tests. A server serves several models at once from one folder (one
server per test module keeps start-up cheap): each an ONNX export of a real model, run by the
small runtime in tests/assets/oip (onnxruntime; scores or labels only; optionally behind
Gaussian noise, 16-level quantisation or a 3x3 median filter). `serve()` waits for every
model to be ready (`/v2/models/{m}/ready`) and tears the process down on exit.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets" / "oip"
OIP_VENV = Path(os.environ.get("FREEMARK_OIP_VENV", REPO / ".venv-oip"))
READY_TIMEOUT_S = 180.0  # MLServer imports a lot; under a loaded CI machine it is slow


@dataclass(frozen=True)
class ServedModel:
    """One model of a server: an ONNX file and how the runtime answers with it."""

    name: str
    onnx: Path
    input_shape: tuple[int, ...]  # without the batch dimension
    classes: int
    answer: Literal["scores", "labels"] = "scores"
    preprocess: Literal["noise", "quantise", "median"] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # low, high, sigma, levels

    def settings(self) -> dict[str, Any]:
        output = ({"name": "label", "datatype": "INT64", "shape": [-1]} if self.answer == "labels"
                  else {"name": "scores", "datatype": "FP32", "shape": [-1, self.classes]})
        extra = {"answer": self.answer, **self.extra}
        if self.preprocess:
            extra["preprocess"] = self.preprocess
        return {
            "name": self.name,
            "implementation": "freemark_oip_runtime.OnnxClassifier",
            "parameters": {"uri": "./model.onnx", "version": "1", "extra": extra},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *self.input_shape]}],
            "outputs": [output],
        }


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> Path:
    """torch.onnx.export (TorchScript exporter) with a dynamic batch axis, input named x."""
    model = model.eval()
    torch.onnx.export(model, (torch.zeros(2, *input_shape),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@dataclass(frozen=True)
class OipServer:
    """A running MLServer: its base URL and the models it serves."""

    url: str
    port: int
    models: tuple[ServedModel, ...]
    started_in_s: float


@contextmanager
def serve(models: list[ServedModel], root: Path) -> Iterator[OipServer]:
    """Start `mlserver start ROOT` on free loopback ports, serving `models`; stop it on exit."""
    mlserver = OIP_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        raise RuntimeError(f"no MLServer at {mlserver}: run `make oip` (it builds {OIP_VENV.name} "
                           "from tests/assets/oip/requirements.txt)")
    root.mkdir(parents=True, exist_ok=True)
    for module in ("freemark_oip_runtime.py", "freemark_oip_preprocess.py"):
        shutil.copy(ASSETS / module, root / module)
    for model in models:
        folder = root / model.name
        folder.mkdir()
        shutil.copy(model.onnx, folder / "model.onnx")
        (folder / "model-settings.json").write_text(json.dumps(model.settings()))
    port = _free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": _free_port(),
        "metrics_endpoint": None, "parallel_workers": 0, "debug": False,
        "load_models_at_startup": True}))
    # A clean environment: the project's PYTHONPATH must not reach MLServer's interpreter.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "OMP_NUM_THREADS": "1"}
    log = (root / "mlserver.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen([str(mlserver), "start", str(root)], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(process, port, [m.name for m in models], root / "mlserver.log")
        yield OipServer(f"http://127.0.0.1:{port}", port, tuple(models),
                        time.monotonic() - started)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _wait_ready(process: subprocess.Popen[bytes], port: int, names: list[str], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in names)]
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"mlserver exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlserver not ready after {READY_TIMEOUT_S:g} s:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if _get(port, pending[0]) == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.25)
