"""LoRA fine-tunes of the decoder host, as a thief makes them with peft.

`train_adapter` wraps a `save_pretrained` decoder (`decoder_fixtures`: Llama family) in a
peft LoRA for causal language modelling (rank 8, alpha 16, on every attention and MLP
projection, so the key layer's input changes), trains it with `decoder_fixtures.train` on
another text than the host's (the licences), and saves the adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) and, if asked, the merged checkpoint
(`merge_and_unload` then `save_pretrained`, with the tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from decoder_fixtures import batches, license_text, train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(base: Path, adapter: Path, *, seed: int, merged: Path | None = None,
                  steps: int = 60, lr: float = 1e-3) -> Path:
    """Train and save a LoRA adapter on `base`; with `merged`, save the merge there too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base))
    wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                               target_modules=TARGETS))
    train(wrapped, batches(license_text(), seed), steps=steps, lr=lr)
    wrapped.save_pretrained(adapter)
    if merged is not None:
        wrapped.merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(merged)
    return adapter
