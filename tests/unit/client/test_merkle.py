"""The Merkle log: RFC 6962 test vectors, proof properties, signed checkpoints and audits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freemark.merkle import (
    EMPTY_ROOT,
    Checkpoint,
    LogProofError,
    SignedCheckpoint,
    audit_entries,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    sign_checkpoint,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from freemark_keyserver.crypto import SigningKey

# --- RFC 6962 vectors (certificate-transparency-go / transparency-dev merkle testonly) ------

VECTOR_DATA = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
VECTOR_LEAVES = [leaf_hash(data) for data in VECTOR_DATA]
VECTOR_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

# (leaf index, tree size, audit path); the upstream tables count leaves from 1, these from 0.
INCLUSION_VECTORS = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# (old size, new size, consistency proof)
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def _hashes(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("size", range(len(VECTOR_ROOTS)))
def test_roots_match_the_rfc6962_vectors(size: int) -> None:
    assert root(VECTOR_LEAVES[:size]).hex() == VECTOR_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION_VECTORS)
def test_inclusion_proofs_match_the_rfc6962_vectors(index: int, size: int, path: list[str]) -> None:
    leaves = VECTOR_LEAVES[:size]
    assert inclusion_proof(leaves, index) == _hashes(path)
    verify_inclusion(leaves[index], index, size, _hashes(path), bytes.fromhex(VECTOR_ROOTS[size]))


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_VECTORS)
def test_consistency_proofs_match_the_rfc6962_vectors(old: int, new: int, proof: list[str]) -> None:
    assert consistency_proof(VECTOR_LEAVES[:new], old) == _hashes(proof)
    old_root, new_root = (bytes.fromhex(VECTOR_ROOTS[size]) for size in (old, new))
    verify_consistency(old, new, old_root, new_root, _hashes(proof))


# --- properties over random trees ----------------------------------------------------------

MAX_LEAVES = 300
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(2 * MAX_LEAVES)]


def _reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 §2.1, slow but obviously right."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


def _flip(proof: list[bytes], element: int, byte: int, bit: int) -> list[bytes]:
    changed = bytearray(proof[element])
    changed[byte] ^= 1 << bit
    return [*proof[:element], bytes(changed), *proof[element + 1 :]]


@given(size=st.integers(0, 130))
def test_root_agrees_with_the_rfc_definition(size: int) -> None:
    assert root(LEAVES[:size]) == _reference_root(LEAVES[:size])


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, MAX_LEAVES))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, MAX_LEAVES))
    return draw(st.integers(1, new)), new


@given(tree_and_index())
def test_every_inclusion_proof_verifies(case: tuple[int, int]) -> None:
    size, index = case
    leaves = LEAVES[:size]
    verify_inclusion(leaves[index], index, size, inclusion_proof(leaves, index), root(leaves))


@settings(max_examples=200)
@given(tree_and_index(), st.data())
def test_a_tampered_inclusion_proof_is_rejected(case: tuple[int, int], data: st.DataObject) -> None:
    size, index = case
    leaves = LEAVES[:size]
    proof, tree_root = inclusion_proof(leaves, index), root(leaves)

    def rejects(leaf: bytes, at: int, tree_size: int, path: list[bytes]) -> None:
        with pytest.raises(LogProofError):
            verify_inclusion(leaf, at, tree_size, path, tree_root)

    if size > 1:
        element = data.draw(st.integers(0, len(proof) - 1))
        byte, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
        rejects(leaves[index], index, size, _flip(proof, element, byte, bit))
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index))
        rejects(leaves[index], other, size, proof)
        rejects(leaves[index], index, size, proof[:-1])
    rejects(leaves[index], index, size, [*proof, tree_root])
    rejects(LEAVES[size], index, size, proof)
    # Doubling or halving the size changes the path's shape. (A size off by one can keep the
    # shape: the signed checkpoint, not the proof, is what binds the size to the root.)
    rejects(leaves[index], index, 2 * size, proof)
    if index < size // 2:
        rejects(leaves[index], index, size // 2, proof)


@given(two_sizes())
def test_every_consistency_proof_verifies(sizes: tuple[int, int]) -> None:
    old, new = sizes
    proof = consistency_proof(LEAVES[:new], old)
    verify_consistency(old, new, root(LEAVES[:old]), root(LEAVES[:new]), proof)


@settings(max_examples=200)
@given(two_sizes().filter(lambda s: s[0] < s[1]), st.data())
def test_a_tampered_consistency_proof_is_rejected(
    sizes: tuple[int, int], data: st.DataObject
) -> None:
    old, new = sizes
    proof = consistency_proof(LEAVES[:new], old)
    old_root, new_root = root(LEAVES[:old]), root(LEAVES[:new])

    def rejects(old_size: int, new_size: int, a: bytes, b: bytes, path: list[bytes]) -> None:
        with pytest.raises(LogProofError):
            verify_consistency(old_size, new_size, a, b, path)

    element = data.draw(st.integers(0, len(proof) - 1))
    byte, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
    rejects(old, new, old_root, new_root, _flip(proof, element, byte, bit))
    other_old = data.draw(st.integers(1, new).filter(lambda m: m != old))
    rejects(other_old, new, old_root, new_root, proof)
    rejects(old, 2 * new, old_root, new_root, proof)
    rejects(old, new, old_root, root(LEAVES[: new + 1]), proof)  # a fork after `old`
    rejects(old, new, root(LEAVES[1 : old + 1]), new_root, proof)  # a rewritten history
    rejects(old, new, old_root, new_root, proof[:-1])
    rejects(old, new, old_root, new_root, [*proof, new_root])
    rejects(old, new, old_root, new_root, [])


@pytest.mark.parametrize(
    ("old", "new", "old_root", "new_root", "proof", "message"),
    [
        (5, 4, VECTOR_ROOTS[5], VECTOR_ROOTS[4], [], "cannot shrink"),
        (0, 3, VECTOR_ROOTS[0], VECTOR_ROOTS[3], [], "empty tree proves nothing"),
        (3, 3, VECTOR_ROOTS[3], VECTOR_ROOTS[4], [], "a fork"),
        (3, 3, VECTOR_ROOTS[3], VECTOR_ROOTS[3], [VECTOR_ROOTS[0]], "empty consistency proof"),
        (3, 5, VECTOR_ROOTS[3][:10], VECTOR_ROOTS[5], [], "expected a 32-byte hash"),
    ],
)
def test_consistency_edge_cases_are_refused(
    old: int, new: int, old_root: str, new_root: str, proof: list[str], message: str
) -> None:
    with pytest.raises(LogProofError, match=message):
        verify_consistency(
            old, new, bytes.fromhex(old_root), bytes.fromhex(new_root), _hashes(proof)
        )


def test_equal_sizes_with_equal_roots_are_consistent() -> None:
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(4, 4, bytes.fromhex(VECTOR_ROOTS[4]), bytes.fromhex(VECTOR_ROOTS[4]), [])


@pytest.mark.parametrize(("index", "size"), [(0, 0), (3, 3), (-1, 3)])
def test_an_index_outside_the_tree_is_refused(index: int, size: int) -> None:
    with pytest.raises(LogProofError, match="outside a tree"):
        verify_inclusion(VECTOR_LEAVES[0], index, size, [], EMPTY_ROOT)
    with pytest.raises(ValueError, match="outside a tree"):
        inclusion_proof(VECTOR_LEAVES[:size], index)


@pytest.mark.parametrize("old", [0, 9])
def test_a_consistency_proof_needs_a_nonempty_prefix(old: int) -> None:
    with pytest.raises(ValueError, match="must be in 1..8"):
        consistency_proof(VECTOR_LEAVES, old)


# --- checkpoints and audits ----------------------------------------------------------------

SIGNER = SigningKey.generate()
ORIGIN = "freemark.test/log"
ENTRIES = [f'{{"registration":"reg-{i:04d}"}}'.encode() for i in range(23)]
CHECKPOINT_SIZES = [0, 1, 4, 4, 9, 16, 23]


def _checkpoint(entries: list[bytes], size: int, timestamp: int) -> SignedCheckpoint:
    tree_root = root([leaf_hash(entry) for entry in entries[:size]])
    return sign_checkpoint(SIGNER, Checkpoint(ORIGIN, size, tree_root, timestamp, SIGNER.key_id))


def _history() -> list[SignedCheckpoint]:
    return [
        _checkpoint(ENTRIES, size, 1_700_000_000 + 60 * n)
        for n, size in enumerate(CHECKPOINT_SIZES)
    ]


def test_a_signed_checkpoint_verifies() -> None:
    for signed in _history():
        verify_checkpoint(SIGNER.verifier(), signed)


def test_the_signed_body_is_canonical_json_with_a_hex_root() -> None:
    checkpoint = Checkpoint(ORIGIN, 2, bytes(range(32)), 1_700_000_000, "00ff")
    assert checkpoint.signed_body() == (
        b'{"key_id":"00ff","kind":"freemark/v1/checkpoint","origin":"freemark.test/log",'
        b'"root_hash":"' + bytes(range(32)).hex().encode() + b'",'
        b'"timestamp":1700000000,"tree_size":2}'
    )


def test_a_checkpoint_for_another_key_is_not_signed() -> None:
    checkpoint = Checkpoint(ORIGIN, 0, EMPTY_ROOT, 0, "not-this-key")
    with pytest.raises(ValueError, match="signer is"):
        sign_checkpoint(SIGNER, checkpoint)


def test_an_honest_log_passes_the_audit() -> None:
    audit_entries(ENTRIES, _history(), SIGNER.verifier())
    audit_entries(ENTRIES + [b"not yet checkpointed"], _history(), SIGNER.verifier())


@dataclass(frozen=True)
class Tamper:
    """One way to cheat: how it changes the log and the audit message that must catch it."""

    name: str
    apply: Callable[[list[bytes], list[SignedCheckpoint]], None]
    message: str


def _flip_entry(entries: list[bytes], _: list[SignedCheckpoint]) -> None:
    entries[11] = bytes([entries[11][0] ^ 1]) + entries[11][1:]


def _flip_signature(_: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    signature = bytearray(checkpoints[3].signature)
    signature[5] ^= 0x40
    checkpoints[3] = replace(checkpoints[3], signature=bytes(signature))


def _alter_timestamp(_: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    altered = replace(checkpoints[2].checkpoint, timestamp=checkpoints[2].checkpoint.timestamp - 1)
    checkpoints[2] = replace(checkpoints[2], checkpoint=altered)


def _shrink(entries: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    # Signed by the real key: a rolled-back log claiming the latest root under a smaller size.
    latest = checkpoints[-1].checkpoint
    rolled_back = replace(latest, tree_size=9, timestamp=latest.timestamp + 60)
    checkpoints.append(sign_checkpoint(SIGNER, rolled_back))


def _fork(entries: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    forked = [*entries[:16], b"a rewritten entry", *entries[17:]]
    checkpoints[-1] = _checkpoint(forked, 23, checkpoints[-1].checkpoint.timestamp)


def _delete_tail(entries: list[bytes], _: list[SignedCheckpoint]) -> None:
    del entries[20:]


def _foreign_signer(_: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    other = SigningKey.generate()
    cp = replace(checkpoints[1].checkpoint, key_id=other.key_id)
    checkpoints[1] = sign_checkpoint(other, cp)


def _forged_key_id(_: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    other = SigningKey.generate()
    cp = checkpoints[1].checkpoint
    checkpoints[1] = SignedCheckpoint(cp, other.sign(cp.signed_body()))


def _mixed_origin(entries: list[bytes], checkpoints: list[SignedCheckpoint]) -> None:
    cp = replace(checkpoints[4].checkpoint, origin="elsewhere/log")
    checkpoints[4] = sign_checkpoint(SIGNER, cp)


TAMPERS = [
    Tamper("flipped-entry-byte", _flip_entry, r"checkpoint 5: .*an entry in \[9, 16\) was altered"),
    Tamper("bad-signature", _flip_signature, "checkpoint 3: checkpoint signature is invalid"),
    Tamper("altered-timestamp", _alter_timestamp, "checkpoint 2: checkpoint signature is invalid"),
    Tamper("shrunk-tree", _shrink, "checkpoint 7: tree_size 9 is smaller .* the log shrank"),
    Tamper("fork", _fork, r"checkpoint 6: .*an entry in \[16, 23\) was altered"),
    Tamper("deleted-entries", _delete_tail, "checkpoint 6: claims 23 entries but the log holds 20"),
    Tamper("foreign-signer", _foreign_signer, "checkpoint 1: checkpoint names signing key"),
    Tamper("forged-key-id", _forged_key_id, "checkpoint 1: checkpoint signature is invalid"),
    Tamper("mixed-origin", _mixed_origin, "checkpoint 4: origin 'elsewhere/log' differs"),
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.name for t in TAMPERS])
def test_the_audit_names_the_first_fault(tamper: Tamper) -> None:
    entries, checkpoints = list(ENTRIES), _history()
    tamper.apply(entries, checkpoints)
    with pytest.raises(LogProofError, match=tamper.message):
        audit_entries(entries, checkpoints, SIGNER.verifier())


@pytest.mark.parametrize("tamper", TAMPERS[1:3] + TAMPERS[6:8], ids=lambda t: t.name)
def test_verify_checkpoint_rejects_a_bad_signature(tamper: Tamper) -> None:
    honest = _history()
    checkpoints = list(honest)
    tamper.apply(list(ENTRIES), checkpoints)
    (bad,) = (c for c, h in zip(checkpoints, honest, strict=True) if c is not h)
    with pytest.raises(LogProofError):
        verify_checkpoint(SIGNER.verifier(), bad)


def test_checkpoint_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Checkpoint(ORIGIN, 1, b"short", 0, SIGNER.key_id)
    with pytest.raises(ValueError, match=">= 0"):
        Checkpoint(ORIGIN, -1, EMPTY_ROOT, 0, SIGNER.key_id)
    with pytest.raises(ValueError, match="origin"):
        Checkpoint("", 0, EMPTY_ROOT, 0, SIGNER.key_id)
