"""Every model format freemark reads, in one table: adding a format is one module plus one row.

A row says what a format is called on the command line and in sandbox options (`name`), on
the wire (`wire`, a `freemark.v1.ModelFormat`), which suffix its upload is spooled under,
whether it may be registered as a host or only judged as a suspect, and which module opens
it. Each format's module (`module`) answers `is_format(path)` for a local path, and opens a
file of its kind that nobody vetted: the caps, the vetting and the safe loader live there,
beside each other (`pt2` with `pt2_vetting`, `huggingface`, `onnx`, `weights`).

The client (`format_of`, the upload's wire format, the host check), the key server (which
formats Register and Verify admit, the spool suffix) and the sandbox child (which loader
reads an upload) all read this table; nothing else spells a format. It imports neither torch
nor a format's module: a module is imported only when a path is asked about or opened.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from freemark.errors import InvalidInputError
from freemark.v1 import keyservice_pb2 as pb

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FORMATS", "HOSTS", "SUSPECTS", "ModelFormat", "by_name", "by_wire", "format_of",
           "load_model", "names", "upload_file"]


@dataclass(frozen=True)
class ModelFormat:
    """One model format: its names, where it may be used, and the module that opens it."""

    name: str  # on the command line, in sandbox options and in messages
    wire: int  # freemark.v1.ModelFormat
    suffix: str  # the suffix a spooled upload of this format carries
    host: bool  # may be registered as a host
    suspect: bool  # may be judged in a Verify
    module: str  # the module with is_format(path) and the safe loader
    what: str  # a person's description, for error messages

    def opener(self) -> ModuleType:
        """The format's module (imported on first use: it may import torch or onnx)."""
        return importlib.import_module(self.module)


# Detection order: the first row whose module claims a path wins (a packed checkpoint is a
# .safetensors file too, so `hf` comes before bare `safetensors` weights).
FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat("hf", pb.MODEL_FORMAT_HF_CHECKPOINT, ".safetensors", host=True, suspect=True,
                module="freemark.formats.huggingface",
                what="a Hugging Face checkpoint (a directory with config.json, or one packed "
                     ".safetensors)"),
    ModelFormat("pt2", pb.MODEL_FORMAT_PT2, ".pt2", host=True, suspect=True,
                module="freemark.formats.pt2", what="a torch.export program (.pt2)"),
    ModelFormat("safetensors", pb.MODEL_FORMAT_SAFETENSORS, ".safetensors", host=False,
                suspect=True, module="freemark.formats.weights",
                what=".safetensors weights for the registered host's architecture"),
    ModelFormat("onnx", pb.MODEL_FORMAT_ONNX, ".onnx", host=False, suspect=True,
                module="freemark.formats.onnx", what="an ONNX model (.onnx)"),
)
HOSTS: tuple[ModelFormat, ...] = tuple(f for f in FORMATS if f.host)
SUSPECTS: tuple[ModelFormat, ...] = tuple(f for f in FORMATS if f.suspect)
_BY_NAME = {f.name: f for f in FORMATS}
_BY_WIRE = {f.wire: f for f in FORMATS}


def names(formats: tuple[ModelFormat, ...] = FORMATS) -> str:
    """The formats as a person reads them in a refusal: 'a, b or c'."""
    whats = [f.what for f in formats]
    return whats[0] if len(whats) == 1 else ", ".join(whats[:-1]) + " or " + whats[-1]


def by_name(name: str) -> ModelFormat:
    """The row of a format's command-line name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidInputError(f"unknown model format {name!r}; one of: "
                                f"{', '.join(_BY_NAME)}") from None


def by_wire(value: int) -> ModelFormat | None:
    """The row of a wire `ModelFormat`, or None for one this version does not know."""
    return _BY_WIRE.get(value)


# --- Until main's version of this file lands (layout-server branch only) -------------------
# main's table detects a format through each module's `is_format` and moves the loading
# helpers elsewhere; this branch has neither, so the helpers the library still calls here
# (`freemark.cli.app`, `freemark.rpc`) stay as they were, with their imports made lazy.


def format_of(path: str | Path) -> str:
    """The format of `path`: from being a checkpoint directory, else from its suffix (and, for
    `.safetensors`, whether it carries a packed config)."""
    from freemark.formats import huggingface

    path = Path(path)
    if path.is_dir():
        if not huggingface.is_checkpoint_dir(path):
            raise InvalidInputError(f"{path}: a model directory needs a config.json "
                                    "(a Hugging Face checkpoint)")
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return "pt2"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "hf" if huggingface.is_packed(path) else "safetensors"
    raise InvalidInputError(f"{path}: cannot tell the model format; give a .pt2 program, a "
                            "Hugging Face checkpoint directory, a .onnx model or .safetensors")


def load_model(path: str | Path, *, weights: str | Path | None = None
               ) -> nn.Module | torch.export.ExportedProgram:
    """A `.pt2` program or a Hugging Face checkpoint, loaded safely in this process;
    `weights` (`.safetensors`) replace the model's own."""
    from freemark.formats import huggingface
    from freemark.formats.pt2 import apply_weights, load_program

    kind = format_of(path)
    if kind == "pt2":
        program = load_program(path)
        return apply_weights(program, weights) if weights else program
    if kind == "hf":
        if weights is None:
            return huggingface.load_checkpoint(path)
        with upload_file(path) as packed:
            return huggingface.apply_checkpoint_weights(packed, weights)
    raise InvalidInputError(f"{path}: a {kind} file is not a model on its own here"
                            + ("; pass it with --onnx-tensor as needed" if kind == "onnx" else ""))


@contextlib.contextmanager
def upload_file(path: str | Path) -> Iterator[Path]:
    """The one file that stands for `path` on the wire: a checkpoint directory packed into a
    private temporary `.safetensors` (removed afterwards), any other path itself."""
    from freemark.formats import huggingface

    path = Path(path)
    if not path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="freemark-pack-") as folder:
        yield huggingface.pack(path, Path(folder) / f"{path.resolve().name}.safetensors")
