"""The trigger set Γ: which inputs the key reads the model's activations on.

Triggers are secret (with them and the key a thief could steer a copy away from the
watermark), so this module only reads and writes them where the caller says; the key
server stores them inside the encrypted bundle.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freemark.errors import InvalidInputError
from freemark.secretfile import write_private

DEFAULT_PER_CLASS = 10


@dataclass(frozen=True)
class TriggerSet:
    """Inputs of one trigger set; `attention_mask` only for token sequences (1 = real token)."""

    inputs: np.ndarray
    attention_mask: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.inputs.ndim < 1 or len(self.inputs) == 0:
            raise InvalidInputError("the trigger set is empty: give at least one input")
        if self.attention_mask is not None and self.attention_mask.shape != self.inputs.shape[:2]:
            raise InvalidInputError(
                f"attention_mask shape {self.attention_mask.shape} does not match "
                f"inputs {self.inputs.shape[:2]}"
            )
        if self.labels is not None and len(self.labels) != len(self.inputs):
            raise InvalidInputError(
                f"{len(self.labels)} labels for {len(self.inputs)} trigger inputs"
            )

    def __len__(self) -> int:
        return len(self.inputs)


def select_triggers(
    x: np.ndarray, y: np.ndarray, *, per_class: int = DEFAULT_PER_CLASS, seed: int = 0
) -> TriggerSet:
    """Pick `per_class` samples of every class (fewer if a class is smaller), seeded.

    At least one sample per class keeps f̄ representative of the whole task rather
    than of one class, which is what makes it stable under fine-tuning.
    """
    if len(x) == 0 or len(x) != len(y):
        raise InvalidInputError(f"need matching, non-empty x and y; got {len(x)} and {len(y)}")
    if per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        take = min(per_class, len(members))
        chosen.extend(rng.choice(members, size=take, replace=False).tolist())
    index = np.array(sorted(chosen))
    return TriggerSet(inputs=np.asarray(x[index]), labels=np.asarray(y[index]))


def load_triggers(path: str | Path) -> TriggerSet:
    """Read a triggers `.npz` (`inputs`, optional `attention_mask`, `labels`); never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "inputs" not in data.files:
                raise InvalidInputError(f"{path}: a triggers file needs an 'inputs' array")
            mask = data["attention_mask"] if "attention_mask" in data.files else None
            labels = data["labels"] if "labels" in data.files else None
            return TriggerSet(inputs=data["inputs"], attention_mask=mask, labels=labels)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{path}: not a readable triggers .npz ({exc})") from exc


def save_triggers(path: str | Path, triggers: TriggerSet) -> None:
    """Write a triggers `.npz` with mode 0600, atomically: the file is secret, like the key."""
    arrays: dict[str, np.ndarray] = {"inputs": triggers.inputs}
    if triggers.attention_mask is not None:
        arrays["attention_mask"] = triggers.attention_mask
    if triggers.labels is not None:
        arrays["labels"] = triggers.labels
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    write_private(Path(path), buffer.getvalue())
