"""Secret files: one writer (`write_private`) for bundles, trigger sets and server key files."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from freemark import secretfile
from freemark.scheme.bundle import KeyBundle, MarginReport, load_bundle, save_bundle
from freemark.scheme.triggers import TriggerSet, load_triggers, save_triggers
from freemark.secretfile import write_private
from freemark.v1 import bundle_pb2


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: a file created with the default mode would come out world-readable."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_a_new_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert _mode(path) == 0o600


def test_a_strict_umask_does_not_make_the_file_unwritable(tmp_path: Path) -> None:
    previous = os.umask(0o277)
    try:
        write_private(tmp_path / "secret.bin", b"secret")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "secret.bin") == 0o600


@pytest.mark.usefixtures("open_umask")
def test_replacing_a_file_swaps_in_a_new_0600_one_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old_inode = path.stat().st_ino
    write_private(path, b"new")
    # A new inode moved into place in one step: a reader holding the old file keeps it whole.
    assert path.stat().st_ino != old_inode
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.bin"
    write_private(path, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(secretfile.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_private(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["secret.bin"]


def test_exclusive_refuses_an_existing_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    write_private(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_private(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.bin"]


def test_a_symlink_at_the_target_is_refused_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"untouched")
    link = tmp_path / "secret.bin"
    link.symlink_to(elsewhere)
    with pytest.raises(OSError) as caught:
        write_private(link, b"secret")
    assert caught.value.errno == errno.ELOOP
    assert link.is_symlink() and elsewhere.read_bytes() == b"untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "secret.bin"]


def _triggers() -> TriggerSet:
    rng = np.random.default_rng(0)
    return TriggerSet(
        inputs=rng.normal(size=(4, 8)).astype(np.float32), labels=np.arange(4, dtype=np.int64)
    )


@pytest.mark.usefixtures("open_umask")
def test_a_triggers_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "triggers.npz"
    triggers = _triggers()
    save_triggers(path, triggers)
    assert _mode(path) == 0o600
    loaded = load_triggers(path)
    np.testing.assert_array_equal(loaded.inputs, triggers.inputs)
    assert loaded.labels is not None
    np.testing.assert_array_equal(loaded.labels, triggers.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["triggers.npz"]


@pytest.mark.usefixtures("open_umask")
def test_a_bundle_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    bundle = KeyBundle(
        layer="act",
        pooling=bundle_pb2.POOLING_NONE,
        triggers=_triggers(),
        owner="alice",
        nonce=b"\x01" * 32,
        n_bits=16,
        key=np.ones((16, 8), dtype=np.float32),
        anchor_seed=b"\x02" * 32,
        margins=MarginReport(target=1.0, min=1.0, median=1.0, mean=1.0),
        host_fingerprint=b"\x03" * 32,
    )
    path = tmp_path / "model.fmk"
    save_bundle(path, bundle)
    assert _mode(path) == 0o600
    np.testing.assert_array_equal(load_bundle(path).key, bundle.key)
    assert [p.name for p in tmp_path.iterdir()] == ["model.fmk"]
