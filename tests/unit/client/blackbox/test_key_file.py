"""The output key file: encrypted at rest, mode 0600, a round trip exact, tampering refused."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import numpy as np
import pytest

import blackbox_models as bm
from freemark.blackbox.key import (
    FILE_MAGIC,
    OutputKey,
    encode_output_key,
    is_output_key,
    load_output_key,
    save_output_key,
)
from freemark.errors import InvalidInputError

SECRET = b"correct horse battery"


def _same(a: OutputKey, b: OutputKey) -> None:
    for spec in dataclasses.fields(OutputKey):
        left, right = getattr(a, spec.name), getattr(b, spec.name)
        if isinstance(left, np.ndarray):
            assert left.dtype == right.dtype and np.array_equal(left, right), spec.name
        else:
            assert left == right, spec.name


def test_round_trip_is_exact_and_nothing_is_in_the_clear(tmp_path: Path) -> None:
    key = bm.output_key()
    path = tmp_path / "alice.fmo"
    save_output_key(path, key, SECRET)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert is_output_key(path)
    _same(load_output_key(path, SECRET), key)
    data = path.read_bytes()
    plain = encode_output_key(key)
    # Neither the serialized fields, nor the queries' bytes, nor the owner appear on disk.
    for needle in (plain[:64], key.queries[:4].tobytes(), key.owner.encode(), key.nonce):
        assert needle not in data
    assert data.startswith(FILE_MAGIC)


def test_wrong_passphrase_and_tampering_give_one_opaque_error(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_output_key(path, bm.output_key(), SECRET)
    with pytest.raises(InvalidInputError, match="wrong passphrase or a damaged file"):
        load_output_key(path, b"not the passphrase")
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="wrong passphrase or a damaged file"):
        load_output_key(path, SECRET)


def test_refuses_a_short_passphrase_and_an_inconsistent_key(tmp_path: Path) -> None:
    key = bm.output_key()
    with pytest.raises(InvalidInputError, match="at least 8"):
        save_output_key(tmp_path / "k", key, b"short")
    broken = dataclasses.replace(key, folds=key.folds + 2)
    with pytest.raises(InvalidInputError, match="folds"):
        save_output_key(tmp_path / "k", broken, SECRET)
    assert not (tmp_path / "k").exists()
