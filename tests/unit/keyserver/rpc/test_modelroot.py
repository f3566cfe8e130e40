"""Confinement of models named under the operator's model root (`rpc.modelroot`, issue 20):
real files, directories, links and a FIFO in a temporary root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.rpc.modelroot import MAX_NAME_CHARS, open_named


@pytest.fixture
def root(tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    (mirror / "org" / "model").mkdir(parents=True)
    (mirror / "org" / "model" / "weights.safetensors").write_bytes(b"w" * 3_000_000)
    (tmp_path / "secret.pt2").write_bytes(b"not under the root")
    (mirror / "org" / "out.pt2").symlink_to(tmp_path / "secret.pt2")
    (mirror / "org" / "in.pt2").symlink_to(mirror / "org" / "model" / "weights.safetensors")
    (mirror / "up").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(mirror / "org" / "pipe")
    return mirror


def test_a_file_under_the_root_is_opened_read_only(root: Path) -> None:
    fd = open_named(root, "org/model/weights.safetensors")
    try:
        assert os.pread(fd, 4_000_000, 0) == b"w" * 3_000_000
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


@pytest.mark.parametrize(("name", "code", "words"), [
    ("../secret.pt2", ErrorCode.MALFORMED_REQUEST, "relative path of plain names"),
    ("/etc/hostname", ErrorCode.MALFORMED_REQUEST, "relative path of plain names"),
    ("org//model/weights.safetensors", ErrorCode.MALFORMED_REQUEST, "relative path"),
    ("org/./model/weights.safetensors", ErrorCode.MALFORMED_REQUEST, "relative path"),
    ("", ErrorCode.MALFORMED_REQUEST, "1 to"),
    ("x" * (MAX_NAME_CHARS + 1), ErrorCode.MALFORMED_REQUEST, "1 to"),
    ("org/na\0me", ErrorCode.MALFORMED_REQUEST, "without NUL"),
    ("org/out.pt2", ErrorCode.PERMISSION_DENIED, "'org/out.pt2' is a symbolic link"),
    ("org/in.pt2", ErrorCode.PERMISSION_DENIED, "is a symbolic link"),  # even inside the root
    ("up/secret.pt2", ErrorCode.PERMISSION_DENIED, "'up' is a symbolic link"),
    ("org/missing.pt2", ErrorCode.NOT_FOUND, "does not exist"),
    ("org/model/weights.safetensors/x", ErrorCode.NOT_FOUND, "does not exist"),
    ("org/pipe", ErrorCode.MALFORMED_REQUEST, "not a regular file"),
    ("org/model", ErrorCode.MALFORMED_REQUEST, "not a regular file"),
])
def test_names_that_leave_the_root_or_name_no_file_are_refused(
        root: Path, name: str, code: ErrorCode, words: str) -> None:
    with pytest.raises(ServiceError) as caught:
        open_named(root, name)
    assert caught.value.code is code and words in str(caught.value), str(caught.value)
    assert str(root) not in str(caught.value) and str(root.parent) not in str(caught.value)


def test_a_server_without_a_model_root_reads_no_names(root: Path) -> None:
    with pytest.raises(ServiceError) as caught:
        open_named(None, "org/model/weights.safetensors")
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    assert "--model-root" in str(caught.value) and "upload the file" in str(caught.value)
