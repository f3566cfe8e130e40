"""Watermark bits: bound to owner and nonce, deterministic, in range."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from freemark.errors import InvalidInputError
from freemark.scheme.watermark import DOMAIN, commitment, new_nonce, watermark_bits


def test_bits_are_the_shake256_stream_of_owner_and_nonce() -> None:
    nonce = bytes(range(32))
    owner = "alice"
    expected_stream = hashlib.shake_256(DOMAIN + b"\x00\x00\x00\x05alice" + nonce).digest(4)
    bits = watermark_bits(owner, nonce, 32)
    assert np.packbits(bits).tobytes() == expected_stream


@given(st.text(min_size=1, max_size=40), st.integers(16, 8192))
def test_bits_are_deterministic_and_binary(owner: str, n: int) -> None:
    nonce = b"\x07" * 32
    bits = watermark_bits(owner, nonce, n)
    assert bits.shape == (n,) and set(np.unique(bits)) <= {0, 1}
    assert np.array_equal(bits, watermark_bits(owner, nonce, n))


def test_different_owner_or_nonce_gives_different_bits() -> None:
    nonce = new_nonce()
    a = watermark_bits("alice", nonce, 256)
    assert not np.array_equal(a, watermark_bits("mallory", nonce, 256))
    assert not np.array_equal(a, watermark_bits("alice", new_nonce(), 256))
    assert commitment(a) != commitment(watermark_bits("alice", new_nonce(), 256))


@pytest.mark.parametrize("n", [0, 15, 8193, -1])
def test_out_of_range_lengths_are_refused(n: int) -> None:
    with pytest.raises(InvalidInputError, match=r"\[16, 8192\]"):
        watermark_bits("alice", b"\x00" * 32, n)


def test_bad_nonce_and_empty_owner_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="nonce"):
        watermark_bits("alice", b"short", 64)
    with pytest.raises(InvalidInputError, match="owner"):
        watermark_bits("", b"\x00" * 32, 64)
