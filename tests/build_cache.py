"""Models the tests train, built once per recipe and shared by every pytest worker and run.

The suite's xdist workers each import the fixtures afresh, so an in-process cache trains the
same model once per worker; the modules that use it land on different workers. A model is
built into a scratch folder under a file lock and renamed into place, so a worker that waits
on the lock finds the finished folder, and an interrupted build leaves nothing a later run
would trust. The folder's name carries a digest of everything that built it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
LAB = ROOT / "lab" / "freemark_lab"


def digest(value: Any) -> str:
    """A short digest of a JSON-serialisable description of what built a model."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def source_digest(*paths: Path) -> str:
    """A digest of source files, so that a cached model is rebuilt when its recipe's code changes."""
    return digest([path.read_text(encoding="utf-8") for path in paths])


def lab_training_code() -> str:
    """What a model trained by the lab depends on besides its recipe: the lab's data, models
    and training code (and the fine-tune attack, which trains further)."""
    return source_digest(*(LAB / name for name in (
        "data.py", "models.py", "tasks.py", "train.py", "attacks/finetune.py")))


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cached(root: Path, name: str, parts: Any, build: Callable[[Path], None]) -> Path:
    """`root/name-DIGEST(parts)`, built by `build(folder)` once between all workers."""
    folder = root / f"{name}-{digest(parts)}"
    with _locked(root, name):
        if not folder.is_dir():
            scratch = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            build(scratch)
            scratch.rename(folder)
    return folder


def cached_module(name: str, parts: Any, make: Callable[[], nn.Module],
                  fresh: Callable[[], nn.Module]) -> nn.Module:
    """`make()`'s trained model, built once between all workers: its weights are saved as
    safetensors and loaded into `fresh()`, an untrained model of the same architecture."""
    def build(folder: Path) -> None:
        save_file(make().state_dict(), folder / "model.safetensors")

    folder = cached(CACHE / "test-models", name, parts, build)
    model = fresh()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()
