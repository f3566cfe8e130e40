"""The append-only log as an RFC 6962 Merkle tree: roots, proofs, signed checkpoints, audit.

Priority between rival registrations is decided by this log (DESIGN §1.2, "Ambiguity"), so
anyone holding the TTP's public key must be able to check, offline, that an entry is in the
log (inclusion proof) and that the log only ever grew (consistency proof between two signed
checkpoints). The hashing follows RFC 6962 §2.1 exactly, so existing Certificate Transparency
tools and test vectors apply; the verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2.

The module is storage-agnostic: callers pass the list of leaf hashes (or entry bytes) their
store holds. Every verifier raises `LogProofError`, never returns a bool. It lives in the
library, not the server, because auditors run the verifiers offline; the server builds its
log with the same code, so both sides hash alike by construction.

Quick start::

    leaves = [leaf_hash(entry) for entry in entries]
    proof = inclusion_proof(leaves, 3)
    verify_inclusion(leaves[3], 3, len(leaves), proof, root(leaves))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from freemark.errors import LogProofError
from freemark.tlog.note import NoteSigner, check_key_name, open_note, parse_note, sign_note
from freemark.tlog.signatures import Verifier

__all__ = [
    "EMPTY_ROOT",
    "HASH_BYTES",
    "Frontier",
    "LogProofError",
    "SignedCheckpoint",
    "Tree",
    "TreeHead",
    "audit_entries",
    "check_successor",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "parse_checkpoint",
    "root",
    "sign_checkpoint",
    "verify_consistency",
    "verify_inclusion",
]

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right).

    The distinct prefixes keep a leaf from being passed off as an interior node.
    """
    return hashlib.sha256(b"\x01" + left + right).digest()


# --- building roots and proofs -------------------------------------------------------------


def _split(size: int) -> int:
    """The largest power of two strictly below `size` (>= 2): where RFC 6962 splits a tree."""
    return 1 << ((size - 1).bit_length() - 1)


class Tree:
    """Every perfect, aligned subtree hash of a leaf list, computed once in O(n) and kept
    up to date as leaves are appended (`extend`).

    RFC 6962's recursions only ever ask for subtrees whose left part is perfect and aligned,
    so with these levels any subtree hash costs O(log n), and a whole audit with many
    checkpoints hashes each node once instead of once per checkpoint.
    """

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        levels = [list(leaves)]
        while len(levels[-1]) > 1:
            below = levels[-1]
            levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        self._levels = levels
        self.size = len(leaves)

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append leaf hashes, completing each perfect subtree as its last leaf arrives:
        O(1) hashes per leaf on average, so a log's server keeps its tree as it grows."""
        for leaf in leaves:
            self._levels[0].append(leaf)
            level = 0
            while len(self._levels[level]) % 2 == 0:
                below = self._levels[level]
                if level + 1 == len(self._levels):
                    self._levels.append([])
                self._levels[level + 1].append(node_hash(below[-2], below[-1]))
                level += 1
        self.size = len(self._levels[0])

    def frontier(self, size: int) -> Frontier:
        """The right edge of the tree of the first `size` leaves, from the kept levels."""
        hashes, lo = [], 0
        for bit in reversed(range(size.bit_length())):
            if size >> bit & 1:
                hashes.append(self.hash(lo, lo + (1 << bit)))
                lo += 1 << bit
        return Frontier(size, tuple(hashes))

    def hash(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi])."""
        size = hi - lo
        if size == 0:
            return EMPTY_ROOT
        if size & (size - 1) == 0 and lo % size == 0:
            return self._levels[size.bit_length() - 1][lo // size]
        k = _split(size)
        return node_hash(self.hash(lo, lo + k), self.hash(lo + k, hi))

    def path(self, index: int, lo: int, hi: int) -> list[bytes]:
        """RFC 6962 §2.1.1 PATH(index, D[lo:hi]), leaf-to-root order."""
        if hi - lo == 1:
            return []
        k = _split(hi - lo)
        if index < lo + k:
            return [*self.path(index, lo, lo + k), self.hash(lo + k, hi)]
        return [*self.path(index, lo + k, hi), self.hash(lo, lo + k)]

    def subproof(self, old_size: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        """RFC 6962 §2.1.2 SUBPROOF(m, D[lo:hi], b) with m = old_size - lo."""
        m = old_size - lo
        if m == hi - lo:
            return [] if complete else [self.hash(lo, hi)]
        k = _split(hi - lo)
        if m <= k:
            return [*self.subproof(old_size, lo, lo + k, complete), self.hash(lo + k, hi)]
        return [*self.subproof(old_size, lo + k, hi, False), self.hash(lo, lo + k)]


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of a list of leaf hashes; SHA-256("") for the empty tree."""
    return Tree(leaves).hash(0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path proving that `leaves[index]` is in the tree of all `leaves`."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    return Tree(leaves).path(index, 0, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """The proof that the tree of `leaves[:old_size]` is a prefix of the tree of all `leaves`."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(
            f"old size {old_size} must be in 1..{len(leaves)}: "
            "a proof from the empty tree proves nothing, and a tree cannot shrink"
        )
    return Tree(leaves).subproof(old_size, 0, len(leaves), True)


@dataclass(frozen=True)
class Frontier:
    """The right edge of a tree of `size` leaves: the roots of its perfect subtrees, largest
    first (one per set bit of `size`), which is all a monitor must keep to extend the tree by
    new entries and recompute its root, without holding the entries (RFC 9162's compact range
    [0, size))."""

    size: int = 0
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 0 or len(self.hashes) != self.size.bit_count():
            raise ValueError(f"a frontier of {self.size} leaves has {self.size.bit_count()} "
                             f"hashes, not {len(self.hashes)}")
        for node in self.hashes:
            if len(node) != HASH_BYTES:
                raise ValueError(f"frontier hashes are {HASH_BYTES} bytes")

    def extended(self, leaf_hashes: Sequence[bytes]) -> Frontier:
        """The frontier after appending `leaf_hashes` (RFC 6962 leaf hashes, in order)."""
        stack, size = list(self.hashes), self.size
        for leaf in leaf_hashes:
            stack.append(leaf)
            size += 1
            merges = (size & -size).bit_length() - 1  # trailing zeros: subtrees now complete
            for _ in range(merges):
                right = stack.pop()
                stack.append(node_hash(stack.pop(), right))
        return Frontier(size, tuple(stack))

    def root(self) -> bytes:
        """MTH of the whole tree: the subtree roots folded from the right."""
        if not self.hashes:
            return EMPTY_ROOT
        result = self.hashes[-1]
        for node in reversed(self.hashes[:-1]):
            result = node_hash(node, result)
        return result


# --- verifying proofs ----------------------------------------------------------------------


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_BYTES:
        raise LogProofError(f"{name} is {len(value)} bytes, expected a {HASH_BYTES}-byte hash")


def _check_proof(proof: Sequence[bytes]) -> None:
    for position, node in enumerate(proof):
        _check_hash(f"proof element {position}", node)


def _shift_while_even(fn: int, sn: int) -> tuple[int, int]:
    """Drop the levels where the node has no right sibling (RFC 9162's inner loops)."""
    while fn and not fn & 1:
        fn >>= 1
        sn >>= 1
    return fn, sn


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise `LogProofError` unless `proof` places `leaf_hash` at `index` under `root`.

    The proof commits to the path's shape; the tree size itself is bound by the signed
    checkpoint that carries `root`, so take both from the same checkpoint.
    """
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root", root)
    _check_proof(proof)
    if not 0 <= index < tree_size:
        raise LogProofError(f"leaf index {index} is outside a tree of {tree_size} leaves")
    fn, sn = index, tree_size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise LogProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = _shift_while_even(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise LogProofError("inclusion proof is shorter than the path to the root")
    if r != root:
        raise LogProofError(f"inclusion proof for leaf {index} does not lead to the given root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise `LogProofError` unless `proof` shows the tree `old_root` is a prefix of `new_root`."""
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    if not 0 <= old_size <= new_size:
        raise LogProofError(f"tree sizes go from {old_size} to {new_size}: a log cannot shrink")
    if old_size == new_size:
        if proof:
            raise LogProofError("two trees of the same size need an empty consistency proof")
        if old_root != new_root:
            raise LogProofError(f"two trees of size {old_size} have different roots: a fork")
        return
    if old_size == 0:
        raise LogProofError("a consistency proof from the empty tree proves nothing")
    if not proof:
        raise LogProofError("consistency proof is empty")
    fr, sr = _consistency_roots(old_size, new_size, old_root, proof)
    if fr != old_root or sr != new_root:
        raise LogProofError(
            f"consistency proof does not link the tree of size {old_size} "
            f"to the tree of size {new_size}"
        )


def _consistency_roots(
    old_size: int, new_size: int, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """RFC 9162 §2.1.4.2 steps 2-7: rebuild both roots from the proof."""
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)  # the old tree is a complete subtree of the new one
    fn, sn = _shift_while_odd(old_size - 1, new_size - 1)
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise LogProofError("consistency proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            fn, sn = _shift_while_even(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise LogProofError("consistency proof is shorter than the path to the root")
    return fr, sr


def _shift_while_odd(fn: int, sn: int) -> tuple[int, int]:
    while fn & 1:
        fn >>= 1
        sn >>= 1
    return fn, sn


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeHead:
    """A tree head the TTP commits to: the log `origin` held `tree_size` entries with this root
    (the text of a checkpoint; `freemark.records.types.Checkpoint` is the signed note as served).

    Written as a C2SP tlog-checkpoint (c2sp.org/tlog-checkpoint): the origin, the tree size in
    decimal and the base64 root, one line each, then one extension line ``time <seconds>``.
    `timestamp` is unix seconds, injected by the caller (the server uses the last entry's
    integrated time), never read from a clock here; receipts are checked against it. The
    text is signed as a C2SP signed note whose key name is the origin (`sign_checkpoint`).
    """

    origin: str
    tree_size: int
    root_hash: bytes
    timestamp: int

    def __post_init__(self) -> None:
        try:
            check_key_name(self.origin)
        except ValueError as exc:
            raise ValueError(f"checkpoint origin: {exc}") from None
        if self.tree_size < 0 or self.timestamp < 0:
            raise ValueError("checkpoint tree_size and timestamp must be >= 0")
        if len(self.root_hash) != HASH_BYTES:
            raise ValueError(f"checkpoint root_hash must be {HASH_BYTES} bytes")

    def to_text(self) -> str:
        """The note text that is signed."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return f"{self.origin}\n{self.tree_size}\n{root}\n{_TIME}{self.timestamp}\n"

    @classmethod
    def from_text(cls, text: str) -> TreeHead:
        """The checkpoint whose `to_text()` is exactly `text`; `LogProofError` otherwise.

        The one reader of a checkpoint text: it refuses a missing or empty line, a size with
        a sign or leading zeros, a root that is not canonical base64 of 32 bytes, and any
        extension line but exactly one ``time`` line. It checks no signature:
        `open_checkpoint` does.
        """
        lines = text.split("\n")
        if len(lines) != 5 or lines[-1] != "":
            raise LogProofError("a checkpoint text is four lines (origin, tree size, root hash, "
                                f"time), each ending in a newline; got {len(lines) - 1}")
        origin, size, root, when = lines[:4]
        try:
            if not when.startswith(_TIME):
                raise ValueError("the fourth line must be the extension line "
                                 "'time <unix seconds>'")
            checkpoint = cls(origin, _decimal(size, "tree size"), _root(root),
                             _decimal(when.removeprefix(_TIME), "time"))
        except ValueError as exc:
            raise LogProofError(f"the checkpoint is invalid: {exc}") from None
        if checkpoint.to_text() != text:  # belt and braces: one text per checkpoint
            raise LogProofError("the checkpoint text is not in canonical form")
        return checkpoint


_TIME = "time "  # the extension line carrying the checkpoint's time (unix seconds)
_MAX_DECIMAL_DIGITS = 20  # 2**64 has 20 digits; nothing longer is a size or a time


def _decimal(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_DECIMAL_DIGITS:
        raise ValueError(f"the {what} {text!r} is not an ASCII decimal number")
    if text != "0" and text.startswith("0"):
        raise ValueError(f"the {what} {text!r} has leading zeros")
    return int(text)


def _root(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the root hash is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("the root hash is not canonical base64")
    if len(raw) != HASH_BYTES:
        raise ValueError(f"the root hash is {len(raw)} bytes, not {HASH_BYTES}")
    return raw


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint and the signed note (`note` bytes) that carries it."""

    checkpoint: TreeHead
    note: bytes


def sign_checkpoint(signer: NoteSigner, checkpoint: TreeHead) -> SignedCheckpoint:
    """Sign a checkpoint as a note under the key name `checkpoint.origin` (as the spec says)."""
    return SignedCheckpoint(checkpoint, sign_note(checkpoint.to_text(), checkpoint.origin, signer))


def parse_checkpoint(note: bytes) -> TreeHead:
    """The checkpoint a note carries, format checked, signature NOT checked."""
    return TreeHead.from_text(parse_note(note).text)


def open_checkpoint(note: bytes, verifier: Verifier, origin: str | None = None) -> TreeHead:
    """The checkpoint in `note` once its log signature verifies; `LogProofError` otherwise.

    `origin`, when given (pinned by the caller), must be the checkpoint's: a checkpoint of
    another log proves nothing about this one, even under the same key. The log's signature
    is the one whose key name is the checkpoint's origin; others (witnesses) are ignored.
    """
    checkpoint = parse_checkpoint(note)
    if origin is not None and checkpoint.origin != origin:
        raise LogProofError(f"the checkpoint is of log {checkpoint.origin!r}, "
                            f"not of {origin!r}")
    text = open_note(note, checkpoint.origin, verifier)
    if text != checkpoint.to_text():  # cannot differ: both read the same bytes
        raise LogProofError("the verified text is not the checkpoint that was parsed")
    return checkpoint


# --- audit ---------------------------------------------------------------------------------


def audit_entries(
    entries: Sequence[bytes], notes: Sequence[bytes], verifier: Verifier,
    origin: str | None = None,
) -> None:
    """Check a whole log against its signed checkpoints, in order; raise at the first fault.

    `entries` are the canonical entry bytes in log order, `notes` the signed checkpoints by
    tree size. For each checkpoint: its signature and origin (`origin` if given, else the
    first checkpoint's), that the log never shrank and time never went backwards, that its
    root is the root of the first `tree_size` entries, and that it is consistent with the
    previous checkpoint. The consistency proof is what a client without the entries checks;
    computing and verifying it here makes sure the proofs this log serves agree with its
    own entries.
    """
    tree = Tree([leaf_hash(entry) for entry in entries])
    previous: TreeHead | None = None
    for position, note in enumerate(notes):
        try:
            current = open_checkpoint(note, verifier, origin)
            _audit_checkpoint(tree, previous, current)
        except LogProofError as err:
            raise LogProofError(f"checkpoint {position}: {err}") from None
        previous = current
        origin = current.origin


def _audit_checkpoint(tree: Tree, previous: TreeHead | None, current: TreeHead) -> None:
    if current.tree_size > tree.size:
        raise LogProofError(
            f"claims {current.tree_size} entries but the log holds {tree.size}: "
            "entries were removed, or the checkpoint belongs to another log"
        )
    verified_size = 0 if previous is None else previous.tree_size
    if previous is not None:
        check_successor(previous, current)
    expected = tree.hash(0, current.tree_size)
    if current.root_hash != expected:
        raise LogProofError(
            f"root {current.root_hash.hex()} is not the root of entries[0:{current.tree_size}] "
            f"({expected.hex()}); entries[0:{verified_size}] were already verified, so an entry "
            f"in [{verified_size}, {current.tree_size}) was altered, or the checkpoint is forged"
        )
    if previous is not None and previous.tree_size > 0:
        proof = tree.subproof(previous.tree_size, 0, current.tree_size, True)
        verify_consistency(
            previous.tree_size, current.tree_size, previous.root_hash, current.root_hash, proof
        )


def check_successor(previous: TreeHead, current: TreeHead) -> None:
    """Raise unless `current` may follow `previous`: same log, no shrink, time not backwards.

    What it cannot see (the same size with another root, a tree that is not an extension) the
    consistency proof decides; a monitor checks both.
    """
    if current.origin != previous.origin:
        raise LogProofError(
            f"origin {current.origin!r} differs from the previous checkpoint's "
            f"{previous.origin!r}: checkpoints of two logs are mixed"
        )
    if current.tree_size < previous.tree_size:
        raise LogProofError(
            f"tree_size {current.tree_size} is smaller than the previous checkpoint's "
            f"{previous.tree_size}: the log shrank (a rollback or a fork)"
        )
    if current.timestamp < previous.timestamp:
        raise LogProofError(
            f"time {current.timestamp} is before the previous checkpoint's "
            f"{previous.timestamp}: the log's clock went backwards (a rollback or a fork)"
        )
