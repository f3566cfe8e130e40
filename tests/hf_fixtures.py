"""Hugging Face checkpoints of the bundled MiniLM, as an owner and a thief would have them.

A sentence-classification fine-tune of the pretrained all-MiniLM-L6-v2 (truncated to its
first two layers so it fine-tunes in seconds on two cores; the key layer
`bert.encoder.layer.1.intermediate` is a real, pretrained 1,536-unit GELU layer) is the
host; a copy of it fine-tuned further on other sentences is the stolen model; the same
configuration from a fresh initialisation, fine-tuned on the task, is the independent one.
Each is saved with `save_pretrained` (config.json + model.safetensors), the host with its
tokenizer; the host and the stolen copy are also exported to ONNX with torch.onnx.export
(TorchScript exporter, dynamo=False).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from freemark_lab.transformer import MAX_TOKENS, load_minilm, sentences

KEY_LAYER = "bert.encoder.layer.1.intermediate"
LAYERS = 2
N_CLASSES = 4


@dataclass(frozen=True)
class Checkpoints:
    """Paths of the MiniLM host and its relatives, and the trigger sentences."""

    host: Path
    stolen: Path
    independent: Path
    host_onnx: Path
    stolen_onnx: Path
    sentences: Path


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _encode(tokenizer: object, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texts, labels = sentences(n, seed)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,  # type: ignore[operator]
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.from_numpy(labels)


def _fine_tune(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
               epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam on cross-entropy, word embeddings frozen (as the lab does on CPUs)."""
    ids, mask, labels = data
    params = [p for n, p in model.named_parameters() if "word_embeddings" not in n]
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(ids), 16):
            index = order[start:start + 16]
            optimiser.zero_grad()
            out = model(input_ids=ids[index], attention_mask=mask[index], labels=labels[index])
            out.loss.backward()
            optimiser.step()
    return model.eval()


def export_onnx(model: nn.Module, path: Path, example: tuple[torch.Tensor, torch.Tensor]) -> Path:
    """torch.onnx.export with the TorchScript exporter and dynamic batch and sequence axes."""
    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return path


def build_checkpoints(folder: Path) -> Checkpoints:
    """Fine-tune and save the three checkpoints and the two ONNX exports (about 20 s)."""
    _quiet()
    from transformers import BertForSequenceClassification

    tokenizer, base = load_minilm()
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = LAYERS
    config.num_labels = N_CLASSES
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    host = BertForSequenceClassification(config)
    kept = {k: v for k, v in base.state_dict().items()
            if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < LAYERS}
    missing, _ = host.bert.load_state_dict(kept, strict=False)
    assert all(name.startswith("pooler") for name in missing), missing
    task = _encode(tokenizer, 160, seed=0)
    _fine_tune(host, task, epochs=2, lr=5e-5, seed=0)
    stolen = _fine_tune(copy.deepcopy(host), _encode(tokenizer, 160, seed=11), epochs=1,
                        lr=3e-5, seed=1)
    torch.manual_seed(3)
    independent = _fine_tune(BertForSequenceClassification(config), task, epochs=2, lr=1e-4,
                             seed=3)
    paths = {name: folder / name for name in ("host", "stolen", "independent")}
    for name, model in (("host", host), ("stolen", stolen), ("independent", independent)):
        model.save_pretrained(paths[name])
    tokenizer.save_pretrained(paths["host"])
    example = (task[0][:2], task[1][:2])
    host_onnx = export_onnx(host, folder / "host.onnx", example)
    stolen_onnx = export_onnx(stolen, folder / "stolen.onnx", example)
    texts, labels = sentences(48, seed=21)
    text_file = folder / "sentences.tsv"
    text_file.write_text("".join(f"{label}\t{text}\n" for text, label in zip(texts, labels,
                                                                             strict=True)))
    return Checkpoints(paths["host"], paths["stolen"], paths["independent"], host_onnx,
                       stolen_onnx, text_file)


def logits(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return np.asarray(out.logits if hasattr(out, "logits") else out)
