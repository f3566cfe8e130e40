"""Real models on disk and a real key server process, shared by the key server's integration tests."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from build_cache import cached_module, lab_training_code
from freemark.formats.pt2 import save_program
from freemark.scheme.triggers import save_triggers, select_triggers
from freemark_lab import data, models, train

SERVER_START_SECONDS = 60.0


@dataclass(frozen=True)
class ModelFiles:
    """A digits host and its relatives, exported as .pt2 programs."""

    host: Path
    finetuned: Path
    independent: Path
    triggers: Path
    host_state: dict[str, torch.Tensor]


def build_models(folder: Path) -> ModelFiles:
    """A digits host, a fine-tuned copy and an independent model (trained once between all
    workers, `build_cache`), exported as programs into `folder`."""
    ds = data.digits()
    code = lab_training_code()
    host = cached_module("ttp-host", {"seed": 1, "epochs": 15, "code": code}, lambda: train.trained(
        models.DigitsCNN, ds.x_train, ds.y_train, epochs=15, seed=1), models.DigitsCNN)
    stolen = cached_module("ttp-finetuned", {"of": "ttp-host", "seed": 7, "epochs": 5, "code": code},
                           lambda: train.train(copy.deepcopy(host), ds.x_train, ds.y_train,
                                               epochs=5, seed=7), models.DigitsCNN)
    other = cached_module("ttp-independent", {"seed": 2, "epochs": 15, "code": code},
                          lambda: train.trained(models.DigitsCNN, ds.x_train, ds.y_train,
                                                epochs=15, seed=2), models.DigitsCNN)
    example = (torch.zeros(2, 1, 8, 8),)
    paths = {name: folder / f"{name}.pt2" for name in ("host", "finetuned", "independent")}
    for name, model in (("host", host), ("finetuned", stolen), ("independent", other)):
        save_program(model, example, paths[name])
    triggers = folder / "triggers.npz"
    save_triggers(triggers, select_triggers(ds.x_train, ds.y_train, per_class=10, seed=0))
    return ModelFiles(paths["host"], paths["finetuned"], paths["independent"], triggers,
                      {k: v.clone() for k, v in host.state_dict().items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: the source roots importable, nothing secret."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMARK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "client"), str(root / "keyserver"), str(root / "lab")])
    env.update(extra)
    return env


def run_cli(module: str, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m freemark.cli` or `freemark_keyserver.cli` like a user would."""
    result = subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True,
                            text=True,
                            env=env or cli_env(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({result.returncode}): {result.stderr}")
    return result


def json_out(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line, got: {result.stdout!r}"
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


class ServerProcess:
    """`freemark-keyserver serve` in a child process on a free loopback port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.extra = extra
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "freemark_keyserver.cli", "serve", "--data-dir",
             str(self.data_dir), "--listen", self.address, *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.process.stderr.read() if self.process.stderr else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        raise AssertionError("server did not start")

    def stop(self) -> str:
        """SIGTERM and wait; returns the server's stderr (its log)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        return err


def secret_fragments(array: np.ndarray, length: int = 64) -> list[bytes]:
    """Byte strings that would betray `array` if found in a file: a few slices of its bytes."""
    raw = np.ascontiguousarray(array).tobytes()
    step = max(1, len(raw) // 4)
    return [raw[i:i + length] for i in range(0, len(raw) - length, step)][:4]


class _Wide(torch.nn.Module):
    """The digits interface (1x8x8 in) with an `act` layer `copies` x 64 units wide: the
    input's 64 values repeated, no weights, so the file is small and the run quick."""

    def __init__(self, copies: int) -> None:
        super().__init__()
        self.copies = copies
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x.flatten(1).repeat(1, self.copies))


def wide_suspect(path: Path, reply_bytes: int, rows: int) -> Path:
    """A `.pt2` whose `act` layer answers about `reply_bytes` of float32 activations on
    `rows` inputs: what a large sandbox reply costs the server, with little work in the child."""
    save_program(_Wide(max(1, reply_bytes // (4 * 64 * rows))).eval(),
                 (torch.zeros(2, 1, 8, 8),), path)
    return path


def _resident() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status
                if line.startswith(("VmRSS:", "VmHWM:"))}


@contextlib.contextmanager
def resident_peak() -> Iterator[Callable[[], int]]:
    """How many bytes this process's resident set rose above its size on entry, at its
    highest inside the block (the kernel's high-water mark, reset on entry by writing 5 to
    /proc/self/clear_refs); call the yielded function after the block."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    start = _resident()["VmRSS"]
    peak: list[int] = []
    yield lambda: peak[0]
    peak.append(_resident()["VmHWM"] - start)
