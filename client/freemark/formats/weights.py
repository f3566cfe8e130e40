"""Bare `.safetensors` weights: a suspect that is only weights, for the registered host's
architecture (Verify only; `freemark extract --weights` beside a host model).

Nothing here builds a model: the weights are applied to the host's own architecture, by
`freemark.formats.pt2.apply_weights` for a program host and by
`freemark.formats.huggingface.apply_checkpoint_weights` for a checkpoint host, and the
tensor names and shapes must equal the host's. A packed checkpoint is a `.safetensors` file
too: the table asks `huggingface` first.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_format"]


def is_format(path: Path) -> bool:
    """Whether `path` names bare weights (the table's detection hook): by its suffix."""
    return path.suffix.lower() == ".safetensors" and not path.is_dir()
