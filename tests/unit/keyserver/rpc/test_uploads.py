"""The upload spool's accounting: bytes held as they arrive, a share per principal, the quota
over all, every byte released when an upload ends however it ends (issue 18 5(b))."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.rpc.uploads import SPOOL_SEGMENT_BYTES, Spool, copied, sha256_of, spooled

CAP = 1000


def _header(data: bytes) -> pb.UploadHeader:
    return pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                           format=pb.MODEL_FORMAT_PT2)


def test_an_announced_size_holds_nothing_until_its_bytes_arrive(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, principal_share=0.5)
    data = bytes(range(250)) * 2
    seen: list[tuple[int, int]] = []

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 100):
            seen.append((spool.reserved, spool.held("alice")))
            yield data[start:start + 100]

    with spooled(chunks(), _header(data), cap=CAP, spool=spool, principal="alice",
                 suffix=".pt2") as path:
        assert path.read_bytes() == data
        assert (spool.reserved, spool.held("alice")) == (500, 500)
    assert seen == [(0, 0), (100, 100), (200, 200), (300, 300), (400, 400)]
    assert (spool.reserved, spool.held("alice")) == (0, 0)
    assert list(tmp_path.iterdir()) == []


def test_one_principal_never_holds_more_than_its_share(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, principal_share=0.5)
    data = b"x" * 400
    with spool.reserve("mallory") as held:
        held.grow(400)
        with pytest.raises(ServiceError) as caught, spooled(
                iter([data[:100], data[100:]]), _header(data), cap=CAP, spool=spool,
                principal="mallory", suffix=".pt2"):
            pass
        assert caught.value.code is ErrorCode.SPOOL_FULL
        assert "500-byte share" in str(caught.value) and caught.value.retry_after
        assert spool.held("mallory") == 400  # the refused upload's first chunk was released
        # Another principal still has the rest of the quota.
        with spooled(iter([data]), _header(data), cap=CAP, spool=spool, principal="bob",
                     suffix=".pt2") as path:
            assert path.read_bytes() == data
            assert spool.reserved == 800
    assert spool.reserved == 0
    assert list(tmp_path.iterdir()) == []


def test_the_quota_over_all_principals_still_holds(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, principal_share=0.5)
    with spool.reserve("a") as a, spool.reserve("b") as b:
        a.grow(450)
        b.grow(450)
        with spool.reserve("c") as c:
            c.grow(100)
            with pytest.raises(ServiceError, match="holding 1000 of its 1000-byte") as caught:
                c.grow(1)
            assert caught.value.code is ErrorCode.SPOOL_FULL
        assert spool.reserved == 900
    assert spool.reserved == 0


def test_an_upload_larger_than_a_share_is_refused_before_a_byte(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, principal_share=0.5)
    data = b"y" * 600

    def never() -> Iterator[bytes]:
        raise AssertionError("nothing may be read")
        yield b""

    with pytest.raises(ServiceError) as caught, spooled(
            never(), _header(data), cap=CAP, spool=spool, principal="alice", suffix=".pt2"):
        pass
    assert caught.value.code is ErrorCode.TOO_LARGE
    assert "500 bytes one principal may hold" in str(caught.value)


def test_a_stream_that_fails_midway_releases_what_it_held(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, principal_share=1.0)
    data = b"z" * 300

    def cut() -> Iterator[bytes]:
        yield data[:200]
        raise ServiceError(ErrorCode.UPLOAD_STALLED, "the stream lasted too long")

    with pytest.raises(ServiceError, match="too long"), spooled(
            cut(), _header(data), cap=CAP, spool=spool, principal="alice", suffix=".pt2"):
        pass
    assert (spool.reserved, spool.held("alice")) == (0, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_deferred_sha256_is_asked_once_the_chunks_end(tmp_path: Path) -> None:
    """A header without a SHA-256 takes the one the stream sent after its last chunk."""
    spool = Spool(tmp_path, quota_bytes=1000)
    data = b"deferred" * 20
    header = pb.UploadHeader(total_size=len(data), format=pb.MODEL_FORMAT_PT2)
    sent: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        yield data[:50]
        yield data[50:]
        sent.append(hashlib.sha256(data).digest())  # the trailer arrives as the chunks end

    with spooled(chunks(), header, cap=CAP, spool=spool, principal="alice", suffix=".pt2",
                 deferred=lambda: sent[0] if sent else None) as path:
        assert path.read_bytes() == data
        # Checked, and written into the header, where a verdict's suspect_sha256 is read.
        assert header.sha256 == hashlib.sha256(data).digest()
    header.ClearField("sha256")
    for trailer in (None, bytes(32)):
        with pytest.raises(ServiceError) as caught, spooled(
                iter([data]), header, cap=CAP, spool=spool, principal="alice", suffix=".pt2",
                deferred=lambda t=trailer: t):
            pass
        assert caught.value.code is ErrorCode.UPLOAD_CORRUPT
    assert list(tmp_path.iterdir()) == [] and spool.reserved == 0


def _sealed(path: Path) -> bool:
    """Whether a write to the file at `path`, through a fresh read-write descriptor, fails."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, b"changed")
    except PermissionError:  # F_SEAL_WRITE: EPERM for any writer, the server included
        return True
    finally:
        os.close(fd)
    return False


def test_an_upload_within_the_memory_budget_is_a_sealed_memory_file(tmp_path: Path) -> None:
    """Issue 20: no byte on disk, and no byte changeable once hashed (what the child maps is
    what the verdict names); the budget is given back when the upload ends."""
    spool = Spool(tmp_path, quota_bytes=1000, memory_bytes=600)
    data = bytes(range(200)) * 2
    with spooled(iter([data[:150], data[150:]]), _header(data), cap=CAP, spool=spool,
                 principal="alice", suffix=".pt2") as path:
        assert list(tmp_path.iterdir()) == []  # nothing in the disk spool
        assert path.read_bytes() == data and path.stat().st_size == len(data)
        assert _sealed(path)
        assert path.read_bytes() == data
        assert (spool.in_memory, spool.reserved) == (400, 400)  # the quota still counts it
    assert (spool.in_memory, spool.reserved) == (0, 0)


def test_an_upload_past_the_memory_budget_is_spooled_to_disk_as_ciphertext(
        tmp_path: Path) -> None:
    """The budget chooses where bytes go and refuses nothing: an upload that does not fit
    what the open ones leave of it (mere concurrency) goes to the disk spool, sealed as it
    arrives, so no byte of it is on disk in the clear while it streams; once it checks out
    it is decrypted into a sealed memory file like any other, and its spool file is gone
    before the handler sees it."""
    spool = Spool(tmp_path, quota_bytes=100_000, memory_bytes=50_000)
    first, second = os.urandom(30_000), os.urandom(40_000)
    on_disk: list[bytes] = []

    def arriving() -> Iterator[bytes]:
        for start in range(0, len(second), 10_000):
            yield second[start:start + 10_000]
            [spooled_file] = tmp_path.iterdir()
            on_disk.append(spooled_file.read_bytes())

    with spooled(iter([first]), _header(first), cap=100_000, spool=spool, principal="alice",
                 suffix=".pt2") as held:
        assert spool.in_memory == 30_000 and list(tmp_path.iterdir()) == []
        with spooled(arriving(), _header(second), cap=100_000, spool=spool,
                     principal="bob", suffix=".pt2") as path:
            assert list(tmp_path.iterdir()) == []  # removed once read back
            assert path.read_bytes() == second and _sealed(path)
            assert held.read_bytes() == first
            assert spool.in_memory == 30_000 and spool.reserved == 70_000
    # The file grew as the chunks came (a trickle reaches the disk within one segment), and
    # never held a 16-byte run of the plaintext.
    sealed = SPOOL_SEGMENT_BYTES + 16  # a segment and its tag
    whole = len(second) + 16 * -(-len(second) // SPOOL_SEGMENT_BYTES)
    assert [len(b) for b in on_disk] == [
        n // SPOOL_SEGMENT_BYTES * sealed for n in (10_000, 20_000, 30_000)] + [whole]
    windows = {second[i:i + 16] for i in range(0, len(second) - 16, 8)}
    assert not any(w in b for b in on_disk for w in windows)
    assert list(tmp_path.iterdir()) == [] and (spool.in_memory, spool.reserved) == (0, 0)


@pytest.mark.parametrize("tamper", ["flip", "truncate", "extend"])
def test_a_spool_file_changed_on_disk_is_refused_as_corrupt(tmp_path: Path,
                                                            tamper: str) -> None:
    """Someone (or the disk) changes, cuts or extends a spooled upload's file before it is
    read back: it does not authenticate, the upload is refused UPLOAD_CORRUPT with a message
    that names no path, and everything it held is released."""
    spool = Spool(tmp_path, quota_bytes=100_000)
    data = os.urandom(50_000)

    def chunks() -> Iterator[bytes]:
        yield data[:40_000]
        yield data[40_000:]
        [spooled_file] = tmp_path.iterdir()  # every byte is in it now, sealed
        with spooled_file.open("r+b") as handle:
            if tamper == "flip":
                handle.seek(100)
                byte = handle.read(1)
                handle.seek(100)
                handle.write(bytes([byte[0] ^ 1]))
            elif tamper == "truncate":
                handle.truncate(spooled_file.stat().st_size - 1)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\0")

    with pytest.raises(ServiceError) as caught, spooled(
            chunks(), _header(data), cap=100_000, spool=spool, principal="alice",
            suffix=".pt2"):
        pytest.fail("a damaged spool file must not be handed out")
    assert caught.value.code is ErrorCode.UPLOAD_CORRUPT
    assert "re-send" in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert list(tmp_path.iterdir()) == [] and spool.reserved == 0


def test_a_refused_memory_upload_gives_its_budget_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, quota_bytes=1000, memory_bytes=1000)
    data = b"c" * 300
    header = _header(data)
    header.sha256 = bytes(32)  # not the bytes' SHA-256
    with pytest.raises(ServiceError) as caught, spooled(
            iter([data]), header, cap=CAP, spool=spool, principal="alice", suffix=".pt2"):
        pass
    assert caught.value.code is ErrorCode.UPLOAD_CORRUPT
    assert (spool.in_memory, spool.reserved) == (0, 0)


def test_a_named_file_is_copied_sealed_and_hashed_from_the_copy(tmp_path: Path) -> None:
    """A file the server reads itself (`modelroot`): the kernel copies it into a sealed
    memory file, whatever is left of the memory budget (a public file, judged at once),
    reserved whole in the quota; its SHA-256 is the copy's (`sha256_of`), and a file
    shorter than measured is refused."""
    source = tmp_path / "model.pt2"
    data = b"named model" * 200
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        header = pb.UploadHeader(total_size=len(data), format=pb.MODEL_FORMAT_PT2)
        for budget in (10_000, 0):
            spool = Spool(tmp_path / "spool", quota_bytes=10_000, memory_bytes=budget)
            with copied(fd, header, cap=10_000, spool=spool, principal="alice",
                        suffix=".pt2") as path:
                assert path.read_bytes() == data and _sealed(path)
                assert (spool.in_memory, spool.reserved) == (0, len(data))
                assert not (tmp_path / "spool").exists() or \
                    list((tmp_path / "spool").iterdir()) == []
                assert sha256_of(path) == hashlib.sha256(data).digest()
            assert spool.reserved == 0
        longer = pb.UploadHeader(total_size=len(data) + 10, format=pb.MODEL_FORMAT_PT2)
        with pytest.raises(ServiceError, match="changed size while it was read") as caught, \
                copied(fd, longer, cap=10_000, spool=spool, principal="alice", suffix=".pt2"):
            pass
        assert caught.value.code is ErrorCode.UPLOAD_CORRUPT
    finally:
        os.close(fd)
    assert spool.reserved == 0
