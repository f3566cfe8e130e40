"""Decoder language models for the tests, trained here on real English text and cached.

No pretrained decoder ships in any wheel of the package index (checked), so the host is a
small Llama-family model (4 layers, hidden 128, grouped-query attention: 4 query heads on 2
key/value heads) trained for a couple of minutes on the docstrings of Python's standard
library: real English prose that every machine running these tests has offline. Its
tokenizer is a byte-level BPE trained with the `tokenizers` library on the same text and
saved beside the weights (no pad token, as GPT-2's and Llama's have none). Relatives:

- `finetuned`: the host trained further on another text (the GNU and other licences in
  /usr/share/common-licenses), at a lower learning rate: a thief's fine-tune.
- `relabelled`: the host with every block's MLP hidden units relabelled (gate and up rows,
  down columns) and its attention heads permuted (key/value groups, and the query heads
  within each group): the same function, a free disguise.
- `independents`: the same recipe from other seeds (initialisation and text order), judged
  as suspects; `references`: three more, the owner's reference panel for the aligned test
  (never judged, so the panel and the innocent suspects are disjoint).

Each model is a `save_pretrained` directory under `.cache/decoders/`, named by what built it
and a hash of what it depends on (the recipe's model and training parts, the text's hash,
its seed; a fine-tune also its own settings and text), built once under a file lock (pytest
workers share it, `build_cache`) and reused: change any of them and it is rebuilt. The stable API for other
tests: `decoder_host()` (the host's directory), `decoders()` (all of them, `Decoders`),
`KEY_LAYER`, `batches` and `train` (to make more relatives of the host).
"""

from __future__ import annotations

import ast
import copy
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from build_cache import CACHE as ROOT_CACHE
from build_cache import cached, digest

CACHE = ROOT_CACHE / "decoders"
KEY_LAYER = "model.layers.2.mlp.act_fn"
LICENSES = Path("/usr/share/common-licenses")
# Modules whose docstrings are the host's text: long, prose-heavy, stable across 3.11-3.13.
STDLIB_MODULES = (
    "argparse", "asyncio/base_events", "asyncio/tasks", "collections/__init__", "configparser",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email/message", "enum",
    "fractions", "ftplib", "functools", "gettext", "http/client", "http/server",
    "imaplib", "inspect", "ipaddress", "logging/__init__", "logging/handlers", "mailbox",
    "multiprocessing/pool", "optparse", "pathlib", "pdb", "pickle", "pydoc", "random",
    "shutil", "smtplib", "socket", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "traceback", "turtle", "typing", "unittest/case",
    "urllib/parse", "urllib/request", "uuid", "warnings", "zipfile",
)
RECIPE: dict[str, Any] = {
    "model": {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": False},
    "sequence": 64, "batch": 8, "steps": 200, "lr": 3e-3,
    "finetune": {"steps": 60, "lr": 5e-4},
    "independent_seeds": [1, 2, 3, 4, 5],
    "reference_seeds": [6, 7, 8],
    "version": 1,
}
EOS = "<|endoftext|>"
RELABEL_SEED = 11


@dataclass(frozen=True)
class Decoders:
    """The host and its relatives, each a save_pretrained directory (with the tokenizer)."""

    host: Path
    finetuned: Path
    relabelled: Path
    independents: tuple[Path, ...]
    references: tuple[Path, ...]
    sentences: Path  # trigger sentences, one a line, from the host's own text


def _clean(text: str) -> list[str]:
    """A docstring's paragraphs as single lines of prose (code, tables and short lines out)."""
    lines = []
    for paragraph in text.split("\n\n"):
        line = " ".join(paragraph.split())
        words = line.split()
        if len(words) >= 6 and sum(w.isalpha() for w in words) >= 0.6 * len(words):
            lines.append(line)
    return lines


@cache
def stdlib_text() -> tuple[str, ...]:
    """The host's text: the prose paragraphs of `STDLIB_MODULES`' docstrings, in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in STDLIB_MODULES:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    lines.extend(_clean(doc))
    return tuple(lines)


@cache
def license_text() -> tuple[str, ...]:
    """The fine-tune's text: the licences' paragraphs (another domain, real English)."""
    lines: list[str] = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_file() and not path.is_symlink():
            lines.extend(_clean(path.read_text(encoding="utf-8", errors="replace")))
    return tuple(lines)


def _training() -> dict[str, Any]:
    """What every trained model depends on: the recipe's model and training parts, the text."""
    keys = ("model", "sequence", "batch", "steps", "lr", "version")
    return {"recipe": {key: RECIPE[key] for key in keys}, "text": digest(list(stdlib_text()))}


def tokenizer_dir() -> Path:
    """The host's tokenizer: byte-level BPE trained on `stdlib_text`, no pad token."""
    def build(folder: Path) -> None:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import PreTrainedTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(stdlib_text(), vocab_size=RECIPE["model"]["vocab_size"],
                                min_frequency=2, special_tokens=[EOS], show_progress=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                                       unk_token=EOS,
                                       model_max_length=RECIPE["model"]["max_position_embeddings"])
        fast.save_pretrained(folder)

    return cached(CACHE, "tokenizer", _training(), build)


def _tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir()))


def batches(text: tuple[str, ...], seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch, sequence) token blocks of `text`: paragraphs shuffled by `seed`,
    joined with end-of-text tokens and cut into blocks; each batch a seeded draw of blocks."""
    tokenizer = _tokenizer()
    tokenizer.model_max_length = 1 << 30  # whole paragraphs here; blocks are cut below
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(text))
    ids: list[int] = []
    for encoded in tokenizer([text[i] for i in order])["input_ids"]:
        ids.extend([*encoded, tokenizer.eos_token_id])
    length, size = RECIPE["sequence"], RECIPE["batch"]
    blocks = torch.tensor(ids[:len(ids) // length * length]).view(-1, length)
    while True:
        yield blocks[torch.from_numpy(rng.permutation(len(blocks))[:size])]


def train(model: nn.Module, data: Iterator[torch.Tensor], *, steps: int, lr: float
          ) -> tuple[nn.Module, list[float]]:
    """Next-token training with AdamW, the learning rate decayed linearly to zero, on one
    thread (tiny matrices: more threads only contend on a shared machine); the model and
    its losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    losses = []
    try:
        for _ in range(steps):
            ids = next(data)
            loss = model(input_ids=ids, labels=ids).loss
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return model.eval(), losses


def _save_trained(trained: tuple[nn.Module, list[float]], folder: Path) -> None:
    """The model and its tokenizer, and its first and last ten steps' mean loss."""
    model, losses = trained
    _save(model, folder)
    summary = {"first": float(np.mean(losses[:10])), "last": float(np.mean(losses[-10:]))}
    (folder / "training.json").write_text(json.dumps(summary))


def _fresh(seed: int) -> nn.Module:
    import transformers

    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(**RECIPE["model"], bos_token_id=tokenizer.eos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _save(model: nn.Module, folder: Path) -> None:
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def _trained(seed: int) -> Path:
    def build(folder: Path) -> None:
        _save_trained(train(_fresh(seed), batches(stdlib_text(), seed), steps=RECIPE["steps"],
                            lr=RECIPE["lr"]), folder)

    return cached(CACHE, "host" if seed == 0 else f"independent{seed}", [_training(), seed], build)


def decoder_host() -> Path:
    """The host's save_pretrained directory (with its tokenizer)."""
    return _trained(0)


def _load(folder: Path) -> nn.Module:
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()


def _finetuned() -> Path:
    def build(folder: Path) -> None:
        model = _load(decoder_host())
        settings = RECIPE["finetune"]
        _save_trained(train(model, batches(license_text(), 7), steps=settings["steps"],
                            lr=settings["lr"]), folder)

    return cached(CACHE, "finetuned", [_training(), RECIPE["finetune"], digest(list(license_text()))],
                   build)


def relabel(model: nn.Module, seed: int) -> nn.Module:
    """A function-preserving copy: each block's MLP hidden units and attention heads permuted."""
    config = model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    per_group, head_dim = heads // groups, config.hidden_size // heads
    generator = torch.Generator().manual_seed(seed)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for block in copied.model.layers:
            mlp, attention = block.mlp, block.self_attn
            units = torch.randperm(mlp.gate_proj.out_features, generator=generator)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[units])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[units])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, units])
            group_order = torch.randperm(groups, generator=generator)
            query_heads = torch.cat([group * per_group + torch.randperm(per_group, generator=generator)
                                     for group in group_order.tolist()])
            rows = (query_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            kv_rows = (group_order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            attention.q_proj.weight.copy_(attention.q_proj.weight[rows])
            attention.k_proj.weight.copy_(attention.k_proj.weight[kv_rows])
            attention.v_proj.weight.copy_(attention.v_proj.weight[kv_rows])
            attention.o_proj.weight.copy_(attention.o_proj.weight[:, rows])
    return copied


def _relabelled() -> Path:
    def build(folder: Path) -> None:
        host = _load(decoder_host())
        copied = relabel(host, seed=RELABEL_SEED)
        ids = next(batches(stdlib_text(), 3))
        with torch.no_grad():  # the disguise is free: the same function
            torch.testing.assert_close(copied(input_ids=ids).logits, host(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-4)
        _save(copied, folder)

    return cached(CACHE, "relabelled", [_training(), RELABEL_SEED], build)


def _sentences() -> Path:
    def build(folder: Path) -> None:
        rng = np.random.default_rng(5)
        text = stdlib_text()
        chosen = [text[i] for i in sorted(rng.choice(len(text), size=200, replace=False))]
        (folder / "sentences.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")

    return cached(CACHE, "sentences", _training()["text"], build) / "sentences.txt"


def decoders() -> Decoders:
    """The host and all its relatives (each trained once, then read from the cache)."""
    return Decoders(host=decoder_host(), finetuned=_finetuned(), relabelled=_relabelled(),
                    independents=tuple(_trained(seed) for seed in RECIPE["independent_seeds"]),
                    references=tuple(_trained(seed) for seed in RECIPE["reference_seeds"]),
                    sentences=_sentences())
