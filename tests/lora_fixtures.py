"""LoRA fine-tunes of a Hugging Face checkpoint, as a thief makes them with peft.

`train_adapter` wraps a `save_pretrained` checkpoint in a peft LoRA (sequence
classification, so peft also saves the classification head whole as `modules_to_save`;
rank 8 on every attention projection and feed-forward `dense` layer, the key layer's
included), trains it a little with Adam on other sentences than the owner's, and saves the
adapter directory (`adapter_config.json` + `adapter_model.safetensors`) and, if asked, the
merged checkpoint (`merge_and_unload` then `save_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from freemark_lab.transformer import MAX_TOKENS, load_minilm, sentences

TARGETS = ["query", "key", "value", "dense"]


def train_adapter(base: Path, adapter: Path, *, seed: int, merged: Path | None = None,
                  steps: int = 20, lr: float = 2e-3) -> Path:
    """Train and save a LoRA adapter on `base`; with `merged`, save the merge there too."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    tokenizer, _ = load_minilm()
    texts, labels = sentences(16 * steps, seed)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt")
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base)
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                               target_modules=TARGETS))
    optimiser = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    target = torch.from_numpy(labels)
    wrapped.train()
    for step in range(steps):
        batch = slice(16 * step, 16 * step + 16)
        optimiser.zero_grad()
        wrapped(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch],
                labels=target[batch]).loss.backward()
        optimiser.step()
    wrapped.eval()
    wrapped.save_pretrained(adapter)
    if merged is not None:
        wrapped.merge_and_unload().save_pretrained(merged)
    return adapter
