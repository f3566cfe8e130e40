"""The packed checkpoint's bytes, produced as they are read, are safetensors' own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from freemark.formats.packing import Packed


def tensors() -> dict[str, torch.Tensor]:
    """Every float dtype a checkpoint may store, names that sort differently from the dtypes,
    an empty tensor, and a non-contiguous one (written as its values, row by row)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(7, 3, generator=generator).to(torch.bfloat16),
        "a.weight": torch.randn(5, generator=generator).to(torch.float16),
        "b.bias": torch.randn(2, 9, generator=generator),
        "m.norm": torch.randn(3, generator=generator).to(torch.float64),
        "e.empty": torch.zeros(0, 4),
        "t.transposed": torch.randn(4, 6, generator=generator).t(),
        "aa": torch.randn(1, generator=generator).to(torch.bfloat16),
    }


def test_a_packed_stream_is_the_file_safetensors_writes(tmp_path: Path) -> None:
    metadata = {"freemark.config": '{"model_type": "llama", "q": "a \\"quoted\\" name é"}'}
    values = tensors()
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp_path / "lib.safetensors"),
              metadata=metadata)
    expected = (tmp_path / "lib.safetensors").read_bytes()
    packed = Packed(values, metadata)
    assert packed.size == len(expected)
    assert packed.write(tmp_path / "ours.safetensors").read_bytes() == expected
    assert (tmp_path / "ours.safetensors").stat().st_mode & 0o777 == 0o600
    assert packed.sha256() == hashlib.sha256(expected).digest()
    for chunk_size in (1, 7, 64, 1000, len(expected) + 1):
        chunks = list(packed.chunks(chunk_size))
        assert b"".join(chunks) == expected
        assert all(len(c) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size


def test_only_floats_are_packed() -> None:
    with pytest.raises(ValueError, match="int64"):
        Packed({"ids": torch.zeros(3, dtype=torch.int64)}, {})
