"""What the key server returns, as frozen typed objects: receipts, verdicts, registrations, log.

Generated protobuf messages stay at the edge (`freemark.records.wire` converts); callers get these
immutable dataclasses instead, so a result cannot be changed after it was checked and type
checkers see every field.

Each signed record (receipt, verdict; the checkpoint in `freemark.tlog.merkle`) is defined once,
here: its `signed(...)` fields are the field list of its signed body, and `freemark.records.wire`
derives the body, the proto message and the JSON file from that list. The typed fields are
read from the signed body (`freemark.records.wire.read_statement`), and `freemark.audit.receipt` checks
that they still agree with what was signed. Adding a field to a record is one line here plus
the proto field, which a drift test checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from freemark.records.schema import (
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
from freemark.tlog.signatures import canonical_json

__all__ = [
    "COARSE_ENDPOINT_VERDICT_KIND",
    "COARSE_VERDICT_KIND",
    "DISCLOSURES",
    "ENDPOINT_VERDICT_KIND",
    "LOCATIONS",
    "OUTCOMES",
    "PANEL_SOURCES",
    "RECEIPT_KIND",
    "REVOCATION_KIND",
    "VERDICT_KIND",
    "AnyEndpointVerdict",
    "AnyVerdict",
    "Checkpoint",
    "CoarseEndpointVerdict",
    "CoarseVerdict",
    "ConsistencyProof",
    "Decision",
    "EndpointBinding",
    "EndpointExchange",
    "EndpointVerdict",
    "InclusionProof",
    "PanelMemberEntry",
    "Receipt",
    "ReferencePanel",
    "RegistrationInfo",
    "Revocation",
    "SignedStatement",
    "SignedVerdict",
    "SuspectReading",
    "Verdict",
    "VerdictBinding",
    "VerdictPolicy",
    "VerdictTest",
]

# The `kind` of a signed body: it keeps a receipt from ever passing for a verdict and back.
RECEIPT_KIND = "freemark/v1/registration"
REVOCATION_KIND = "freemark/v1/revocation"
VERDICT_KIND = "freemark/v1/verdict"
COARSE_VERDICT_KIND = "freemark/v1/coarse-verdict"
ENDPOINT_VERDICT_KIND = "freemark/v1/endpoint-verdict"
COARSE_ENDPOINT_VERDICT_KIND = "freemark/v1/coarse-endpoint-verdict"
POLICY_KIND = "freemark/v1/verdict-policy"  # the domain of a policy's id

# What a verdict discloses: every statistic, or the outcome and a p-value bucket only.
DISCLOSURES = ("full", "coarse")

# A verdict's outcome: `inconclusive` when the tests that ran cannot reach alpha.
OUTCOMES = ("match", "no_match", "inconclusive")

# How a verdict located the tensor it read (`SuspectReading.located`).
LOCATIONS = ("named", "scan")
# Who brought a reference panel member: the registering owner, or the key server's operator.
PANEL_SOURCES = ("owner", "operator")


@dataclass(frozen=True)
class SignedStatement:
    """A statement the TTP signed: `body` is RFC 8785 JSON, the exact bytes signed and logged."""

    body: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class Checkpoint:
    """A signed log checkpoint as served: `note` is the exact C2SP signed note.

    The note's text is a `freemark.tlog.merkle.TreeHead` (origin, tree size, root, time; read it
    with `freemark.tlog.merkle.parse_checkpoint`); `tree_size` and `root_hash` repeat it, and
    `freemark.audit.receipt.verify_checkpoint` checks the signature and that they agree.
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


@dataclass(frozen=True, kw_only=True)
class PanelMemberEntry:
    """One model the TTP considered for a registration's reference panel: whose it is, and
    whether it was sealed. The sealed entries' fingerprints are exactly the panel whose
    digest the receipt signs (`freemark.audit.receipt.verify_receipt` checks it), so an owner
    can see which members the operator added and a court which ones calibrate the verdicts.
    """

    fingerprint: bytes = field(metadata=signed(HEX))  # SHA-256 of its weights
    source: str = field(metadata=signed(choice(*PANEL_SOURCES)))
    member_id: str = field(metadata=signed(TEXT))  # the operator's panel member id; "" for the owner's
    # Why it is not in the sealed panel (it leans toward the host); "" when sealed.
    left_out: str = field(metadata=signed(TEXT))

    @property
    def sealed(self) -> bool:
        return not self.left_out


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
    # The host's architecture family (`freemark.formats.pt2.architecture_digest`): the server
    # finds the earlier registrations a new upload is checked against by it, so it is signed.
    architecture_digest: bytes = field(default=b"", metadata=signed(HEX))
    # Every panel member considered, the owner's and the operator's, sealed or left out.
    panel_members: tuple[PanelMemberEntry, ...] = field(
        default=(), metadata=signed(list_of(nested(PanelMemberEntry))))
    # Set when the sealed panel cannot give a relabelled copy of the host a match at the
    # policy's default alpha (an operator who registers such panels with a warning rather
    # than refusing them); "" otherwise.
    panel_warning: str = field(default="", metadata=signed(TEXT))
    # Output keys only: SHA-256 over each query set's queries, in set order
    # (`freemark.blackbox.commit.query_set_commitment`); empty for a white-box key.
    query_sets: tuple[bytes, ...] = field(default=(), metadata=signed(list_of(HEX)))

    def __post_init__(self) -> None:
        if not isinstance(self.panel_members, tuple):
            object.__setattr__(self, "panel_members", tuple(self.panel_members))


@dataclass(frozen=True)
class Revocation:
    """A signed, logged revocation: who revoked which registration, when and why.

    The registration stays in the log and keeps its priority (see docs/keyserver.md): a
    revoked registration proves nothing in a dispute, and still blocks another owner from
    registering the same model as new.
    """

    KIND: ClassVar[str] = REVOCATION_KIND

    statement: SignedStatement
    registration_id: str = field(metadata=signed(TEXT))
    registration_log_index: int = field(metadata=signed(INTEGER))  # the receipt's log index
    revoked_by: str = field(metadata=signed(TEXT))
    reason: str = field(metadata=signed(TEXT))
    log_index: int = field(metadata=signed(INTEGER))
    integrated_time: int = field(metadata=signed(INTEGER))  # unix microseconds
    inclusion: InclusionProof


@dataclass(frozen=True, kw_only=True)
class VerdictTest:
    """One test a verdict ran: "plain" (bits matched, `statistic`, out of `n` bits) or another."""

    name: str = field(metadata=signed(TEXT))
    statistic: float = field(metadata=signed(NUMBER))
    n: int = field(metadata=signed(INTEGER))
    p_value: float = field(metadata=signed(NUMBER))
    log10_p_value: float = field(metadata=signed(NUMBER))
    method: str = field(metadata=signed(TEXT))


@dataclass(frozen=True, kw_only=True)
class VerdictPolicy:
    """The operator's rules for signing verdicts, signed into every verdict.

    The TTP signs verdicts only for alpha in [alpha_min, alpha_max]: a lax alpha (0.99)
    would let an owner frame an innocent model, an absurdly strict one would let anybody
    obtain a signed "no_match" for a real copy. `arbiter_disclosure` is what a requester
    other than the registration's owner gets: "full" statistics or a "coarse" verdict
    (outcome and p-value bucket). The owner always gets the full verdict: he holds the key
    and could compute every statistic himself. `id` is derived from the other fields
    (`make`), so a verifier recomputes it (`expected_id`) and two verdicts name one policy
    exactly when they were signed under the same rules.
    """

    alpha_min: float = field(metadata=signed(NUMBER))
    alpha_max: float = field(metadata=signed(NUMBER))
    arbiter_disclosure: str = field(metadata=signed(choice(*DISCLOSURES)))
    id: str = field(metadata=signed(TEXT))

    @classmethod
    def make(cls, *, alpha_min: float, alpha_max: float, arbiter_disclosure: str
             ) -> VerdictPolicy:
        """A policy with its id; raises ValueError for a range that is not 0 < min <= max < 1."""
        if not 0.0 < alpha_min <= alpha_max < 1.0:
            raise ValueError(f"the alpha range [{alpha_min:g}, {alpha_max:g}] must satisfy "
                             "0 < alpha_min <= alpha_max < 1")
        if arbiter_disclosure not in DISCLOSURES:
            raise ValueError(f"arbiter disclosure must be one of {', '.join(DISCLOSURES)}")
        return cls(alpha_min=alpha_min, alpha_max=alpha_max,
                   arbiter_disclosure=arbiter_disclosure,
                   id=_policy_id(alpha_min, alpha_max, arbiter_disclosure))

    @property
    def expected_id(self) -> str:
        """The id these rules have: "sha256:" and the hex of SHA-256 over their RFC 8785 JSON."""
        return _policy_id(self.alpha_min, self.alpha_max, self.arbiter_disclosure)

    def describe(self) -> str:
        """The range for messages and tables: "alpha in [1e-12, 1e-06]"."""
        return f"alpha in [{self.alpha_min:g}, {self.alpha_max:g}]"


def _policy_id(alpha_min: float, alpha_max: float, arbiter_disclosure: str) -> str:
    rules = {"kind": POLICY_KIND, "alpha_min": alpha_min, "alpha_max": alpha_max,
             "arbiter_disclosure": arbiter_disclosure}
    return "sha256:" + hashlib.sha256(canonical_json(rules)).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What every verdict says, offline or signed, full or coarse: is the watermark there?

    `is_match` iff the calibrated p <= alpha; `outcome` defaults to "match" or "no_match"
    from `is_match` ("inconclusive" when the tests that ran cannot reach alpha).
    """

    n_bits: int = field(metadata=signed(INTEGER))
    p_value: float = field(metadata=signed(NUMBER))
    log10_p_value: float = field(metadata=signed(NUMBER))
    alpha: float = field(metadata=signed(NUMBER))
    is_match: bool = field(metadata=signed(BOOLEAN))
    # Defaults keep callers that predate these fields (the lab's aligned verdict) working.
    outcome: str = field(default="", metadata=signed(choice(*OUTCOMES)))
    panel: ReferencePanel = field(default=NO_PANEL, metadata=signed(nested(ReferencePanel)))

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", "match" if self.is_match else "no_match")

    def as_dict(self) -> dict[str, object]:
        """The signed fields as JSON-ready values (the CLI's `--json`)."""
        return to_json_fields(self)


@dataclass(frozen=True, kw_only=True)
class Verdict(Decision):
    """A full judgement: the decision and the statistics behind it.

    Shared by the offline verdict (`freemark.extract`) and the TTP's `SignedVerdict`.
    `p_value` and `is_match` are the combined decision over `tests`.
    """

    matches: int = field(metadata=signed(INTEGER))
    ber: float = field(metadata=signed(NUMBER))
    p_value_method: str = field(metadata=signed(TEXT))
    p_value_binomial: float = field(metadata=signed(NUMBER))
    log10_p_value_binomial: float = field(metadata=signed(NUMBER))
    tests: tuple[VerdictTest, ...] = field(default=(), metadata=signed(list_of(nested(VerdictTest))))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tests, tuple):
            object.__setattr__(self, "tests", tuple(self.tests))


@dataclass(frozen=True, kw_only=True)
class SuspectReading:
    """What a TTP verdict read from the suspect, exactly, and who located it.

    `located` "named": the registered layer, read at the module the suspect's own names give
    it (a Hugging Face checkpoint or bare weights, whose names the architecture fixes, and a
    program); `tensor` is the layer's name and `candidates` 1. "scan": the key server judged
    every candidate tensor of the suspect (an ONNX graph, whose names are its author's) and
    `tensor` is the strongest; the verdict's p-value is `candidates` times that tensor's
    (capped at 1), so neither the file's names nor the requester choose what is read, and
    reading many tensors cannot make an independent model a match. `requested` is the tensor
    the requester named (empty: none), always one of the candidates (issue 18).
    """

    tensor: str = field(metadata=signed(TEXT))
    located: str = field(metadata=signed(choice(*LOCATIONS)))
    candidates: int = field(metadata=signed(INTEGER))
    requested: str = field(metadata=signed(TEXT))

    @classmethod
    def named(cls, layer: str) -> SuspectReading:
        """The reading of a suspect read at the registered layer by its name."""
        return cls(tensor=layer, located="named", candidates=1, requested="")

    def inconsistency(self) -> str | None:
        """Why these fields cannot describe a real reading, or None: a "named" reading reads
        one module and nothing requested; a scan reads at least its tensor."""
        if not self.tensor:
            return "the verdict's reading names no tensor"
        if self.located == "named" and (self.candidates != 1 or self.requested):
            return ("the verdict's reading is by the layer's name but says "
                    f"{self.candidates} candidates or a requested tensor")
        if self.located == "scan" and self.candidates < 1:
            return "the verdict's scan judged no candidate"
        if self.requested and self.located != "scan":
            return "a requested tensor may only be read as one candidate of a scan"
        return None


@dataclass(frozen=True, kw_only=True)
class VerdictBinding:
    """What ties a TTP verdict to one case: the registration, who asked, which file exactly
    (SHA-256 and size in bytes, as uploaded and checked), what was read from it and how it
    was located (`SuspectReading`), under which policy, and where it sits in the log. Shared
    by the full and the coarse verdict."""

    statement: SignedStatement
    registration_id: str = field(metadata=signed(TEXT))
    requested_by: str = field(metadata=signed(TEXT))
    suspect_sha256: bytes = field(metadata=signed(HEX))
    suspect_size: int = field(metadata=signed(INTEGER))
    policy: VerdictPolicy = field(metadata=signed(nested(VerdictPolicy)))
    reading: SuspectReading = field(metadata=signed(nested(SuspectReading)))
    log_index: int = field(metadata=signed(INTEGER))
    integrated_time: int = field(metadata=signed(INTEGER))  # unix microseconds
    inclusion: InclusionProof


@dataclass(frozen=True, kw_only=True)
class SignedVerdict(Verdict, VerdictBinding):
    """The TTP's signed, logged, full judgement of one suspect against one registration.

    Its signed body is the fields of `Verdict` plus the binding fields.
    """

    KIND: ClassVar[str] = VERDICT_KIND


@dataclass(frozen=True, kw_only=True)
class CoarseVerdict(Decision, VerdictBinding):
    """The TTP's signed, logged verdict for a requester under a coarse disclosure policy.

    It says the decision and how strong the evidence is, and nothing a thief could use as a
    gauge: no matches, BER, per-test statistics or null parameters. The p-value is given as
    a bucket: it lies in (`p_value_above`, `p_value`], where the buckets' edges are
    `freemark.verdict.decision.COARSE_EDGES` and alpha (so `p_value` <= alpha iff the exact one is).
    """

    KIND: ClassVar[str] = COARSE_VERDICT_KIND

    p_value_above: float = field(metadata=signed(NUMBER))


AnyVerdict = SignedVerdict | CoarseVerdict


@dataclass(frozen=True, kw_only=True)
class EndpointExchange:
    """One HTTP exchange of an endpoint verification: what was asked, how it was answered,
    and SHA-256 of the exact bodies (`freemark.endpoint.Exchange`, as signed)."""

    method: str = field(metadata=signed(TEXT))
    path: str = field(metadata=signed(TEXT))
    status: int = field(metadata=signed(INTEGER))
    inputs: int = field(metadata=signed(INTEGER))
    request_sha256: bytes = field(metadata=signed(HEX))
    response_sha256: bytes = field(metadata=signed(HEX))


@dataclass(frozen=True, kw_only=True)
class EndpointBinding:
    """What ties a TTP verdict on a live prediction endpoint to one conversation: the
    registration and who asked, the endpoint as normalised and the address connected to,
    the model name and the version that answered, what was read (labels or scores), the
    query set sent (its commitment from the receipt, and whether it had been disclosed
    before), the wall-clock window and every exchange's body hashes, under which policy,
    and where it sits in the log. Shared by the full and the coarse endpoint verdict."""

    statement: SignedStatement
    inclusion: InclusionProof
    registration_id: str = field(metadata=signed(TEXT))
    requested_by: str = field(metadata=signed(TEXT))
    endpoint: str = field(metadata=signed(TEXT))
    endpoint_address: str = field(metadata=signed(TEXT))
    model_name: str = field(metadata=signed(TEXT))
    model_version: str = field(metadata=signed(TEXT))
    answers: str = field(metadata=signed(choice("labels", "scores")))
    query_set: int = field(metadata=signed(INTEGER))
    query_set_commitment: bytes = field(metadata=signed(HEX))
    set_disclosures: int = field(metadata=signed(INTEGER))  # endpoints it was sent to before
    set_reused: bool = field(metadata=signed(BOOLEAN))  # every set was disclosed already
    started_at: int = field(metadata=signed(INTEGER))  # unix microseconds
    finished_at: int = field(metadata=signed(INTEGER))  # unix microseconds
    exchanges: tuple[EndpointExchange, ...] = field(
        metadata=signed(list_of(nested(EndpointExchange))))
    policy: VerdictPolicy = field(metadata=signed(nested(VerdictPolicy)))
    log_index: int = field(metadata=signed(INTEGER))
    integrated_time: int = field(metadata=signed(INTEGER))  # unix microseconds


def _exchanges_as_tuple(binding: EndpointBinding) -> None:
    if not isinstance(binding.exchanges, tuple):
        object.__setattr__(binding, "exchanges", tuple(binding.exchanges))


@dataclass(frozen=True, kw_only=True)
class EndpointVerdict(Verdict, EndpointBinding):
    """The TTP's signed, logged judgement of a model behind a live prediction endpoint.

    The judgement (`Verdict`: the output tests against the null the TTP measured on the
    registration's panel) bound to the conversation it was read from (`EndpointBinding`).
    An arbiter holding the bodies can show they are the ones judged; one holding only this
    can check the signature and the log inclusion (`freemark receipt verify`).
    """

    KIND: ClassVar[str] = ENDPOINT_VERDICT_KIND

    def __post_init__(self) -> None:
        super().__post_init__()
        _exchanges_as_tuple(self)


@dataclass(frozen=True, kw_only=True)
class CoarseEndpointVerdict(Decision, EndpointBinding):
    """The endpoint verdict a requester other than the registration's owner gets under a
    coarse disclosure policy, as `CoarseVerdict` is for a file: the decision and the
    p-value's bucket (`p_value_above`, `p_value`], no counts, per-test statistics or null
    parameters; the conversation's binding in full (it is the arbiter's own evidence of
    what was asked and answered)."""

    KIND: ClassVar[str] = COARSE_ENDPOINT_VERDICT_KIND

    p_value_above: float = field(metadata=signed(NUMBER))

    def __post_init__(self) -> None:
        super().__post_init__()
        _exchanges_as_tuple(self)


AnyEndpointVerdict = EndpointVerdict | CoarseEndpointVerdict


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
    # The signed revocation statement, with its inclusion proof, once revoked.
    revocation: Revocation | None = None
