"""LoRA adapters: the merge equals peft's own `merge_and_unload` (plain, rsLoRA, GPT-2's
Conv1D, a classification head in modules_to_save); an adapter and its base pack into one
file that loads to the same model; hostile adapter configs and tensors are refused before
anything is merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats import huggingface, lora
from freemark.formats.local import load_model, upload_file
from freemark.formats.pt2 import fingerprint
from freemark.formats.table import format_of
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2

peft = pytest.importorskip("peft")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 48, "vocab_size": 120, "max_position_embeddings": 64}
LAYER = "bert.encoder.layer.1.intermediate"


def _bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(**TINY)
    config.architectures = ["BertForSequenceClassification"]
    return BertForSequenceClassification(config).eval()


def _adapter(model: torch.nn.Module, folder: Path, **options: Any) -> torch.nn.Module:
    """Wrap `model` with a LoRA whose B is not zero (as after training), save the adapter, and
    return peft's own merge of it."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"],
                "init_lora_weights": False, **options}
    torch.manual_seed(1)
    wrapped = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():  # a trained head in modules_to_save differs from the base's
        for name, parameter in wrapped.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5)
    wrapped.save_pretrained(folder)
    merged: torch.nn.Module = wrapped.merge_and_unload()
    return merged.eval()


def _pair(tmp_path: Path, **options: Any) -> tuple[Path, Path, torch.nn.Module]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    _bert().save_pretrained(base)
    return base, adapter, _adapter(_bert(), adapter, **options)


def _same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(other)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, other[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "r": 8, "lora_alpha": 3},
                                     {"task_type": "SEQ_CLS"}],
                         ids=["plain", "rslora", "seq-cls-head"])
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, options: dict[str, Any]) -> None:
    base, adapter, theirs = _pair(tmp_path, **options)
    ours = load_model(base, adapter=adapter)
    _same_weights(ours, theirs)
    assert fingerprint(ours) != fingerprint(_bert())  # the adapter changed the model
    if options.get("task_type") == "SEQ_CLS":  # peft saved the head whole (modules_to_save)
        assert not torch.equal(ours.classifier.weight, _bert().classifier.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpt2_conv1d_is_merged_transposed_as_peft_does(tmp_path: Path, dtype: torch.dtype
                                                       ) -> None:
    """A GPT-2 language model (Conv1D projections stored (in, out), the output projection
    tied to the embedding), its weights stored in `dtype`, through pack and the sandbox's
    reader: the merged weights are peft's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32,
                            bos_token_id=0, eos_token_id=0)
        config.architectures = ["GPT2LMHeadModel"]
        return GPT2LMHeadModel(config).to(dtype).eval()

    gpt2().save_pretrained(tmp_path / "base")
    theirs = _adapter(gpt2(), tmp_path / "adapter", task_type="CAUSAL_LM",
                      target_modules=["c_attn", "c_fc"])
    values = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert values["fan_in_fan_out"] is True  # what peft writes for Conv1D
    plan = lora.check_adapter_config(lora.read_adapter_config(tmp_path / "adapter"), gpt2(), "a")
    assert plan.transposed == frozenset(plan.targets) and len(plan.targets) == 2
    packed = lora.pack(tmp_path / "base", tmp_path / "adapter", tmp_path / "pair.safetensors")
    ours = lora.load_packed(packed)
    _same_weights(ours, theirs)
    assert ours.transformer.h[0].attn.c_attn.weight.dtype == dtype  # stored dtype kept
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied


def test_a_packed_pair_is_one_deterministic_file_that_loads_to_the_merged_model(
        tmp_path: Path) -> None:
    base, adapter, theirs = _pair(tmp_path, task_type="SEQ_CLS")
    values = json.loads((adapter / "adapter_config.json").read_text())
    values["base_model_name_or_path"] = "https://example.invalid/elsewhere"  # a label only
    (adapter / "adapter_config.json").write_text(json.dumps(values))
    first = lora.pack(base, adapter, tmp_path / "one.safetensors")
    second = lora.pack(base, adapter, tmp_path / "two.safetensors")
    assert first.read_bytes() == second.read_bytes()  # the verdict signs its SHA-256
    assert format_of(first) == "lora" and format_of(adapter) == "lora"
    _same_weights(load_model(first), theirs)
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as handle:
        packed = json.loads(handle.metadata()[lora.METADATA_KEY])
        names = list(handle.keys())
    assert "base_model_name_or_path" not in packed["adapter_config"]  # dropped, never sent
    assert any(n.startswith(lora.ADAPTER_PREFIX + "base_model.model.") for n in names)
    with upload_file(base, adapter=adapter) as sent:
        assert sent.read_bytes() == first.read_bytes()
    mask = np.ones((3, 7), dtype=np.int64)
    triggers = TriggerSet(inputs=np.arange(21).reshape(3, 7) + 3, attention_mask=mask)
    _, run = lora.open_untrusted(first, layer=LAYER, pooling=bundle_pb2.POOLING_TOKEN_MEAN)
    expected, _ = capture(theirs, LAYER, triggers)
    np.testing.assert_allclose(run(triggers), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="give its base too"):
        load_model(adapter)


def _repack(tmp_path: Path, *, config: Any = None, tensors: Any = None) -> Path:
    """A packed pair edited the way a hostile uploader could: configs and tensors by hand."""
    base, adapter, _ = _pair(tmp_path)
    good = lora.pack(base, adapter, tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        values = json.loads(handle.metadata()[lora.METADATA_KEY])
    state = load_file(str(good))
    if config is not None:
        config(values["adapter_config"])
    if tensors is not None:
        tensors(state)
    out = tmp_path / "hostile.safetensors"
    save_file(state, str(out), metadata={lora.METADATA_KEY: json.dumps(values)})
    return out


A_QUERY = lora.ADAPTER_PREFIX + "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "points-elsewhere-url": ({"config": lambda c: c.update(
        base_model_name_or_path="https://example.invalid/base")}, "never follows it"),
    "points-elsewhere-path": ({"config": lambda c: c.update(
        base_model_name_or_path="/etc/freemark")}, "never follows it"),
    "points-elsewhere-revision": ({"config": lambda c: c.update(revision="main")},
                                  "never follows it"),
    "points-elsewhere-code": ({"config": lambda c: c.update(auto_mapping={
        "base_model_class": "X", "parent_library": "os"})}, "never follows it"),
    "absurd-r": ({"config": lambda c: c.update(r=10**9)}, r"r must be a number in \(0, 1024\]"),
    "r-over-layer": ({"config": lambda c: c.update(r=64)}, "no low-rank adapter"),
    "absurd-alpha": ({"config": lambda c: c.update(lora_alpha=float("inf"))}, "lora_alpha"),
    "target-absent": ({"config": lambda c: c.update(target_modules=["query", "nowhere"])},
                      r"\['nowhere'\] name no module"),
    "target-regex": ({"config": lambda c: c.update(target_modules=".*")}, "regular expression"),
    "target-embedding": ({"config": lambda c: c.update(target_modules=["word_embeddings"])},
                         "linear layers only"),
    "dora": ({"config": lambda c: c.update(use_dora=True)}, "DoRA"),
    "replication": ({"config": lambda c: c.update(layer_replication=[[0, 2], [0, 2]])},
                    "layer replication"),
    "unknown-feature": ({"config": lambda c: c.update(future_trick={"on": 1})}, "future_trick"),
    "pissa": ({"config": lambda c: c.update(init_lora_weights="pissa")}, "PiSSA"),
    "not-lora": ({"config": lambda c: c.update(peft_type="IA3")}, "only LORA"),
    "task": ({"config": lambda c: c.update(task_type="SEQ_2_SEQ_LM")}, "task_type"),
    "megatron-import": ({"config": lambda c: c.update(megatron_core="os")}, "module to import"),
    "wrong-shape": ({"tensors": lambda s: s.update({A_QUERY: torch.zeros(4, 31)})},
                    r"shape \(4, 31\)"),
    "extra-tensor": ({"tensors": lambda s: s.update(
        {lora.ADAPTER_PREFIX + "base_model.model.payload": torch.zeros(2)})}, "unexpected"),
    "missing-tensor": ({"tensors": lambda s: s.pop(A_QUERY)}, "missing"),
    "integer-tensor": ({"tensors": lambda s: s.update(
        {A_QUERY: torch.zeros(4, 32, dtype=torch.int32)})}, "weights are floats"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_adapters_are_refused_before_any_merge(tmp_path: Path, case: str) -> None:
    edits, message = HOSTILE[case]
    hostile = _repack(tmp_path, **edits)
    with pytest.raises(ModelFileError, match=message):
        lora.open_untrusted(hostile, layer=LAYER, pooling=bundle_pb2.POOLING_TOKEN_MEAN)


def test_a_saved_module_tied_to_another_is_refused() -> None:
    """peft saves a copy of a tied output projection and unties it; merging into the shared
    weight would change the embedding too, so such an adapter is refused, not misread."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100,
                                       n_positions=32, bos_token_id=0, eos_token_id=0))
    values = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
              "modules_to_save": ["lm_head"]}
    with pytest.raises(ModelFileError, match="tied"):
        lora.check_adapter_config(values, model, "adapter")
    values["modules_to_save"] = []
    assert lora.check_adapter_config(values, model, "adapter").targets == (
        "transformer.h.0.attn.c_attn",)


def test_an_adapter_directory_with_a_pickle_only_is_refused(tmp_path: Path) -> None:
    base, adapter, _ = _pair(tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ModelFileError, match="never unpickles"):
        lora.pack(base, adapter, tmp_path / "out.safetensors")


def test_a_header_of_128_plus_256k_bytes_is_safetensors_and_a_pickle_is_not(tmp_path: Path
                                                                            ) -> None:
    """Regression: a first byte 0x80 (a header length of 128 + 256·k bytes, as two PEFT
    adapters of the integration test had) was taken for a pickle and refused."""
    path = tmp_path / "adapter_model.safetensors"
    for pad in range(256):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    huggingface.check_tensor_files([path], {"w": (2,)}, path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled", _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="never unpickles"):
        huggingface.check_tensor_files([tmp_path / "pickled"], {"w": (2,)}, "pickled")
