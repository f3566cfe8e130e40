"""Opening a model in this process, through the formats table: for the owner's own files.

The owner's command line and library read their own models in process (`freemark keygen`,
`freemark extract`); the key server never does, it runs every upload in its sandbox. A
format's module opens its files (`load`) and says what goes on the wire for them (`packing`,
for a format whose local form is a directory); a format without `load` (ONNX, bare weights)
is read another way and refused here with a hint.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.formats.packing import Packed
from freemark.formats.table import detect

__all__ = ["load_model", "upload_file", "upload_source"]

_HINTS = {"onnx": "; an ONNX suspect is read at its key tensor (--onnx-tensor as needed)",
          "safetensors": "; pass bare weights with --weights beside their architecture",
          "gguf": "; read a GGUF in the architecture of your checkpoint (--model HOST_DIR "
                  "--weights X.gguf), or let the key server judge it in the registered one's "
                  "(freemark verify --model X.gguf)"}


def load_model(path: str | Path, *, weights: str | Path | None = None,
               adapter: str | Path | None = None) -> nn.Module | torch.export.ExportedProgram:
    """A model of any format with a loader, loaded safely in this process; `weights`
    (`.safetensors`) replace the model's own; `adapter` (a PEFT LoRA directory) is merged
    into `path`, its base checkpoint directory."""
    if adapter is not None:
        if weights is not None:
            raise InvalidInputError("give --weights or --adapter, not both")
        from freemark.formats import lora  # imported where used, as the table imports formats

        return lora.load_pair(path, adapter)
    row = detect(path)
    opener = row.opener()
    if not hasattr(opener, "load"):
        raise InvalidInputError(f"{path}: a {row.name} file is not a model on its own here"
                                + _HINTS.get(row.name, ""))
    model: nn.Module | torch.export.ExportedProgram = opener.load(path, weights=weights)
    return model


def upload_source(path: str | Path, *, adapter: str | Path | None = None) -> Path | Packed:
    """What goes on the wire for `path`, nothing written: a checkpoint directory (with
    `adapter`, the base checkpoint `path` and the adapter together) as the bytes of the one
    `.safetensors` its format packs it into, produced as they are read (`formats.packing`);
    any other path itself."""
    if adapter is not None:
        from freemark.formats import lora

        return lora.packing(path, adapter)
    opener = detect(path).opener()
    if Path(path).is_dir() and hasattr(opener, "packing"):
        packed: Packed = opener.packing(path)
        return packed
    return Path(path)


@contextlib.contextmanager
def upload_file(path: str | Path, *, adapter: str | Path | None = None) -> Iterator[Path]:
    """The one file that stands for `path` on the wire (`upload_source`) as a path: a packed
    checkpoint written to a private temporary `.safetensors`, removed afterwards; any other
    path itself. For checks of what was sent (`freemark receipt verify --model`)."""
    source = upload_source(path, adapter=adapter)
    if isinstance(source, Path):
        yield source
        return
    name = Path(adapter if adapter is not None else path).resolve().name
    with tempfile.TemporaryDirectory(prefix="freemark-pack-") as folder:
        yield source.write(Path(folder) / f"{name}.safetensors")
