"""Every model format freemark reads, in one table: adding a format is one module plus one row.

A row says what a format is called on the command line and in sandbox options (`name`), on
the wire (`wire`, a `freemark.v1.ModelFormat`), which suffix its upload is spooled under,
whether it may be registered as a host or only judged as a suspect, and which module opens
it. Each format's module (`module`) answers `is_format(path)` for a local path, and opens a
file of its kind that nobody vetted: the caps, the vetting and the safe loader live there,
beside each other (`pt2` with `pt2_vetting`, `huggingface`, `lora`, `onnx`, `gguf`, `weights`). Its optional
hooks: `load(path, weights=)` and `packing(path)` for the owner's own files
(`freemark.formats.local`), `open_untrusted(path, ...)` and `warm_up(folder)` for the key
server's sandbox child (rows with `sandbox_reader`).

The client (`format_of`, the upload's wire format, the host check), the key server (which
formats Register and Verify admit, the spool suffix) and the sandbox child (which loader
reads an upload) all read this table; nothing else spells a format. It imports neither torch
nor a format's module: a module is imported only when a path is asked about or opened.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from freemark.errors import InvalidInputError
from freemark.v1 import keyservice_pb2 as pb

__all__ = ["FORMATS", "HOSTS", "SUSPECTS", "ModelFormat", "by_name", "by_wire", "detect",
           "format_of", "names"]


@dataclass(frozen=True)
class ModelFormat:
    """One model format: its names, where it may be used, and the module that opens it."""

    name: str  # on the command line, in sandbox options and in messages
    wire: pb.ModelFormat.ValueType
    suffix: str  # the suffix a spooled upload of this format carries
    host: bool  # may be registered as a host
    suspect: bool  # may be judged in a Verify
    module: str  # the module with is_format(path) and the safe loader
    what: str  # a person's description, for error messages
    # The module reads an upload in the key server's sandbox child (`open_untrusted`, and
    # `warm_up` for the fork server); False: a `.pt2` program (the child's default path,
    # with its vetting) or bare weights (they ride with the stored host they belong to).
    sandbox_reader: bool = False

    def opener(self) -> ModuleType:
        """The format's module (imported on first use: it may import torch or onnx)."""
        return importlib.import_module(self.module)


# Detection order: the first row whose module claims a path wins (a packed checkpoint is a
# .safetensors file too, so `hf` and `lora`, told apart by their metadata key, come before
# bare `safetensors` weights).
FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat("hf", pb.MODEL_FORMAT_HF_CHECKPOINT, ".safetensors", host=True, suspect=True,
                module="freemark.formats.huggingface",
                what="a Hugging Face checkpoint (a directory with config.json, or one packed "
                     ".safetensors)", sandbox_reader=True),
    ModelFormat("lora", pb.MODEL_FORMAT_HF_LORA, ".safetensors", host=False, suspect=True,
                module="freemark.formats.lora",
                what="a LoRA adapter with its base checkpoint (--model BASE_DIR --adapter "
                     "ADAPTER_DIR, or one packed .safetensors)", sandbox_reader=True),
    ModelFormat("pt2", pb.MODEL_FORMAT_PT2, ".pt2", host=True, suspect=True,
                module="freemark.formats.pt2", what="a torch.export program (.pt2)"),
    ModelFormat("safetensors", pb.MODEL_FORMAT_SAFETENSORS, ".safetensors", host=False,
                suspect=True, module="freemark.formats.weights",
                what=".safetensors weights for the registered host's architecture"),
    ModelFormat("onnx", pb.MODEL_FORMAT_ONNX, ".onnx", host=False, suspect=True,
                module="freemark.formats.onnx", what="an ONNX model (.onnx)",
                sandbox_reader=True),
    # Read into the registered Hugging Face host's architecture (`weights` in the sandbox).
    ModelFormat("gguf", pb.MODEL_FORMAT_GGUF, ".gguf", host=False, suspect=True,
                module="freemark.formats.gguf", what="a GGUF file (llama.cpp, .gguf)",
                sandbox_reader=True),
)
HOSTS: tuple[ModelFormat, ...] = tuple(f for f in FORMATS if f.host)
SUSPECTS: tuple[ModelFormat, ...] = tuple(f for f in FORMATS if f.suspect)
_BY_NAME = {f.name: f for f in FORMATS}
_BY_WIRE: dict[int, ModelFormat] = {f.wire: f for f in FORMATS}


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


def detect(path: str | Path) -> ModelFormat:
    """The format of a local `path`: the first row whose module claims it."""
    path = Path(path)
    for row in FORMATS:
        if row.opener().is_format(path):
            return row
    if path.is_dir():
        raise InvalidInputError(f"{path}: a model directory needs a config.json "
                                "(a Hugging Face checkpoint)")
    raise InvalidInputError(f"{path}: cannot tell the model format; give {names()}")


def format_of(path: str | Path) -> str:
    """The name of `path`'s format (`detect(path).name`)."""
    return detect(path).name
