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

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from freemark._schema import HEX, INTEGER, TEXT, from_json_fields, to_json_fields
from freemark._schema import signed as _signed
from freemark.errors import CryptoError, InvalidReceiptError, LogProofError
from freemark.signatures import Verifier, canonical_json

__all__ = [
    "EMPTY_ROOT",
    "HASH_BYTES",
    "Checkpoint",
    "LogProofError",
    "SignedCheckpoint",
    "Signer",
    "audit_entries",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "sign_checkpoint",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
]

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# Names the signed body so a checkpoint signature can never pass for a receipt or a verdict.
_CHECKPOINT_KIND = "freemark/v1/checkpoint"


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


class _Subtrees:
    """Every perfect, aligned subtree hash of a leaf list, computed once in O(n).

    RFC 6962's recursions only ever ask for subtrees whose left part is perfect and aligned,
    so with these levels any subtree hash costs O(log n), and a whole audit with many
    checkpoints hashes each node once instead of once per checkpoint.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        levels = [list(leaves)]
        while len(levels[-1]) > 1:
            below = levels[-1]
            levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        self._levels = levels
        self.size = len(leaves)

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
    return _Subtrees(leaves).hash(0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path proving that `leaves[index]` is in the tree of all `leaves`."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    return _Subtrees(leaves).path(index, 0, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """The proof that the tree of `leaves[:old_size]` is a prefix of the tree of all `leaves`."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(
            f"old size {old_size} must be in 1..{len(leaves)}: "
            "a proof from the empty tree proves nothing, and a tree cannot shrink"
        )
    return _Subtrees(leaves).subproof(old_size, 0, len(leaves), True)


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
class Checkpoint:
    """A tree head the TTP commits to: the log `origin` held `tree_size` entries with this root.

    `timestamp` is unix seconds, injected by the caller (the server's clock), not read here.
    """

    origin: str = field(metadata=_signed(TEXT))
    tree_size: int = field(metadata=_signed(INTEGER))
    root_hash: bytes = field(metadata=_signed(HEX))
    timestamp: int = field(metadata=_signed(INTEGER))
    key_id: str = field(metadata=_signed(TEXT))

    def __post_init__(self) -> None:
        if not self.origin:
            raise ValueError("a checkpoint needs a non-empty origin")
        if self.tree_size < 0 or self.timestamp < 0:
            raise ValueError("checkpoint tree_size and timestamp must be >= 0")
        if len(self.root_hash) != HASH_BYTES:
            raise ValueError(f"checkpoint root_hash must be {HASH_BYTES} bytes")

    def signed_body(self) -> bytes:
        """The exact bytes signed: RFC 8785 canonical JSON with the root hash in hex."""
        return canonical_json({"kind": _CHECKPOINT_KIND, **to_json_fields(self)})

    @classmethod
    def from_signed_body(cls, body: bytes) -> Checkpoint:
        """The checkpoint whose `signed_body()` is exactly `body`; `LogProofError` otherwise.

        The one reader of a checkpoint body: it refuses anything but the canonical bytes of a
        checkpoint (another kind, extra or missing fields, non-canonical JSON, a bad root).
        It does not check the signature: `verify_checkpoint` does.
        """
        try:
            parsed = json.loads(body)
        except ValueError:  # UnicodeDecodeError is one too
            raise LogProofError("the checkpoint body is not JSON") from None
        try:
            checkpoint = cls(**from_json_fields(cls, parsed, "checkpoint body"))
        except (ValueError, InvalidReceiptError) as exc:  # __post_init__'s or a field's reader's
            raise LogProofError(f"the checkpoint body is invalid: {exc}") from None
        if checkpoint.signed_body() != body:
            raise LogProofError(
                "the checkpoint body is not a canonical checkpoint (another kind, extra fields "
                "or not RFC 8785 JSON)"
            )
        return checkpoint


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with the TTP's Ed25519 signature over `checkpoint.signed_body()`."""

    checkpoint: Checkpoint
    signature: bytes


class Signer(Protocol):
    """What `sign_checkpoint` needs from a key: the server's `SigningKey` is one.

    A protocol rather than the server's class, so the library never imports the server.
    """

    @property
    def key_id(self) -> str:
        """The id that signed bodies name, as `freemark.signatures.public_key_id` computes it."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature over `message`."""
        ...


def sign_checkpoint(signer: Signer, checkpoint: Checkpoint) -> SignedCheckpoint:
    """Sign a checkpoint; its `key_id` must name `signer`, so auditors know which key to use."""
    if checkpoint.key_id != signer.key_id:
        raise ValueError(
            f"checkpoint names key {checkpoint.key_id!r} but the signer is {signer.key_id!r}"
        )
    return SignedCheckpoint(checkpoint, signer.sign(checkpoint.signed_body()))


def verify_checkpoint(verifier: Verifier, signed: SignedCheckpoint) -> None:
    """Raise `LogProofError` unless `verifier`'s key signed exactly this checkpoint."""
    checkpoint = signed.checkpoint
    if checkpoint.key_id != verifier.key_id:
        raise LogProofError(
            f"checkpoint names signing key {checkpoint.key_id!r}, "
            f"but the verifier holds key {verifier.key_id!r}"
        )
    try:
        verifier.verify(signed.signature, checkpoint.signed_body())
    except CryptoError:
        raise LogProofError(
            f"checkpoint signature is invalid (tree_size {checkpoint.tree_size}): "
            "the checkpoint was altered or not signed by this key"
        ) from None


# --- audit ---------------------------------------------------------------------------------


def audit_entries(
    entries: Sequence[bytes], checkpoints: Sequence[SignedCheckpoint], verifier: Verifier
) -> None:
    """Check a whole log against its signed checkpoints, in order; raise at the first fault.

    `entries` are the canonical entry bytes in log order. For each checkpoint: its signature,
    its origin, that the log never shrank, that its root is the root of the first `tree_size`
    entries, and that it is consistent with the previous checkpoint. The consistency proof is
    what a client without the entries checks; computing and verifying it here makes sure the
    proofs this log serves agree with its own entries.
    """
    tree = _Subtrees([leaf_hash(entry) for entry in entries])
    previous: Checkpoint | None = None
    for position, signed in enumerate(checkpoints):
        try:
            _audit_checkpoint(tree, previous, signed, verifier)
        except LogProofError as err:
            raise LogProofError(f"checkpoint {position}: {err}") from None
        previous = signed.checkpoint


def _audit_checkpoint(
    tree: _Subtrees, previous: Checkpoint | None, signed: SignedCheckpoint, verifier: Verifier
) -> None:
    verify_checkpoint(verifier, signed)
    current = signed.checkpoint
    if current.tree_size > tree.size:
        raise LogProofError(
            f"claims {current.tree_size} entries but the log holds {tree.size}: "
            "entries were removed, or the checkpoint belongs to another log"
        )
    verified_size = 0 if previous is None else previous.tree_size
    if previous is not None:
        _check_successor(previous, current)
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


def _check_successor(previous: Checkpoint, current: Checkpoint) -> None:
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
