"""What the key server returns, as frozen typed objects: receipts, verdicts, registrations, log.

Generated protobuf messages stay at the edge (`freemark.wire` converts); callers get these
immutable dataclasses instead, so a result cannot be changed after it was checked and type
checkers see every field.

Each signed record (receipt, verdict; the checkpoint in `freemark.merkle`) is defined once,
here: its `signed(...)` fields are the field list of its signed body, and `freemark.wire`
derives the body, the proto message and the JSON file from that list. The typed fields are
read from the signed body (`freemark.wire.read_statement`), and `freemark.receipt` checks
that they still agree with what was signed. Adding a field to a record is one line here plus
the proto field, which a drift test checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from freemark._schema import (
    BOOLEAN,
    HEX,
    INTEGER,
    NUMBER,
    TEXT,
    choice,
    list_of,
    nested,
    signed,
    to_json_fields,
)

__all__ = [
    "OUTCOMES",
    "RECEIPT_KIND",
    "VERDICT_KIND",
    "Checkpoint",
    "ConsistencyProof",
    "InclusionProof",
    "Receipt",
    "ReferencePanel",
    "RegistrationInfo",
    "SignedStatement",
    "SignedVerdict",
    "Verdict",
    "VerdictTest",
]

# The `kind` of a signed body: it keeps a receipt from ever passing for a verdict and back.
RECEIPT_KIND = "freemark/v1/registration"
VERDICT_KIND = "freemark/v1/verdict"

# A verdict's outcome: `inconclusive` when the tests that ran cannot reach alpha.
OUTCOMES = ("match", "no_match", "inconclusive")


@dataclass(frozen=True)
class SignedStatement:
    """A statement the TTP signed: `body` is RFC 8785 JSON, the exact bytes signed and logged."""

    body: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class Checkpoint:
    """A signed log checkpoint as served: `note` is the exact C2SP signed note.

    The note's text is a `freemark.merkle.Checkpoint` (origin, tree size, root, time; read it
    with `freemark.merkle.parse_checkpoint`); `tree_size` and `root_hash` repeat it, and
    `freemark.receipt.verify_checkpoint` checks the signature and that they agree.
    """

    note: bytes
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


@dataclass(frozen=True, kw_only=True)
class ReferencePanel:
    """The reference models a verdict's null used: how many, and SHA-256 of their list.

    `size` 0 means no panel (the permutation null only); its `sha256` is then SHA-256("").
    """

    size: int = field(metadata=signed(INTEGER))
    sha256: bytes = field(metadata=signed(HEX))

    @classmethod
    def none(cls) -> ReferencePanel:
        """No reference panel."""
        return cls(size=0, sha256=hashlib.sha256(b"").digest())

    @classmethod
    def of(cls, fingerprints: Sequence[bytes]) -> ReferencePanel:
        """The record of a panel: SHA-256 over its members' sorted 32-byte fingerprints."""
        digest = hashlib.sha256()
        for fingerprint in sorted(fingerprints):
            digest.update(fingerprint)
        return cls(size=len(fingerprints), sha256=digest.digest())


NO_PANEL = ReferencePanel.none()


@dataclass(frozen=True)
class Receipt:
    """Proof of registration: who registered which model, with which watermark, when, and
    where it sits in the log. Keep it: it is the evidence of priority in a dispute."""

    KIND: ClassVar[str] = RECEIPT_KIND

    statement: SignedStatement
    registration_id: str = field(metadata=signed(TEXT))
    owner: str = field(metadata=signed(TEXT))
    integrated_time: int = field(metadata=signed(INTEGER))  # unix microseconds
    host_fingerprint: bytes = field(metadata=signed(HEX))
    watermark_commitment: bytes = field(metadata=signed(HEX))  # SHA-256 of the watermark bits
    layer: str = field(metadata=signed(TEXT))
    n_bits: int = field(metadata=signed(INTEGER))
    log_index: int = field(metadata=signed(INTEGER))
    inclusion: InclusionProof
    # The reference panel fixed at registration (size 0: none); verdicts name the same digest.
    panel: ReferencePanel = field(default=NO_PANEL, metadata=signed(nested(ReferencePanel)))


@dataclass(frozen=True, kw_only=True)
class VerdictTest:
    """One test a verdict ran: "plain" (bits matched, `statistic`, out of `n` bits) or another."""

    name: str = field(metadata=signed(TEXT))
    statistic: float = field(metadata=signed(NUMBER))
    n: int = field(metadata=signed(INTEGER))
    p_value: float = field(metadata=signed(NUMBER))
    log10_p_value: float = field(metadata=signed(NUMBER))
    method: str = field(metadata=signed(TEXT))


@dataclass(frozen=True)
class Verdict:
    """What a suspect's extraction says; `is_match` iff the calibrated p <= alpha.

    These are the judgement fields, shared by the offline verdict (`freemark.extract`) and
    the TTP's `SignedVerdict`. `p_value` and `is_match` are the combined decision over
    `tests`; `outcome` defaults to "match" or "no_match" from `is_match`.
    """

    n_bits: int = field(metadata=signed(INTEGER))
    matches: int = field(metadata=signed(INTEGER))
    ber: float = field(metadata=signed(NUMBER))
    p_value: float = field(metadata=signed(NUMBER))
    log10_p_value: float = field(metadata=signed(NUMBER))
    p_value_method: str = field(metadata=signed(TEXT))
    p_value_binomial: float = field(metadata=signed(NUMBER))
    log10_p_value_binomial: float = field(metadata=signed(NUMBER))
    alpha: float = field(metadata=signed(NUMBER))
    is_match: bool = field(metadata=signed(BOOLEAN))
    # Defaults keep callers that predate these fields (the lab's aligned verdict) working.
    outcome: str = field(default="", metadata=signed(choice(*OUTCOMES)))
    tests: tuple[VerdictTest, ...] = field(default=(), metadata=signed(list_of(nested(VerdictTest))))
    panel: ReferencePanel = field(default=NO_PANEL, metadata=signed(nested(ReferencePanel)))

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", "match" if self.is_match else "no_match")
        if not isinstance(self.tests, tuple):
            object.__setattr__(self, "tests", tuple(self.tests))

    def as_dict(self) -> dict[str, object]:
        """The verdict's signed fields as JSON-ready values (the CLI's `--json`)."""
        return to_json_fields(self)


@dataclass(frozen=True, kw_only=True)
class SignedVerdict(Verdict):
    """The TTP's signed, logged judgement of one suspect model against one registration.

    Its signed body is the judgement fields of `Verdict` plus the binding fields below.
    """

    KIND: ClassVar[str] = VERDICT_KIND

    statement: SignedStatement
    registration_id: str = field(metadata=signed(TEXT))
    requested_by: str = field(metadata=signed(TEXT))
    suspect_sha256: bytes = field(metadata=signed(HEX))
    log_index: int = field(metadata=signed(INTEGER))
    integrated_time: int = field(metadata=signed(INTEGER))  # unix microseconds
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
