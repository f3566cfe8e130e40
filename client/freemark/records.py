"""What the key server returns, as frozen typed objects: receipts, verdicts, registrations, log.

Generated protobuf messages stay at the edge (`freemark._serde` converts); callers get these
immutable dataclasses instead, so a result cannot be changed after it was checked and type
checkers see every field. A receipt or verdict carries the exact signed bytes of its
statement: the typed fields repeat the body for convenience, and `freemark.receipt`
checks that they agree with what was signed. Until then, treat them as claims.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "RECEIPT_KIND",
    "VERDICT_KIND",
    "Checkpoint",
    "ConsistencyProof",
    "InclusionProof",
    "Receipt",
    "RegistrationInfo",
    "SignedStatement",
    "SignedVerdict",
]

# The `kind` of a signed body: it keeps a receipt from ever passing for a verdict and back.
RECEIPT_KIND = "freemark/v1/registration"
VERDICT_KIND = "freemark/v1/verdict"


@dataclass(frozen=True)
class SignedStatement:
    """A statement the TTP signed: `body` is RFC 8785 JSON, the exact bytes signed and logged."""

    body: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class Checkpoint:
    """A signed log checkpoint as served: `body` is the exact signed RFC 8785 JSON.

    `tree_size` and `root_hash` repeat the body; `freemark.receipt.verify_checkpoint`
    checks the signature and that they agree.
    """

    body: bytes
    signature: bytes
    tree_size: int
    root_hash: bytes


@dataclass(frozen=True)
class InclusionProof:
    """The audit path placing leaf `log_index` in the tree that `checkpoint` signs."""

    log_index: int
    tree_size: int
    hashes: tuple[bytes, ...]
    checkpoint: Checkpoint


@dataclass(frozen=True)
class ConsistencyProof:
    """Proof that the tree of `old_size` entries is a prefix of the one `checkpoint` signs."""

    old_size: int
    new_size: int
    hashes: tuple[bytes, ...]
    checkpoint: Checkpoint


@dataclass(frozen=True)
class Receipt:
    """Proof of registration: who registered which model, with which watermark, when, and
    where it sits in the log. Keep it: it is the evidence of priority in a dispute."""

    statement: SignedStatement
    registration_id: str
    owner: str
    integrated_time: int  # unix microseconds
    host_fingerprint: bytes
    watermark_commitment: bytes
    log_index: int
    inclusion: InclusionProof


@dataclass(frozen=True)
class SignedVerdict:
    """The TTP's signed, logged judgement of one suspect model against one registration."""

    statement: SignedStatement
    registration_id: str
    n_bits: int
    matches: int
    ber: float
    p_value: float
    log10_p_value: float
    p_value_method: str
    p_value_binomial: float
    alpha: float
    is_match: bool
    log_index: int
    integrated_time: int  # unix microseconds
    inclusion: InclusionProof


@dataclass(frozen=True)
class RegistrationInfo:
    """A registration's metadata; the server never returns the key, triggers or watermark."""

    registration_id: str
    owner: str
    integrated_time: int  # unix microseconds
    host_fingerprint: bytes
    watermark_commitment: bytes
    layer: str
    n_bits: int
    log_index: int
    revoked_at: int | None  # unix microseconds; None while active
