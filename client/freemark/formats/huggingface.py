"""Hugging Face checkpoints as models: an allow-listed architecture built from `config.json`,
weights from safetensors only, and the one-file form they travel in.

A checkpoint directory (what `save_pretrained` writes) holds `config.json` beside
`model.safetensors`, or beside `model.safetensors.index.json` and its shards. Nothing here
unpickles: a directory with only `pytorch_model.bin` (a pickle) is refused, and the weights
are read with `safetensors`, which parses a JSON header and raw tensor bytes. The
architecture comes from the transformers library's own classes, never from code shipped
with the checkpoint: a config with `auto_map` (remote code) is refused, `trust_remote_code`
is never passed, and only the model types and classes in `ARCHITECTURES` (encoders and
decoder language models) are built, each with eager attention. Every size in the config
(and a decoder's heads, RoPE settings and windows) is capped, and the parameter count it
implies is estimated and capped, before a single tensor is allocated; the file's tensor
names and shapes must then equal the built model's exactly. The model is built with its
parameters on the meta device and the file's tensors, memory-mapped in their stored dtype,
take their place (`assign_weights`): one copy of the weights, never upcast.

On the wire (and at rest at the key server) a checkpoint is one file, a *packed checkpoint*:
a `.safetensors` file holding every tensor of the checkpoint under its own name, with the
whole `config.json` as a JSON string in its metadata under `CONFIG_METADATA_KEY`. `pack`
writes one from a directory; `load_checkpoint` reads either form. The same checks run on
the owner's machine and in the key server's sandbox, through the same functions, so a host
fingerprint measured here is the one the server measures.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from freemark.errors import ModelFileError
from freemark.formats.packing import Packed
from freemark.formats.pt2 import state_dict_of
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2

__all__ = [
    "ARCHITECTURES",
    "CONFIG_METADATA_KEY",
    "MAX_PARAMETERS",
    "apply_checkpoint_weights",
    "assign_weights",
    "build_model",
    "check_config",
    "check_tensor_files",
    "compute_dtype",
    "estimate_parameters",
    "expected_shapes",
    "is_checkpoint_dir",
    "is_packed",
    "layer_run",
    "load_checkpoint",
    "load_untrusted",
    "model_identity",
    "model_run",
    "open_safetensors",
    "pack",
    "packed_config",
    "packing",
    "read_config",
    "read_json_object",
    "read_tensors",
    "shards",
]

CONFIG_METADATA_KEY = "freemark.hf_config"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLED_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                 "flax_model.msgpack", "model.ckpt.index")

# Architectures tested in tests/unit/client/formats/test_huggingface.py. Encoders take
# (input_ids, attention_mask) as freemark's token triggers call them; their classes tie no
# weights. Masked-LM heads are left out. Decoders (`DECODERS`) are called through
# `_token_forward`, which passes the mask and the positions it implies by keyword; their
# language-model heads tie the output projection to the input embeddings when the config's
# `tie_word_embeddings` says so, and a tied weight is stored, checked and fingerprinted once
# (under the input embedding's name, as save_pretrained writes it).
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # model_type: (config class, model classes)
    "bert": ("BertConfig", ("BertModel", "BertForSequenceClassification",
                            "BertForTokenClassification")),
    "roberta": ("RobertaConfig", ("RobertaModel", "RobertaForSequenceClassification",
                                  "RobertaForTokenClassification")),
    "xlm-roberta": ("XLMRobertaConfig", ("XLMRobertaModel", "XLMRobertaForSequenceClassification",
                                         "XLMRobertaForTokenClassification")),
    "distilbert": ("DistilBertConfig", ("DistilBertModel", "DistilBertForSequenceClassification",
                                        "DistilBertForTokenClassification")),
    "gpt2": ("GPT2Config", ("GPT2Model", "GPT2LMHeadModel")),
    "llama": ("LlamaConfig", ("LlamaModel", "LlamaForCausalLM")),
    "qwen2": ("Qwen2Config", ("Qwen2Model", "Qwen2ForCausalLM")),
    "mistral": ("MistralConfig", ("MistralModel", "MistralForCausalLM")),
}
DECODERS = frozenset({"gpt2", "llama", "qwen2", "mistral"})

# Config keys that ask for code or behaviour outside the allow-list.
REFUSED_KEYS = {
    "auto_map": "it asks for remote code (auto_map); freemark never runs code from a checkpoint",
    "trust_remote_code": "it asks for remote code; freemark never runs code from a checkpoint",
    "quantization_config": "it is quantized with an external library; save it unquantized",
    "custom_pipelines": "it names custom pipeline code; freemark never runs code from a checkpoint",
}
# Caps checked on the config before anything is built. MAX_PARAMETERS is the default of the
# parameter count a config may imply (the checking functions take `max_parameters`; the key
# server passes its operator's setting): 2 billion covers the 1-1.5 B decoders owners run on
# a CPU (Llama 3.2 1B, Qwen2.5 1.5B) and is 4 GiB of bf16 weights, memory-mapped. The
# per-field caps bound each factor of the estimate.
MAX_PARAMETERS = 2_000_000_000
MAX_CONFIG_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors JSON header (names, shapes, metadata)
MAX_TENSORS = 10_000
MAX_POSITIONS = 1 << 20  # Llama 3.1 declares 131072; RoPE allocates nothing per position
SIZE_CAPS = {
    "hidden_size": 8192, "num_hidden_layers": 96, "num_attention_heads": 256,
    "intermediate_size": 65536, "vocab_size": 1_000_000, "max_position_embeddings": MAX_POSITIONS,
    "type_vocab_size": 1024, "num_labels": 100_000,
    # decoders: grouped-query attention and sliding windows
    "num_key_value_heads": 256, "head_dim": 1024, "sliding_window": MAX_POSITIONS,
    "max_window_layers": 1024,
    # GPT-2's own names (n_positions and n_ctx allocate a position table: the estimate counts it)
    "n_embd": 8192, "n_layer": 96, "n_head": 256, "n_inner": 65536, "n_positions": MAX_POSITIONS,
    "n_ctx": MAX_POSITIONS,
}
# RoPE settings (transformers' `rope_parameters`, which also absorbs a legacy `rope_theta` and
# `rope_scaling`): the types transformers implements for these families, the keys each reads,
# and a cap on every number (all must be finite and positive).
ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "original_max_position_embeddings"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
}
ROPE_CAPS = {"rope_theta": 1e9, "factor": 1024.0, "original_max_position_embeddings": MAX_POSITIONS}
ROPE_CAP = 1e4  # every other RoPE number (low/high frequency factors, betas, mscales)
LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


_refuse = ModelFileError.refused  # the one wording (freemark.errors)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads, ever
    try:
        import transformers
    except ImportError as exc:
        raise ModelFileError("Hugging Face checkpoints need the transformers library: "
                             f"pip install 'freemark[hf]' ({exc})") from exc
    transformers.utils.logging.set_verbosity_error()
    return transformers


def check_config(values: Any, source: str | Path, *, max_parameters: int = MAX_PARAMETERS) -> Any:
    """The transformers config object for `values` (a parsed config.json), or ModelFileError.

    Refuses remote code, model types and classes outside `ARCHITECTURES`, encoders set up
    as decoders, cross-attention, and sizes, RoPE settings and windows over the caps, before
    anything is allocated.
    """
    if not isinstance(values, dict):
        raise _refuse(source, "config.json is not a JSON object")
    for key, why in REFUSED_KEYS.items():
        if key in values:
            raise _refuse(source, why)
    model_type = values.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _refuse(source, f"model_type {model_type!r} is not supported; supported: "
                      f"{', '.join(sorted(ARCHITECTURES))}")
    config_class, classes = ARCHITECTURES[model_type]
    architectures = values.get("architectures")
    if (not isinstance(architectures, list) or len(architectures) != 1
            or architectures[0] not in classes):
        raise _refuse(source, f"config.json must name one architecture of {', '.join(classes)}; "
                      f"it names {architectures!r}")
    if values.get("add_cross_attention"):
        raise _refuse(source, "cross-attention (add_cross_attention) needs an encoder's states; "
                      "only stand-alone encoders and decoders are supported")
    if values.get("is_decoder") and model_type not in DECODERS:
        raise _refuse(source, f"a {model_type} is supported as an encoder only (is_decoder set)")
    transformers = _transformers()
    try:
        config = getattr(transformers, config_class).from_dict(values)
    except Exception as exc:  # third-party validation on hostile input: any error refuses
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise _refuse(source, f"config.json does not parse as a {config_class}: {reason}") from exc
    _check_sizes(config, source, max_parameters)
    config._attn_implementation = "eager"  # plain tensor ops; no kernel chosen by the file
    return config


def _size(config: Any, name: str, source: str | Path, default: int | None = None) -> int:
    value = getattr(config, name, default)
    if name == "intermediate_size" and value is None:
        value = getattr(config, "hidden_dim", None)  # DistilBERT's name for it
    if value is None and default is not None:
        value = default  # a field the file leaves null, as GPT-2 does n_inner
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(source, f"config {name} must be a positive integer, got {value!r}")
    if value > SIZE_CAPS[name]:
        raise _refuse(source, f"config {name}={value} is over the cap of {SIZE_CAPS[name]}")
    return value


def estimate_parameters(config: Any, source: str | Path) -> int:
    """The parameter count a parsed config implies (its large terms: a slight underestimate),
    every size field it reads checked against its cap first; raises ModelFileError."""
    if config.model_type == "gpt2":
        return _gpt2_estimate(config, source)
    if config.model_type in DECODERS:
        return _decoder_estimate(config, source)
    return _encoder_estimate(config, source)


def _check_sizes(config: Any, source: str | Path, max_parameters: int) -> None:
    """Cap every size field and the parameter count they imply (encoders and decoders)."""
    _check_activation(config, source)
    estimate = estimate_parameters(config, source)
    if estimate > max_parameters:
        raise _refuse(source, f"the config describes about {estimate:,} parameters, over the cap "
                      f"of {max_parameters:,}")


def _check_activation(config: Any, source: str | Path) -> None:
    """The config's activation must be one transformers implements (else building fails)."""
    from transformers.activations import ACT2FN

    for name in ("hidden_act", "activation_function", "activation"):
        value = getattr(config, name, None)
        if value is not None and (not isinstance(value, str) or value not in ACT2FN):
            raise _refuse(source, f"config {name}={value!r} is not an activation transformers "
                          "implements")


def _encoder_estimate(config: Any, source: str | Path) -> int:
    hidden = _size(config, "hidden_size", source)
    layers = _size(config, "num_hidden_layers", source)
    heads = _size(config, "num_attention_heads", source)
    inner = _size(config, "intermediate_size", source, 4 * hidden)
    vocab = _size(config, "vocab_size", source)
    positions = _size(config, "max_position_embeddings", source)
    types = _size(config, "type_vocab_size", source, 1)
    labels = _size(config, "num_labels", source, 2)
    if hidden % heads:
        raise _refuse(source, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return ((vocab + positions + types) * hidden
            + layers * (4 * hidden * hidden + 2 * hidden * inner)
            + hidden * hidden + labels * hidden)


def _head(config: Any, vocab: int, hidden: int) -> int:
    """Parameters of a language-model head: none when tied or absent (a bare model)."""
    has_head = config.architectures[0].endswith(("ForCausalLM", "LMHeadModel"))
    return vocab * hidden if has_head and not config.tie_word_embeddings else 0


def _gpt2_estimate(config: Any, source: str | Path) -> int:
    hidden = _size(config, "n_embd", source)
    layers = _size(config, "n_layer", source)
    heads = _size(config, "n_head", source)
    inner = _size(config, "n_inner", source, 4 * hidden)
    positions = _size(config, "n_positions", source)
    if getattr(config, "n_ctx", None) is not None:
        _size(config, "n_ctx", source)
    vocab = _size(config, "vocab_size", source)
    if hidden % heads:
        raise _refuse(source, f"n_embd {hidden} is not a multiple of n_head {heads}")
    return ((vocab + positions) * hidden + _head(config, vocab, hidden)
            + layers * (4 * hidden * hidden + 2 * hidden * inner))


def _decoder_estimate(config: Any, source: str | Path) -> int:
    """Llama, Qwen2 and Mistral: grouped-query attention, RoPE, optional sliding windows."""
    hidden = _size(config, "hidden_size", source)
    layers = _size(config, "num_hidden_layers", source)
    heads = _size(config, "num_attention_heads", source)
    kv_heads = _size(config, "num_key_value_heads", source, heads)
    inner = _size(config, "intermediate_size", source)
    vocab = _size(config, "vocab_size", source)
    _size(config, "max_position_embeddings", source)
    if getattr(config, "head_dim", None) is None and hidden % heads:
        raise _refuse(source, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = _size(config, "head_dim", source, hidden // heads)
    if heads % kv_heads:
        raise _refuse(source, f"num_key_value_heads {kv_heads} does not divide "
                      f"num_attention_heads {heads}")
    if head_dim % 2:
        raise _refuse(source, f"head_dim {head_dim} is odd; rotary embeddings rotate pairs")
    _check_rope(config, source)
    _check_windows(config, layers, source)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return vocab * hidden + _head(config, vocab, hidden) + layers * (attention + 3 * hidden * inner)


def _check_rope(config: Any, source: str | Path) -> None:
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_type"), str):
        raise _refuse(source, f"RoPE settings must be one object with a rope_type, got {rope!r}")
    kind = rope["rope_type"]
    if kind not in ROPE_KEYS:
        raise _refuse(source, f"rope_type {kind!r} is not supported; supported: "
                      f"{', '.join(sorted(ROPE_KEYS))}")
    unknown = sorted(set(rope) - ROPE_KEYS[kind] - {"rope_type", "rope_theta"})
    if unknown:
        raise _refuse(source, f"RoPE settings {unknown} are not read by rope_type {kind!r}")
    for key, value in rope.items():
        if key == "rope_type" or (key == "truncate" and isinstance(value, bool)):
            continue
        cap = ROPE_CAPS.get(key, ROPE_CAP)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 < value <= cap):
            raise _refuse(source, f"RoPE {key}={value!r} must be a finite number in (0, {cap:g}]")


def _check_windows(config: Any, layers: int, source: str | Path) -> None:
    """Sliding-window attention (Mistral, Qwen2): a positive window and known layer kinds."""
    if getattr(config, "sliding_window", None) is not None:
        _size(config, "sliding_window", source)
    if getattr(config, "max_window_layers", None) is not None:
        _size(config, "max_window_layers", source)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != layers
                              or not set(kinds) <= LAYER_TYPES):
        raise _refuse(source, f"layer_types must list one of {sorted(LAYER_TYPES)} per layer "
                      f"({layers}), got {str(kinds)[:80]}")


def build_model(config: Any) -> nn.Module:
    """The (checked) config's one architecture, in eval mode, with its parameters on the meta
    device: nothing is allocated for them until `assign_weights` puts the file's tensors in
    their place (one copy of the weights, memory-mapped, in their stored dtype). Its
    non-persistent buffers (RoPE frequencies, which no file holds) are computed on the CPU
    by their modules' own code. An architecture whose buffers live beside parameters
    (BERT's position ids in its embeddings) is built on the CPU instead; the encoders are
    capped small enough for that."""
    transformers = _transformers()
    name = config.architectures[0]
    if name not in ARCHITECTURES.get(config.model_type, ("", ()))[1]:
        raise ModelFileError(f"architecture {name!r} is not allow-listed")
    cls = getattr(transformers, name)
    with torch.device("meta"):
        model: nn.Module = cls(config)
    owners = _buffer_owners(model)
    if any(True for owner in owners for _ in owner.parameters()):
        model = cls(config)
    else:
        for owner in owners:  # transformers' rotary embeddings are built from the config alone
            fresh = type(owner)(config)
            for key, buffer in fresh.named_buffers(recurse=False):
                owner.register_buffer(key, buffer, persistent=False)
    if config.model_type in DECODERS:
        head = name.endswith(("ForCausalLM", "LMHeadModel"))
        model.register_forward_pre_hook(functools.partial(_token_forward, head=head),
                                        with_kwargs=True)
    return model.eval()


def _buffer_owners(model: nn.Module) -> list[nn.Module]:
    """The modules that hold non-persistent buffers (values no checkpoint stores)."""
    return [module for module in model.modules()
            if getattr(module, "_non_persistent_buffers_set", None)]


def _token_forward(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                   head: bool) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Call a decoder as freemark calls every token model, `model(input_ids, attention_mask)`
    (GPT-2's second parameter is a cache): the mask by keyword, no cache, and each token's
    position counted over real tokens only, so left and right padding give real tokens the
    same positions (and, with a causal mask, the same activations). A language-model `head`
    computes the last position's logits only: a key layer is inside the model, and logits
    over a 100k-token vocabulary for every trigger token would cost more memory than the
    model. Keyword calls (training, generation) pass unchanged."""
    if not args or kwargs or len(args) > 2:
        return None
    ids = args[0]
    mask = args[1] if len(args) == 2 else torch.ones_like(ids)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    call = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "use_cache": False}
    return (), {**call, "logits_to_keep": 1} if head else call


def read_json_object(path: Path, source: str | Path) -> dict[str, Any]:
    """A checkpoint's or adapter's small JSON file (`config.json`, `adapter_config.json`),
    parsed once its size is under `MAX_CONFIG_BYTES`; refusals name `source`."""
    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_CONFIG_BYTES else None
    except OSError as exc:
        raise ModelFileError(f"{source}: no readable {path.name} ({exc.strerror or exc})") from exc
    if raw is None:
        raise _refuse(source, f"{path.name} is over {MAX_CONFIG_BYTES} bytes")
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise _refuse(source, f"{path.name} is not JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise _refuse(source, f"{path.name} is not a JSON object")
    return values


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, parsed (size-capped)."""
    return read_json_object(directory / CONFIG_NAME, directory)


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is a directory with a config.json (a checkpoint, loadable or not)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def shards(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (`model.safetensors`, or the shards its
    index names, each a plain file name inside the directory); refuses a pickled-only
    checkpoint with the command that re-saves it. For every reader of a base checkpoint
    (adapters too), so that a directory is read one way."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _refuse(directory, f"{INDEX_NAME} has no readable weight_map ({exc})") from exc
        for name in names:
            if (not isinstance(name, str) or Path(name).name != name
                    or not name.endswith(".safetensors")):
                raise _refuse(directory, f"{INDEX_NAME} names shard {name!r}; shards must be "
                              ".safetensors files in the checkpoint directory")
        return [directory / name for name in names]
    pickled = [name for name in PICKLED_NAMES if (directory / name).exists()]
    if pickled:
        raise _refuse(directory, f"{pickled[0]} is a pickle, and freemark never unpickles a "
                      "model; re-save it as safetensors: model.save_pretrained(DIR) (the default "
                      "since transformers 4.35) or safe_serialization=True")
    raise _refuse(directory, f"no {WEIGHTS_NAME} or {INDEX_NAME}")


def _check_header(path: Path, source: str | Path) -> None:
    """Cap the safetensors JSON header before the library parses it; sniff pickles."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise ModelFileError(f"{source}: {exc.strerror or exc}") from exc
    # A safetensors header is JSON right after its 8-byte length; a pickle starts with
    # PROTO (0x80), which is also a length's first byte whenever it is 128 modulo 256.
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise _refuse(source, "this is a pickled torch checkpoint (pytorch_model.bin); freemark "
                      "never unpickles a model: re-save it as safetensors with save_pretrained")
    if len(head) < 9 or int.from_bytes(head[:8], "little") > MAX_HEADER_BYTES:
        raise _refuse(source, "not a safetensors file (or its header is over "
                      f"{MAX_HEADER_BYTES} bytes)")


def open_safetensors(path: Path, source: str | Path) -> Any:
    """`safe_open` on `path` (a context manager over its header and memory-mapped tensors),
    once its header length is capped and it is not a pickle; any file the library cannot
    read is refused as `source`'s. The one way every format here opens a safetensors file."""
    from safetensors import SafetensorError, safe_open

    _check_header(path, source)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _refuse(source, f"not a readable safetensors file ({exc})") from exc


def is_packed(path: str | Path) -> bool:
    """Whether `path` is a packed checkpoint (a .safetensors with the config in its metadata)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open_safetensors(path, path) as handle:
            return CONFIG_METADATA_KEY in (handle.metadata() or {})
    except ModelFileError:
        return False


def is_format(path: Path) -> bool:
    """Whether `path` is a checkpoint (the table's detection hook): a directory with a
    config.json, or a packed `.safetensors`."""
    if path.is_dir():
        return is_checkpoint_dir(path)
    return path.suffix.lower() == ".safetensors" and is_packed(path)


def load(path: str | Path, *, weights: str | Path | None = None) -> nn.Module:
    """A checkpoint (directory or packed file) built and loaded safely in this process;
    `weights` (`.safetensors`, or a llama.cpp `.gguf` of a decoder) replace its own."""
    if weights is None:
        return load_checkpoint(path)
    from freemark.formats import gguf  # imported where used, as the table imports formats

    if gguf.is_format(Path(weights)):
        model: nn.Module = gguf.load_into(path, weights)
        return model
    with packed(path) as single:
        return apply_checkpoint_weights(single, weights)


@contextlib.contextmanager
def packed(path: str | Path) -> Iterator[Path]:
    """The one file that stands for a checkpoint on the wire: a directory packed into a private
    temporary `.safetensors` (removed afterwards), a packed file itself."""
    path = Path(path)
    if not path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="freemark-pack-") as folder:
        yield pack(path, Path(folder) / f"{path.resolve().name}.safetensors")


def packed_config(path: Path) -> dict[str, Any]:
    """The config.json a packed checkpoint carries in its metadata, parsed (size-capped), not
    yet checked (`check_config` does that); refuses a `.safetensors` of weights only."""
    values = metadata_json(
        path, CONFIG_METADATA_KEY, MAX_CONFIG_BYTES, "the packed config is",
        missing=f"a .safetensors without a {CONFIG_METADATA_KEY!r} metadata entry is weights "
                "only; send a checkpoint directory, or pack one with freemark")
    return values if isinstance(values, dict) else {}


def metadata_json(path: Path, key: str, cap: int, what: str, *, missing: str) -> Any:
    """The JSON a packed `.safetensors` carries under metadata `key`, parsed once it is known
    to be at most `cap` bytes; refused (naming `what`, e.g. "the packed config is") when it
    is absent (`missing` says why), too long or not JSON. Packed checkpoints and packed
    LoRA pairs both read their configs through it."""
    with open_safetensors(path, path) as handle:
        text = (handle.metadata() or {}).get(key)
    if text is None:
        raise _refuse(path, missing)
    if len(text) > cap:
        raise _refuse(path, f"{what} over {cap} bytes")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _refuse(path, f"{what} not JSON ({exc})") from exc


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a file must hold for `model` (built by `build_model`): its
    `state_dict_of`, so a tied weight is expected once, under the input embedding's name, as
    save_pretrained writes it (a second copy under the alias is then unexpected)."""
    return {name: tuple(t.shape) for name, t in state_dict_of(model).items()}


def check_tensor_files(files: list[Path], expected: Mapping[str, tuple[int, ...]],
                       source: str | Path) -> None:
    """The files' headers (capped, nothing read beyond them) hold exactly `expected`'s tensors
    together, each once, with its shape and a float dtype; refuses as `source`'s otherwise.
    `expected` is `expected_shapes` of a built model, or that plus an adapter's tensors."""
    found: dict[str, Path] = {}
    for path in files:
        with open_safetensors(path, source) as handle:
            keys = list(handle.keys())
            if len(found) + len(keys) > MAX_TENSORS:
                raise _refuse(source, f"more than {MAX_TENSORS} tensors")
            for key in keys:
                if key in found:
                    raise _refuse(source, f"tensor {key!r} appears twice")
                sliced = handle.get_slice(key)
                if key in expected and tuple(sliced.get_shape()) != expected[key]:
                    raise _refuse(source, f"{key} has shape {tuple(sliced.get_shape())}, the config "
                                  f"says {expected[key]}")
                if sliced.get_dtype() not in FLOAT_DTYPES:
                    raise _refuse(source, f"{key} has dtype {sliced.get_dtype()}; weights are floats")
                found[key] = path
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise _refuse(source, f"the weights do not fit the config's architecture (missing "
                      f"{missing[:5]}, unexpected {extra[:5]})")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, memory-mapped (safetensors maps the file; nothing is copied
    until written to) and in its stored dtype. Call it after `check_tensor_files`: it trusts
    the headers it reads."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def compute_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The one dtype a model runs in: the stored dtype holding most of the weights' bytes
    (a bf16 checkpoint runs in bf16, never upcast; the few tensors some checkpoints keep in
    float32, such as norms, are cast to it so that every operation sees one dtype)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    return max(sorted(sizes, key=str), key=lambda dtype: sizes[dtype])


def assign_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path
                   ) -> nn.Module:
    """Put `state`'s tensors in place of `model`'s parameters (built by `build_model`): the
    names must be exactly `state_dict_of(model)`'s and the shapes equal; the tensors are used
    as they are (no copy) in one dtype (`compute_dtype`), and a tied alias is tied again to
    the weight it shares. For readers of other files (GGUF, adapters) as for safetensors."""
    expected = {name: tuple(t.shape) for name, t in state_dict_of(model).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise _refuse(source, f"the weights do not fit the config's architecture (missing "
                      f"{missing[:5]}, unexpected {extra[:5]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name] or not tensor.is_floating_point():
            raise _refuse(source, f"{name} has shape {tuple(tensor.shape)} and dtype "
                          f"{tensor.dtype}; the config says {expected[name]}, floats")
    dtype = compute_dtype(state)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()},
                          strict=False, assign=True)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    left = [name for name, t in model.state_dict().items() if t.is_meta]
    if left:
        raise _refuse(source, f"no weights for {left[:5]}")
    return model.eval()


def _load_weights(model: nn.Module, files: list[Path], source: str | Path) -> nn.Module:
    """Load the files into `model` once their headers fit it exactly."""
    check_tensor_files(files, expected_shapes(model), source)
    return assign_weights(model, read_tensors(files), source)


def load_checkpoint(path: str | Path, *, max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """A checkpoint directory or packed checkpoint as a module; raises ModelFileError."""
    path = Path(path)
    if path.is_dir():
        config = check_config(read_config(path), path, max_parameters=max_parameters)
        files = shards(path)
    elif path.is_file():
        config = check_config(packed_config(path), path, max_parameters=max_parameters)
        files = [path]
    else:
        raise ModelFileError(f"{path}: no such checkpoint directory or file")
    return _load_weights(build_model(config), files, path)


def apply_checkpoint_weights(packed: str | Path, weights: str | Path, *,
                             max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """The packed checkpoint's architecture with weights from another `.safetensors` file."""
    config = check_config(packed_config(Path(packed)), packed, max_parameters=max_parameters)
    return _load_weights(build_model(config), [Path(weights)], weights)


def packing(directory: str | Path) -> Packed:
    """A checkpoint directory as the one packed `.safetensors` that stands for it on the wire,
    its bytes produced as they are read (`formats.packing`), the shards memory-mapped.

    The directory is fully checked first (config, caps, safetensors only, names and shapes),
    so what is uploaded is what the key server will accept.
    """
    directory = Path(directory)
    values = read_config(directory)
    files = shards(directory)
    check_tensor_files(files, expected_shapes(build_model(check_config(values, directory))),
                       directory)
    # One metadata entry: with two, safetensors' writer orders them by a hash map, so the
    # header's bytes (and the file's SHA-256, which verdicts sign) would vary between runs.
    return Packed(read_tensors(files),
                  {CONFIG_METADATA_KEY: json.dumps(values, sort_keys=True)})


def pack(directory: str | Path, out: str | Path) -> Path:
    """Write a checkpoint directory as one packed `.safetensors` file (mode 0600): `packing`'s
    bytes."""
    return packing(directory).write(Path(out))


def open_untrusted(path: str | Path, *, layer: str | None, pooling: int,
                   weights: str | Path | None = None, width: int = 0,
                   max_parameters: int = MAX_PARAMETERS, **_options: Any
                   ) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """In the key server's sandbox child: build an uploaded packed checkpoint (with
    `weights`: those weights on its architecture) and locate the key's layer, and return its
    identity (fingerprint ‖ architecture digest) and its run, from a set's triggers to the
    key-layer activations (`layer` None: every module's, of `width` units (0: any), as
    `freemark.scheme.activations.capture_every` lists them). Opening reads no trigger, so
    its failures are the file's; the run's may depend on the triggers (the child reports
    them without text)."""
    return model_run(load_untrusted(path, weights=weights, max_parameters=max_parameters),
                     layer, pooling, width)


def load_untrusted(path: str | Path, *, weights: str | Path | None = None,
                   max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """`open_untrusted`'s model, built once: the sandbox child reads every layer a request
    asks for from it (`model_identity`, `layer_run`)."""
    return (apply_checkpoint_weights(path, weights, max_parameters=max_parameters) if weights
            else load_checkpoint(path, max_parameters=max_parameters))


def model_run(model: nn.Module, layer: str | None, pooling: int, width: int
              ) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """A built model's identity (fingerprint ‖ architecture digest) and its run, as every
    module-backed `open_untrusted` (checkpoint, GGUF, adapter) returns them: from a set's
    triggers to the key layer's pooled activations, or with `layer` None every module's of
    `width` units (0: any; `capture_every`). The layer is resolved here, before a trigger is
    read, so a missing one is the file's failure."""
    return model_identity(model), layer_run(model, layer, pooling, width)


def model_identity(model: nn.Module, *, weights: bool = True) -> bytes:
    """The fingerprint of every weight ‖ the architecture digest: read once per model.
    `weights` False leaves the weights unhashed (32 zero bytes stand in), for a reader that
    does not use the fingerprint (the key server's Verify)."""
    from freemark.formats.pt2 import architecture_digest, fingerprint

    return (fingerprint(model) if weights else bytes(32)) + architecture_digest(model)


def layer_run(model: nn.Module, layer: str | None, pooling: int, width: int
              ) -> Callable[[TriggerSet], Any]:
    """`model_run`'s run alone, for one more layer of a model already opened."""
    from freemark.scheme.activations import capture, capture_every, resolve_layer

    if layer is None:
        return lambda triggers: capture_every(model, triggers, width=width)
    resolve_layer(model, layer)
    return lambda triggers: capture(model, layer, triggers, pooling=pooling)[0]


def warm_up(folder: Path) -> None:
    """Build, pack and read a tiny checkpoint of every allow-listed architecture once, so a
    fork server imports the model modules transformers loads lazily before its children drop
    their privileges (`folder`: scratch space)."""
    transformers = _transformers()
    tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 8, "vocab_size": 16, "max_position_embeddings": 8,
            "dim": 8, "n_layers": 1, "n_heads": 2, "hidden_dim": 8, "num_key_value_heads": 1,
            "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8}
    triggers = TriggerSet(inputs=np.ones((1, 4), dtype=np.int64),
                          attention_mask=np.ones((1, 4), dtype=np.int64))
    checkpoint = folder / "warm-checkpoint"
    for config_class, classes in ARCHITECTURES.values():
        for name in classes:
            model = getattr(transformers, name)(getattr(transformers, config_class)(**tiny))
            model.save_pretrained(checkpoint)
            single = pack(checkpoint, folder / "warm.safetensors")
            layer = next(n for n, _ in model.named_modules()
                         if n.endswith(("layer.0", "layers.0", "h.0")))
            _, run = open_untrusted(single, layer=layer, pooling=bundle_pb2.POOLING_TOKEN_MEAN)
            run(triggers)
    for path in sorted(checkpoint.iterdir()):
        path.unlink()
    checkpoint.rmdir()
    (folder / "warm.safetensors").unlink()
