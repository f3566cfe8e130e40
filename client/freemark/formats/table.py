"""Which model format a path is, and how to read one in this process.

Four forms reach freemark: a torch.export program (`.pt2`), a Hugging Face checkpoint (a
directory with `config.json`, or one packed `.safetensors` carrying the config in its
metadata: `freemark.formats.huggingface`), bare `.safetensors` weights for a registered architecture,
and an ONNX model (`.onnx`, suspects only: `freemark.formats.onnx`). The command line and the
key server client name a model by path; this module is the one place that tells them apart.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.formats import huggingface
from freemark.formats.pt2 import apply_weights, load_program

__all__ = ["Format", "format_of", "load_model", "upload_file"]

Format = Literal["pt2", "hf", "safetensors", "onnx"]


def format_of(path: str | Path) -> Format:
    """The format of `path`: from being a checkpoint directory, else from its suffix (and, for
    `.safetensors`, whether it carries a packed config)."""
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
    path = Path(path)
    if not path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="freemark-pack-") as folder:
        yield huggingface.pack(path, Path(folder) / f"{path.resolve().name}.safetensors")
