"""Offline verification of receipts, verdicts and checkpoints with the TTP's public key alone.

A receipt is evidence of priority only if a third party can check it without trusting the
server that issued it (DESIGN §3, flow 4). `verify_receipt` checks everything a file claims:

1. the statement names the given public key (`key_id`) and its Ed25519 signature covers the
   exact body bytes;
2. the body is RFC 8785 canonical JSON (re-canonicalising the parsed body gives the same bytes,
   so no second reading of the signed bytes exists) of the expected `kind`;
3. every typed field equals the signed body's field (the field list of `freemark.records.types`;
   the typed copy is for convenience only);
4. the checkpoint is a C2SP signed note of the same key under its origin's name (and of the
   pinned origin, if one is given), its typed tree size and root match the note, and the
   statement's time is not after the checkpoint's (beyond `MAX_CHECKPOINT_SKEW_S`);
5. the inclusion proof places `leaf_hash(body)` at the body's `log_index` under that root;
6. a verdict agrees with itself: its policy's id is the digest of its rules, its alpha is
   inside the policy's range, `is_match` is p <= alpha and `outcome` agrees with it; its
   reading (`SuspectReading`: the tensor read, how it was located, among how many
   candidates, what the requester named) is one a key server could have made, and a full
   verdict on a scan carries the Bonferroni correction over its candidates.
7. a receipt agrees with itself: the panel members it lists as sealed are exactly the panel
   whose digest it signs, none is listed twice, and each operator's member has its id (the
   owner's none).

Two checks need more than the file: `verify_suspect` that a verdict is about a given file
(SHA-256 and size, as signed; for a scanned graph, that it computes the tensors the verdict
names), so a genuine verdict cannot be replayed as evidence about another model;
`verify_in_log` that the statement is in the log a later checkpoint signs.

Every check raises (`InvalidReceiptError`, or `VerificationFailedError` for cryptographic
failures) with a one-line reason; nothing returns a bool a caller could ignore.

Quick start::

    statement = load_statement("receipt.json")        # written by `freemark register --json`
    verify_receipt(statement, Path("ttp.pem").read_bytes())
    verify_suspect(load_statement("verdict.json"), Path("suspect.pt2"))
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from freemark.errors import InvalidInputError, InvalidReceiptError, VerificationFailedError
from freemark.records.schema import from_json_fields
from freemark.records.types import (
    AnyEndpointVerdict,
    AnyVerdict,
    Checkpoint,
    CoarseEndpointVerdict,
    CoarseVerdict,
    ConsistencyProof,
    EndpointVerdict,
    Receipt,
    ReferencePanel,
    Revocation,
    SignedVerdict,
    Verdict,
)
from freemark.records.wire import (
    endpoint_verdict_to_json,
    parse_body,
    receipt_to_json,
    revocation_to_json,
    statement_from_json,
    typed_mismatch,
    verdict_to_json,
)
from freemark.tlog import merkle
from freemark.tlog.signatures import CryptoError, Verifier, canonical_json

__all__ = [
    "MAX_CHECKPOINT_SKEW_S",
    "load_statement",
    "save_statement",
    "verify_checkpoint",
    "verify_consistency_proof",
    "verify_in_log",
    "verify_receipt",
    "verify_suspect",
]

Statement = Receipt | AnyVerdict | Revocation | AnyEndpointVerdict
_READ_CHUNK = 1 << 20
# How far (seconds) a statement's time may pass its checkpoint's: the checkpoint's time is
# its last entry's rounded down to the second, so an honest log never needs more than 1.
MAX_CHECKPOINT_SKEW_S = 2
# Rounding room when a verdict's log10 p-value is compared with its tests' (JSON numbers).
_LOG10_TOLERANCE = 1e-9


def _verifier(public_key_pem: bytes) -> Verifier:
    try:
        return Verifier.from_pem(public_key_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidInputError("the public key is not an Ed25519 public key in PEM form") from None


def _check_canonical(body: bytes, what: str) -> dict[str, Any]:
    """Parse a signed body and require it to be its own canonical form, byte for byte."""
    fields = parse_body(body, what)
    try:
        canonical = canonical_json(fields)
    except ValueError:  # rfc8785's errors (integers past 2**53, lone surrogates) are ValueErrors
        raise InvalidReceiptError(f"the {what} body cannot be canonicalised") from None
    if canonical != body:
        raise InvalidReceiptError(f"the {what} body is not RFC 8785 canonical JSON")
    return fields


def _verified_checkpoint(checkpoint: Checkpoint, verifier: Verifier, origin: str | None
                         ) -> merkle.TreeHead:
    try:
        parsed = merkle.parse_checkpoint(checkpoint.note)
    except merkle.LogProofError as exc:
        raise InvalidReceiptError(str(exc)) from None
    if origin is not None and parsed.origin != origin:
        raise VerificationFailedError(
            f"the checkpoint is of log {parsed.origin!r}, not of the expected {origin!r}")
    try:
        merkle.open_checkpoint(checkpoint.note, verifier, origin)
    except merkle.LogProofError as exc:
        raise VerificationFailedError(f"checkpoint of size {parsed.tree_size}: {exc}") from None
    if checkpoint.tree_size != parsed.tree_size:
        raise InvalidReceiptError(
            f"the checkpoint's tree_size {checkpoint.tree_size} differs from its signed note's "
            f"{parsed.tree_size}"
        )
    if checkpoint.root_hash != parsed.root_hash:
        raise InvalidReceiptError("the checkpoint's root_hash differs from its signed note's")
    return parsed


def verify_checkpoint(checkpoint: Checkpoint, public_key_pem: bytes, *,
                      origin: str | None = None) -> merkle.TreeHead:
    """Check a checkpoint's signed note (and its origin, if pinned); return its contents."""
    return _verified_checkpoint(checkpoint, _verifier(public_key_pem), origin)


def verify_consistency_proof(
    proof: ConsistencyProof, older: Checkpoint, public_key_pem: bytes, *,
    origin: str | None = None,
) -> merkle.TreeHead:
    """Raise unless the log signed in `older` is a prefix of the one signed in `proof`.

    This is how a holder of an old receipt checks the log only ever grew since: fetch a
    consistency proof from the receipt's checkpoint size to the latest and check it here.
    Both checkpoints must be of one log (`origin` if pinned) and time must not go backwards.
    Returns the newer checkpoint's contents.
    """
    verifier = _verifier(public_key_pem)
    old = _verified_checkpoint(older, verifier, origin)
    new = _verified_checkpoint(proof.checkpoint, verifier, origin or old.origin)
    if (proof.old_size, proof.new_size) != (old.tree_size, new.tree_size):
        raise InvalidReceiptError(
            f"the proof is for sizes {proof.old_size} -> {proof.new_size}, the checkpoints "
            f"have {old.tree_size} and {new.tree_size}"
        )
    try:
        merkle.check_successor(old, new)
        merkle.verify_consistency(
            old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof.hashes
        )
    except merkle.LogProofError as exc:
        raise VerificationFailedError(str(exc)) from None
    return new


def verify_receipt(statement: Statement, public_key_pem: bytes, *,
                   origin: str | None = None) -> None:
    """Raise unless `statement` is a genuine, logged receipt or verdict of this TTP key.

    The checks are listed in the module docstring; `origin`, when given, pins the log the
    checkpoint must be of. `InvalidInputError` means the public key itself is unusable; any
    fault in the statement is an `InvalidReceiptError`.
    """
    verifier = _verifier(public_key_pem)
    signed = statement.statement
    if signed.key_id != verifier.key_id:
        raise VerificationFailedError(
            f"the statement is signed by key {signed.key_id!r}, "
            f"but the public key given is {verifier.key_id!r}"
        )
    try:
        verifier.verify(signed.signature, signed.body)
    except CryptoError:
        raise VerificationFailedError(
            "the statement signature does not verify: the body or signature was altered"
        ) from None
    kind = type(statement).KIND
    body = _check_canonical(signed.body, "statement")
    if body.get("kind") != kind:
        raise InvalidReceiptError(f"the signed body is a {body.get('kind')!r}, not a {kind!r}")
    mismatch = typed_mismatch(statement, from_json_fields(type(statement), body, "signed body"))
    if mismatch is not None:
        raise InvalidReceiptError(mismatch)
    if isinstance(statement, (SignedVerdict, CoarseVerdict, EndpointVerdict,
                              CoarseEndpointVerdict)):
        _check_verdict(statement)
    if isinstance(statement, (EndpointVerdict, CoarseEndpointVerdict)):
        _check_endpoint_verdict(statement)
    if isinstance(statement, Receipt):
        _check_panel_members(statement)
    _check_inclusion(statement, verifier, origin)


def _check_endpoint_verdict(verdict: AnyEndpointVerdict) -> None:
    """An endpoint verdict must bind a conversation: exchanges that carried the queries it
    counts, inside a time window that ends before the verdict was logged."""
    sent = sum(e.inputs for e in verdict.exchanges)
    if not verdict.exchanges or sent < verdict.n_bits:
        raise InvalidReceiptError(f"the endpoint verdict judges {verdict.n_bits} queries but "
                                  f"its exchanges carried {sent} inputs")
    if not verdict.started_at <= verdict.finished_at <= verdict.integrated_time:
        raise InvalidReceiptError("the endpoint verdict's time window is not before its log "
                                  "time")


def _check_verdict(verdict: AnyVerdict | AnyEndpointVerdict) -> None:
    """A signed verdict must be consistent: its policy's id, alpha and decision."""
    policy = verdict.policy
    if policy.id != policy.expected_id:
        raise InvalidReceiptError(f"the verdict's policy id {policy.id!r} is not the digest of "
                                  f"its rules ({policy.expected_id!r})")
    if not policy.alpha_min <= verdict.alpha <= policy.alpha_max:
        raise InvalidReceiptError(f"the verdict's alpha {verdict.alpha:g} is outside its own "
                                  f"policy ({policy.describe()})")
    if verdict.is_match != (verdict.log10_p_value <= math.log10(verdict.alpha)):
        raise InvalidReceiptError(f"the verdict says is_match={verdict.is_match} for p-value "
                                  f"{verdict.p_value:.3g} at alpha {verdict.alpha:g}")
    if (verdict.outcome == "match") != verdict.is_match:
        raise InvalidReceiptError(f"the verdict's outcome {verdict.outcome!r} contradicts "
                                  f"is_match={verdict.is_match}")
    if isinstance(verdict, EndpointVerdict):
        _check_correction(verdict, 1)
    if isinstance(verdict, (EndpointVerdict, CoarseEndpointVerdict)):  # answers, not tensors
        return
    reading = verdict.reading
    why = reading.inconsistency()
    if why is not None:
        raise InvalidReceiptError(why)
    if isinstance(verdict, SignedVerdict):
        _check_correction(verdict, reading.candidates if reading.located == "scan" else 1)


def _check_correction(verdict: Verdict, candidates: int) -> None:
    """A full verdict's p-value is at least k × its smallest test's over its k tests (the
    decision's Bonferroni correction, `decision.decide`), times the candidate tensors a scan
    judged (`decision.strongest_of`): a verdict that combines a white-box and an output
    key's tests, or an output key's three, cannot claim more than the correction allows."""
    if not verdict.tests:
        return
    strongest = min(t.log10_p_value for t in verdict.tests)
    k = len(verdict.tests)
    floor = min(0.0, strongest + math.log10(k) + math.log10(candidates))
    if verdict.log10_p_value < floor - _LOG10_TOLERANCE:
        scan = (f" × the {candidates} candidate tensors its scan judged: a scan's verdict must "
                "be corrected for the candidates it judged" if candidates > 1 else "")
        raise InvalidReceiptError(f"the verdict's p-value {verdict.p_value:.3g} is below {k} × "
                                  f"its strongest test's{scan} (Bonferroni over its tests)")


def _check_panel_members(receipt: Receipt) -> None:
    """A receipt's panel members must be the panel it signs, each with a consistent source."""
    listed = [member.fingerprint for member in receipt.panel_members]
    if len(set(listed)) != len(listed):
        raise InvalidReceiptError("the receipt lists a panel member twice")
    for member in receipt.panel_members:
        if (member.source == "operator") != bool(member.member_id):
            raise InvalidReceiptError(
                f"panel member {member.fingerprint.hex()[:16]} is the {member.source}'s but "
                + ("has an operator's id" if member.member_id else "has no member id"))
    sealed = [member.fingerprint for member in receipt.panel_members if member.sealed]
    if ReferencePanel.of(sealed) != receipt.panel:
        raise InvalidReceiptError(
            f"the receipt's panel digest ({receipt.panel.size} members) is not that of the "
            f"{len(sealed)} sealed members it lists")


def _file_digest(path: Path) -> tuple[bytes, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InvalidInputError(f"{path}: {exc.strerror or exc}") from exc
    return digest.digest(), size


def verify_suspect(verdict: AnyVerdict, path: str | Path) -> None:
    """Raise `VerificationFailedError` unless `path` is exactly the file `verdict` judged.

    The verdict signs the suspect's SHA-256 and size as uploaded; a verdict about another
    file (the owner's own host, say) proves nothing about this one. Check the verdict
    itself with `verify_receipt` first.
    """
    path = Path(path)
    sha256, size = _file_digest(path)
    if (sha256, size) != (verdict.suspect_sha256, verdict.suspect_size):
        raise VerificationFailedError(
            f"{path} is not the file this verdict is about: it has SHA-256 {sha256.hex()} and "
            f"{size} bytes, the verdict judged SHA-256 {verdict.suspect_sha256.hex()} of "
            f"{verdict.suspect_size} bytes")
    if verdict.reading.located == "scan":  # a graph: the tensors it names are in it
        from freemark.formats.onnx import load_onnx

        computed = {name for node in load_onnx(path).graph.node for name in node.output}
        for name in filter(None, (verdict.reading.tensor, verdict.reading.requested)):
            if name not in computed:
                raise VerificationFailedError(
                    f"{path} computes no tensor {name!r}, which this verdict says it read")


def verify_in_log(statement: Statement, latest: Checkpoint | ConsistencyProof,
                  public_key_pem: bytes, *, origin: str | None = None) -> None:
    """Raise unless `statement` is in the log that `latest` (a checkpoint you trust, from a
    monitor or a witness) signs.

    Given a checkpoint of the same size as the statement's own, the two must have one root
    (two roots for one size is a fork). For a later checkpoint, give the consistency proof
    from the statement's checkpoint to it (`GetConsistencyProof`, `consistency_to_json`): the
    log the statement is in must be a prefix of the later one. Check the statement itself
    with `verify_receipt` first.
    """
    own = statement.inclusion.checkpoint
    if isinstance(latest, ConsistencyProof):
        if latest.old_size != own.tree_size:
            raise InvalidReceiptError(
                f"the consistency proof starts from a log of {latest.old_size} entries, the "
                f"statement's checkpoint signs {own.tree_size}")
        verify_consistency_proof(latest, own, public_key_pem, origin=origin)
        return
    mine = verify_checkpoint(own, public_key_pem, origin=origin)
    later = verify_checkpoint(latest, public_key_pem, origin=mine.origin)
    if later.tree_size <= statement.log_index:
        raise VerificationFailedError(
            f"the checkpoint signs a log of {later.tree_size} entries, which does not hold "
            f"entry {statement.log_index}: the statement is not in that log")
    if later.tree_size < mine.tree_size:
        raise InvalidReceiptError(
            f"the checkpoint signs {later.tree_size} entries, fewer than the statement's own "
            f"({mine.tree_size}): give a later checkpoint")
    if later.tree_size != mine.tree_size:
        raise InvalidReceiptError(
            f"the checkpoint signs {later.tree_size} entries, the statement's proof is for "
            f"{mine.tree_size}: give the consistency proof from {mine.tree_size} to "
            f"{later.tree_size} instead of the bare checkpoint")
    if later.root_hash != mine.root_hash:
        raise VerificationFailedError(
            f"the checkpoint and the statement's own sign two different logs of "
            f"{later.tree_size} entries: the log forked")


def _check_inclusion(statement: Statement, verifier: Verifier, origin: str | None) -> None:
    proof = statement.inclusion
    checkpoint = _verified_checkpoint(proof.checkpoint, verifier, origin)
    # The checkpoint's time is its last entry's, so no entry it holds can be later; a small
    # skew allows for the seconds it is rounded down to.
    if statement.integrated_time > (checkpoint.timestamp + MAX_CHECKPOINT_SKEW_S) * 1_000_000:
        raise VerificationFailedError(
            f"the statement's time ({statement.integrated_time // 1_000_000} s) is after its "
            f"checkpoint's ({checkpoint.timestamp} s) by more than {MAX_CHECKPOINT_SKEW_S} s: "
            "a log cannot hold an entry later than its own tree head"
        )
    if proof.log_index != statement.log_index:
        raise InvalidReceiptError(
            f"the inclusion proof is for log index {proof.log_index}, "
            f"the statement for {statement.log_index}"
        )
    if proof.tree_size != checkpoint.tree_size:
        raise InvalidReceiptError(
            f"the inclusion proof is for a tree of {proof.tree_size}, "
            f"the checkpoint signs {checkpoint.tree_size}"
        )
    try:
        merkle.verify_inclusion(
            merkle.leaf_hash(statement.statement.body),
            proof.log_index,
            checkpoint.tree_size,
            proof.hashes,
            checkpoint.root_hash,
        )
    except merkle.LogProofError as exc:
        raise VerificationFailedError(f"the statement is not in the signed log: {exc}") from None


def load_statement(path: str | Path) -> Statement:
    """Read a receipt or verdict JSON file, as `freemark register|verify --json` prints it.

    Reading checks only the format; call `verify_receipt` before relying on it.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise InvalidReceiptError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidReceiptError(f"{path} is not JSON ({exc})") from None
    return statement_from_json(data)


def save_statement(path: str | Path, statement: Statement) -> None:
    """Write a receipt, verdict or revocation as the JSON file `load_statement` reads."""
    if isinstance(statement, Receipt):
        data = receipt_to_json(statement)
    elif isinstance(statement, Revocation):
        data = revocation_to_json(statement)
    elif isinstance(statement, (EndpointVerdict, CoarseEndpointVerdict)):
        data = endpoint_verdict_to_json(statement)
    else:
        data = verdict_to_json(statement)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
