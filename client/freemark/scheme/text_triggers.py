"""Text trigger sets: sentences from a file, tokenised by the checkpoint's own tokenizer.

The file is UTF-8, one sentence per line (blank lines skipped). Labels are optional: when
every line reads `LABEL<TAB>SENTENCE`, the labels are kept and the selection takes
`per_class` sentences of every label, as for images (`freemark.scheme.triggers.select_triggers`);
integer labels are kept as they are, other labels become the index of the name in their
sorted list. Without labels, `count` sentences are drawn. Both are seeded.

The tokenizer is loaded from local files only (`local_files_only=True`, never
`trust_remote_code`); a tokenizer config that asks for remote code (`auto_map`) is refused.
The token ids and the attention mask are padded on the right to the longest selected
sentence and cut at `max_length` tokens; the activations are then mean-pooled over the real
tokens (`freemark.scheme.activations.pool`). Decoder tokenizers (GPT-2's, Llama's) often have
no pad token: then the end-of-sequence token pads (the one deterministic choice every such
tokenizer offers), which no model reads, because the attention mask excludes it and the
pooling skips it. The padding side is fixed to the right whatever the tokenizer's own
setting, so a trigger set depends on the sentences only; a decoder's activations on the real
tokens do not depend on it anyway (`freemark.formats.huggingface` counts positions over real
tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError
from freemark.scheme.triggers import TriggerSet, select_triggers

DEFAULT_MAX_LENGTH = 128
DEFAULT_COUNT = 64
MAX_TEXT_BYTES = 64 * 1024 * 1024


def read_sentences(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """The sentences of a text file and their labels (None when the lines carry none)."""
    try:
        if Path(path).stat().st_size > MAX_TEXT_BYTES:
            raise InvalidInputError(f"{path}: over {MAX_TEXT_BYTES} bytes")
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise InvalidInputError(f"{path}: no sentences")
    if not all("\t" in line for line in lines):
        return lines, None
    names, texts = zip(*(line.split("\t", 1) for line in lines), strict=True)
    try:
        labels = np.array([int(name) for name in names], dtype=np.int64)
    except ValueError:
        order = {name: index for index, name in enumerate(sorted(set(names)))}
        labels = np.array([order[name] for name in names], dtype=np.int64)
    return [text.strip() for text in texts], labels


def load_tokenizer(directory: str | Path) -> Any:
    """The checkpoint's tokenizer from local files, refusing remote code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: no such tokenizer directory")
    try:
        settings = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{config}: not readable JSON ({exc})") from exc
    if isinstance(settings, dict) and "auto_map" in settings:
        raise InvalidInputError(f"{config}: refused: the tokenizer asks for remote code (auto_map)")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise InvalidInputError("text triggers need the transformers library: "
                                "pip install 'freemark[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                             trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{directory}: cannot load a tokenizer from it ({exc})") from exc


def text_triggers(path: str | Path, tokenizer_dir: str | Path, *,
                  max_length: int = DEFAULT_MAX_LENGTH, per_class: int = 10,
                  count: int = DEFAULT_COUNT, seed: int = 0) -> TriggerSet:
    """A seeded trigger set of tokenised sentences from `path` (module docstring)."""
    if max_length < 2:
        raise InvalidInputError(f"max_length must be at least 2, got {max_length}")
    texts, labels = read_sentences(path)
    if labels is None:
        if count < 1:
            raise InvalidInputError(f"count must be >= 1, got {count}")
        chosen = select_triggers(np.arange(len(texts)), np.zeros(len(texts), dtype=np.int64),
                                 per_class=count, seed=seed)
    else:
        chosen = select_triggers(np.arange(len(texts)), labels, per_class=per_class, seed=seed)
    index = chosen.inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InvalidInputError(f"{tokenizer_dir}: the tokenizer has neither a pad token nor an "
                                    "end-of-sequence token to pad with; set pad_token in "
                                    "tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    encoded = tokenizer([texts[i] for i in index], padding="longest", truncation=True,
                        max_length=max_length, return_tensors="np")
    return TriggerSet(inputs=np.asarray(encoded["input_ids"], dtype=np.int64),
                      attention_mask=np.asarray(encoded["attention_mask"], dtype=np.int64),
                      labels=None if labels is None else labels[index])
