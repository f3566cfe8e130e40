"""A thief's tools: a `save_pretrained` decoder checkpoint converted to GGUF and quantized.

`write_gguf` does what llama.cpp's `convert_hf_to_gguf.py` does for the families freemark
reads: the architecture and its sizes in the metadata (`general.architecture`, `ARCH.*`
keys), tensors renamed with gguf's `TensorNameMap`, the rows of Q and K permuted for
llama-architecture models (`LlamaModel.permute`), GPT-2's Conv1D weights transposed and its
tied head written as a copy of the embedding, 1-d tensors kept F32 (as `llama-quantize`
keeps norms and biases). 2-d tensors are stored in the requested type: F32, F16 and the
types `gguf.quants.quantize` has a quantizer for (BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), and
Q4_K, Q5_K and Q6_K through the encoders below (`ENCODERS`), since gguf-py only dequantizes
those; or llama.cpp's Q4_K_M mix (`_type_of`). A k-quant whose 256-value blocks do not fit
a tensor's rows falls back as llama-quantize does.

The encoders are plain, following the layouts `gguf.quants` dequantizes. A Q4_K block holds
256 values as 8 sub-blocks of 32, and 144 bytes: `d` and `dmin` (float16), 12 bytes packing
8 six-bit scales and 8 six-bit mins, and 128 bytes of 4-bit quants (sub-block 2i in the low
nibbles of bytes 32i..32i+31, sub-block 2i+1 in their high nibbles); value = d * scale_j * q
- dmin * min_j. Each sub-block gets the affine grid from min(0, its minimum) to its maximum;
the grid's step and offset are then rounded to 6-bit multiples of the block's `d` and
`dmin`. Q5_K is the same with 5-bit quants (their fifth bits in 32 more bytes), Q6_K a
symmetric grid per 16 values (see `quantize_q6_k`). llama.cpp's own encoders search the
scales a little harder (`make_qkx2_quants`); the formats, and so the thief's error budget,
are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_GPT2_TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
QK_K = 256


def _pack_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block into the 12 bytes `Q4_K.get_scale_min` unpacks."""
    sc, mn = scales.astype(np.uint8), mins.astype(np.uint8)
    out = np.zeros((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _affine_k(values: np.ndarray, levels: int, name: str
              ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """Q4_K's and Q5_K's common part: per 256-value block, 8 sub-blocks of 32 on the affine
    grid from min(0, the sub-block's minimum) to its maximum in `levels` steps, the grid's
    step and offset rounded to 6-bit multiples of the block's `d` and `dmin`. Returns the
    quants (n, 8, 32), the rows' shape, and the block heads (d, dmin, packed scales)."""
    rows = np.asarray(values, dtype=np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"{name} rows hold whole blocks of {QK_K} values, not {rows.shape[-1]}")
    blocks = rows.reshape(-1, 8, 32)
    low = np.minimum(blocks.min(axis=-1), 0.0)  # (n, 8): each sub-block's grid offset
    step = (blocks.max(axis=-1) - low) / levels  # (n, 8): each sub-block's grid step
    d = (step.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)  # (n,)
    dmin = ((-low).max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d[:, None] > 0, np.rint(step / d[:, None]), 0).clip(0, 63)
        mins = np.where(dmin[:, None] > 0, np.rint(-low / dmin[:, None]), 0).clip(0, 63)
        scale = (d[:, None] * scales)[..., None]
        offset = (dmin[:, None] * mins)[..., None]
        quants = np.where(scale > 0, np.rint((blocks + offset) / scale), 0).clip(0, levels)
    heads = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                            dmin.astype(np.float16).view(np.uint8).reshape(-1, 2),
                            _pack_scales(scales, mins)], axis=-1)
    return quants.astype(np.uint8), rows.shape, heads


def _nibbles(quants: np.ndarray) -> np.ndarray:
    """Sub-blocks 2i and 2i+1 in the low and high nibbles of 32 bytes each (128 per block)."""
    pairs = (quants & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(-1, 128)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """`values` (rows a multiple of 256 long) as Q4_K blocks (144 bytes: d, dmin, scales,
    4-bit quants), in gguf's byte shape."""
    quants, shape, heads = _affine_k(values, 15, "Q4_K")
    out = np.concatenate([heads, _nibbles(quants)], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """`values` (rows a multiple of 256 long) as Q5_K blocks (176 bytes: d, dmin, scales, 32
    bytes whose bit j is sub-block j's fifth bit, then the low nibbles as Q4_K's), in gguf's
    byte shape."""
    quants, shape, heads = _affine_k(values, 31, "Q5_K")
    high = sum(((quants[:, j, :] >> 4) & 1) << j for j in range(8)).astype(np.uint8)
    out = np.concatenate([heads, high.reshape(-1, 32), _nibbles(quants)], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 176)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """`values` (rows a multiple of 256 long) as Q6_K blocks, in gguf's byte shape: per
    block 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 sub-block scales and a
    float16 `d`; value = d * scale_j * (q - 32), one scale per 16 values. Each sub-block's
    scale maps its largest magnitude to 31 before `d` rounds the scales to int8."""
    rows = np.asarray(values, dtype=np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"Q6_K rows hold whole blocks of {QK_K} values, not {rows.shape[-1]}")
    blocks = rows.reshape(-1, QK_K)
    sub = blocks.reshape(-1, 16, 16)
    wanted = np.abs(sub).max(axis=-1) / 31.0  # (n, 16)
    d = (wanted.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)  # (n,)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d[:, None] > 0, np.rint(wanted / d[:, None]), 0).clip(-128, 127)
        step = (d[:, None] * scales)[..., None]
        quants = np.where(step > 0, np.rint(sub / step), 0).clip(-32, 31)
    u = (quants + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (n, half, group, 32)
    low = (u[:, :, 0:2, :] & 0x0F) | ((u[:, :, 2:4, :] & 0x0F) << 4)  # (n, half, 2, 32)
    high = sum(((u[:, :, k, :] >> 4) & 0x03) << (2 * k) for k in range(4))  # (n, half, 32)
    out = np.concatenate([low.reshape(-1, 128), high.astype(np.uint8).reshape(-1, 64),
                          scales.astype(np.int8).view(np.uint8),
                          d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=-1)
    return out.reshape(*rows.shape[:-1], rows.shape[-1] // QK_K * 210)


# The types gguf-py decodes but cannot encode: our encoders.
ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of Q or K rows (what the reader undoes)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encoded(values: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    import gguf

    if values.ndim == 1 or qtype == "F32":
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in ENCODERS:
        return ENCODERS[qtype](values), kind
    return gguf.quants.quantize(values.astype(np.float32), kind), kind


# llama-quantize's fallback for a tensor whose rows are not whole 256-value blocks.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _type_of(name: str, row: int, qtype: str) -> str:
    """The type a tensor of `row`-value rows is stored in: `qtype`, or for "Q4_K_M"
    llama.cpp's mix, Q6_K for the attention values, the MLP's down projection and the output
    head and Q4_K for the rest (llama-quantize gives Q6_K to only some layers' attn_v and
    ffn_down; all is stricter); a k-quant whose blocks do not fit the rows falls back as
    llama-quantize does (Q4_K to Q5_0, Q6_K to Q8_0)."""
    if qtype == "Q4_K_M":
        qtype = "Q6_K" if name.split(".")[-2] in ("attn_v", "ffn_down", "output") else "Q4_K"
    return _K_FALLBACK[qtype] if qtype in _K_FALLBACK and row % QK_K else qtype


def _metadata(writer: object, config: dict[str, object], arch: str) -> None:
    if arch == "gpt2":
        hidden = int(config["n_embd"])  # type: ignore[call-overload]
        writer.add_context_length(config["n_positions"])  # type: ignore[attr-defined]
        writer.add_embedding_length(hidden)  # type: ignore[attr-defined]
        writer.add_block_count(config["n_layer"])  # type: ignore[attr-defined]
        writer.add_feed_forward_length(config.get("n_inner") or 4 * hidden)  # type: ignore[attr-defined]
        writer.add_head_count(config["n_head"])  # type: ignore[attr-defined]
        writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))  # type: ignore[attr-defined]
        return
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])  # type: ignore[attr-defined]
    writer.add_embedding_length(config["hidden_size"])  # type: ignore[attr-defined]
    writer.add_block_count(config["num_hidden_layers"])  # type: ignore[attr-defined]
    writer.add_feed_forward_length(config["intermediate_size"])  # type: ignore[attr-defined]
    writer.add_head_count(heads)  # type: ignore[attr-defined]
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)  # type: ignore[attr-defined]
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))  # type: ignore[attr-defined]
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))  # type: ignore[attr-defined]
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])  # type: ignore[attr-defined]
        writer.add_value_length(config["head_dim"])  # type: ignore[attr-defined]


def _rope_theta(config: dict[str, object]) -> None:
    """transformers 5 keeps rope_theta under rope_parameters; llama.cpp reads either."""
    params = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(params, dict) and "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]


def write_gguf(checkpoint: Path, out: Path, qtype: str = "Q8_0") -> Path:
    """Convert a `save_pretrained` directory (config.json, model.safetensors) to a GGUF file
    whose 2-d tensors are `qtype` (a ggml type name, or "Q4_K_M": see `_type_of`)."""
    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    _rope_theta(config)
    model_type = config["model_type"]
    arch = ARCH_OF[model_type]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    layers = config["n_layer"] if arch == "gpt2" else config["num_hidden_layers"]
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(checkpoint.name)
    _metadata(writer, config, arch)
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    for name, values in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        values = values.astype(np.float32)
        if arch == "gpt2" and name.endswith(_GPT2_TRANSPOSED):
            values = values.T.copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = _permute(values, heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = _permute(values, kv_heads)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for {name}")
        data, kind = _encoded(values, _type_of(new_name, values.shape[-1], qtype))
        writer.add_tensor(new_name, data, raw_dtype=kind)
        if arch == "gpt2" and new_name == "token_embd.weight":  # the tied head, as a copy
            writer.add_tensor("output.weight", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
