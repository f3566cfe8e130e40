"""The Merkle log: RFC 6962 test vectors, proof properties, signed checkpoints and audits."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freemark.tlog.merkle import (
    EMPTY_ROOT,
    Frontier,
    LogProofError,
    TreeHead,
    audit_entries,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    open_checkpoint,
    parse_checkpoint,
    root,
    sign_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from freemark.tlog.note import parse_note
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


def _checkpoint(entries: list[bytes], size: int, timestamp: int, origin: str = ORIGIN,
                signer: SigningKey = SIGNER) -> bytes:
    tree_root = root([leaf_hash(entry) for entry in entries[:size]])
    return sign_checkpoint(signer, TreeHead(origin, size, tree_root, timestamp)).note


def _history() -> list[bytes]:
    return [
        _checkpoint(ENTRIES, size, 1_700_000_000 + 60 * n)
        for n, size in enumerate(CHECKPOINT_SIZES)
    ]


def test_a_signed_checkpoint_opens_to_what_was_signed() -> None:
    for n, note in enumerate(_history()):
        checkpoint = open_checkpoint(note, SIGNER.verifier(), ORIGIN)
        assert checkpoint.tree_size == CHECKPOINT_SIZES[n]
        assert checkpoint.timestamp == 1_700_000_000 + 60 * n


def test_the_note_is_a_c2sp_checkpoint_signed_under_the_origin() -> None:
    checkpoint = TreeHead(ORIGIN, 2, bytes(range(32)), 1_700_000_000)
    text = checkpoint.to_text()
    assert text == ("freemark.test/log\n2\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
                    "time 1700000000\n")
    note = sign_checkpoint(SIGNER, checkpoint).note.decode()
    body, signature_line = note.split("\n\n")
    assert body + "\n" == text
    dash, name, blob = signature_line.rstrip("\n").split(" ")
    assert (dash, name) == ("\u2014", ORIGIN)
    raw = base64.b64decode(blob)
    public = SIGNER.verifier().public_bytes()
    assert raw[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + public).digest()[:4]
    SIGNER.verifier().verify(raw[4:], text.encode())  # Ed25519 over the text, newline included
    assert TreeHead.from_text(text) == checkpoint


MALFORMED_TEXTS = {
    "three lines, no time": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",
    "empty origin": "\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1\n",
    "origin with a space": "a b\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1\n",
    "leading zero": "o\n01\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1\n",
    "signed size": "o\n+1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1\n",
    "short root": "o\n1\n" + base64.b64encode(b"short").decode() + "\ntime 1\n",
    "root not base64": "o\n1\n" + "%" * 44 + "\ntime 1\n",
    "unpadded root": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode().rstrip("=") + "\ntime 1\n",
    "another extension": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\nwhen 1\n",
    "extra line": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1\nx\n",
    "no final newline": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime 1",
    "negative time": "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\ntime -1\n",
}


@pytest.mark.parametrize("text", MALFORMED_TEXTS.values(), ids=MALFORMED_TEXTS.keys())
def test_malformed_checkpoint_texts_are_refused(text: str) -> None:
    with pytest.raises(LogProofError):
        TreeHead.from_text(text)


def test_an_honest_log_passes_the_audit() -> None:
    audit_entries(ENTRIES, _history(), SIGNER.verifier(), ORIGIN)
    audit_entries(ENTRIES + [b"not yet checkpointed"], _history(), SIGNER.verifier())


@dataclass(frozen=True)
class Tamper:
    """One way to cheat: how it changes the log and the audit message that must catch it."""

    name: str
    apply: Callable[[list[bytes], list[bytes]], None]
    message: str


def _flip_entry(entries: list[bytes], _: list[bytes]) -> None:
    entries[11] = bytes([entries[11][0] ^ 1]) + entries[11][1:]


def _resign_line(note: bytes, change: Callable[[bytes], bytes]) -> bytes:
    text, line = note.decode().rsplit("\n\n", 1)
    dash, name, blob = line.rstrip("\n").split(" ")
    raw = change(base64.b64decode(blob))
    return f"{text}\n\n{dash} {name} {base64.b64encode(raw).decode()}\n".encode()


def _flip_signature(_: list[bytes], checkpoints: list[bytes]) -> None:
    checkpoints[3] = _resign_line(checkpoints[3], lambda raw: raw[:9] + bytes([raw[9] ^ 0x40])
                                  + raw[10:])


def _alter_timestamp(_: list[bytes], checkpoints: list[bytes]) -> None:
    checkpoints[2] = checkpoints[2].replace(b"time 1700000120", b"time 1700000119")


def _shrink(entries: list[bytes], checkpoints: list[bytes]) -> None:
    # Signed by the real key: a rolled-back log claiming the latest root under a smaller size.
    latest = parse_checkpoint(checkpoints[-1])
    rolled_back = replace(latest, tree_size=9, timestamp=latest.timestamp + 60)
    checkpoints.append(sign_checkpoint(SIGNER, rolled_back).note)


def _fork(entries: list[bytes], checkpoints: list[bytes]) -> None:
    forked = [*entries[:16], b"a rewritten entry", *entries[17:]]
    checkpoints[-1] = _checkpoint(forked, 23, parse_checkpoint(checkpoints[-1]).timestamp)


def _delete_tail(entries: list[bytes], _: list[bytes]) -> None:
    del entries[20:]


def _foreign_signer(_: list[bytes], checkpoints: list[bytes]) -> None:
    checkpoints[1] = _checkpoint(ENTRIES, 1, 1_700_000_060, signer=SigningKey.generate())


def _forged_key_id(_: list[bytes], checkpoints: list[bytes]) -> None:
    other = SigningKey.generate()
    text = parse_note(checkpoints[1]).text.encode()
    checkpoints[1] = _resign_line(checkpoints[1], lambda raw: raw[:4] + other.sign(text))


def _mixed_origin(entries: list[bytes], checkpoints: list[bytes]) -> None:
    checkpoints[4] = _checkpoint(ENTRIES, 9, 1_700_000_240, origin="elsewhere/log")


def _time_backwards(entries: list[bytes], checkpoints: list[bytes]) -> None:
    checkpoints[5] = _checkpoint(ENTRIES, 16, 1_700_000_000)


TAMPERS = [
    Tamper("flipped-entry-byte", _flip_entry, r"checkpoint 5: .*an entry in \[9, 16\) was altered"),
    Tamper("bad-signature", _flip_signature, "checkpoint 3: .* does not verify"),
    Tamper("altered-timestamp", _alter_timestamp, "checkpoint 2: .* does not verify"),
    Tamper("shrunk-tree", _shrink, "checkpoint 7: tree_size 9 is smaller .* the log shrank"),
    Tamper("fork", _fork, r"checkpoint 6: .*an entry in \[16, 23\) was altered"),
    Tamper("deleted-entries", _delete_tail, "checkpoint 6: claims 23 entries but the log holds 20"),
    Tamper("foreign-signer", _foreign_signer, "checkpoint 1: the note is not signed by key"),
    Tamper("forged-key-id", _forged_key_id, "checkpoint 1: .* does not verify"),
    Tamper("mixed-origin", _mixed_origin, "checkpoint 4: the checkpoint is of log 'elsewhere/log'"),
    Tamper("time-backwards", _time_backwards, "checkpoint 5: time 1700000000 is before"),
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.name for t in TAMPERS])
def test_the_audit_names_the_first_fault(tamper: Tamper) -> None:
    entries, checkpoints = list(ENTRIES), _history()
    tamper.apply(entries, checkpoints)
    with pytest.raises(LogProofError, match=tamper.message):
        audit_entries(entries, checkpoints, SIGNER.verifier())


@pytest.mark.parametrize("tamper", TAMPERS[1:3] + TAMPERS[6:8], ids=lambda t: t.name)
def test_open_checkpoint_rejects_a_bad_signature(tamper: Tamper) -> None:
    honest = _history()
    checkpoints = list(honest)
    tamper.apply(list(ENTRIES), checkpoints)
    (bad,) = (c for c, h in zip(checkpoints, honest, strict=True) if c != h)
    with pytest.raises(LogProofError):
        open_checkpoint(bad, SIGNER.verifier())


def test_open_checkpoint_refuses_another_origin_even_under_the_same_key() -> None:
    note = _checkpoint(ENTRIES, 4, 1_700_000_000, origin="elsewhere/log")
    open_checkpoint(note, SIGNER.verifier())  # genuine, but of another log
    with pytest.raises(LogProofError, match="of log 'elsewhere/log', not of"):
        open_checkpoint(note, SIGNER.verifier(), ORIGIN)


def test_checkpoint_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TreeHead(ORIGIN, 1, b"short", 0)
    with pytest.raises(ValueError, match=">= 0"):
        TreeHead(ORIGIN, -1, EMPTY_ROOT, 0)
    with pytest.raises(ValueError, match="origin"):
        TreeHead("", 0, EMPTY_ROOT, 0)
    with pytest.raises(ValueError, match="origin"):
        TreeHead("two\nlines", 0, EMPTY_ROOT, 0)


# --- the frontier (a monitor's compact range) ----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 70), cuts=st.lists(st.integers(0, 70), max_size=4))
def test_a_frontier_extended_in_any_batches_has_the_trees_root(size: int, cuts: list[int]
                                                               ) -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(size)]
    frontier = Frontier()
    for lo, hi in zip([0, *sorted(c % (size + 1) for c in cuts)],
                      [*sorted(c % (size + 1) for c in cuts), size], strict=True):
        frontier = frontier.extended(leaves[lo:hi])
        assert frontier.root() == root(leaves[:hi]) and frontier.size == hi
    assert len(frontier.hashes) == size.bit_count()


def test_a_frontier_must_have_one_hash_per_perfect_subtree() -> None:
    with pytest.raises(ValueError, match="has 2 hashes"):
        Frontier(5, (EMPTY_ROOT,))
