"""Offline verification of receipts and verdicts: real signatures, a real log, real tampering.

Each tamper case changes one thing an attacker (or a careless server) could change and must
make `verify_receipt` raise; the untouched statements must pass. Nothing is mocked.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, TypeAlias

import pytest

import freemark
from freemark.audit.receipt import (
    MAX_CHECKPOINT_SKEW_S,
    load_statement,
    save_statement,
    verify_checkpoint,
    verify_consistency_proof,
    verify_receipt,
)
from freemark.cli import main
from freemark.errors import InvalidInputError, InvalidReceiptError, VerificationFailedError
from freemark.records.types import (
    Checkpoint,
    ConsistencyProof,
    Receipt,
    ReferencePanel,
    SignedVerdict,
)
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.crypto import SigningKey
from signed_statements import (
    CHECKPOINT_TIME,
    ORIGIN,
    SignedLog,
    build_log,
    receipt_body,
    sign_checkpoint,
    standard_log,
    verdict_body,
)

Statement: TypeAlias = Receipt | SignedVerdict

LOG = standard_log()
PEM = LOG.signer.public_key_pem()
OTHER = SigningKey.generate()


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def _with_body(statement: Statement, body: bytes) -> Statement:
    return replace(statement, statement=replace(statement.statement, body=body))


def _with_checkpoint(statement: Statement, checkpoint: Checkpoint) -> Statement:
    return replace(statement, inclusion=replace(statement.inclusion, checkpoint=checkpoint))


def _resigned_body(statement: Statement, **changes: object) -> Statement:
    """The body re-canonicalised with `changes`, keeping the old signature."""
    fields = {**json.loads(statement.statement.body), **changes}
    return _with_body(statement, canonical_json(fields))


def _smaller_checkpoint(size: int) -> Checkpoint:
    """A genuine, correctly signed checkpoint of an earlier, smaller tree."""
    return sign_checkpoint(LOG.signer, LOG.leaves[:size])


def _checkpoint_other_key(statement: Statement) -> Statement:
    return _with_checkpoint(statement, sign_checkpoint(OTHER, LOG.leaves))


def _note_signature_changed(note: bytes, change: Callable[[bytes], bytes]) -> bytes:
    text, line = note.decode().rsplit("\n\n", 1)
    dash, name, blob = line.rstrip("\n").split(" ")
    raw = change(base64.b64decode(blob))
    return f"{text}\n\n{dash} {name} {base64.b64encode(raw).decode()}\n".encode()


def _shrunk_tree(statement: Statement) -> Statement:
    """Claim a smaller signed tree that does not yet hold the entry."""
    small = _smaller_checkpoint(statement.log_index)
    return replace(
        statement, inclusion=replace(statement.inclusion, tree_size=small.tree_size,
                                     checkpoint=small),
    )


def _shrunk_tree_old_proof(statement: Statement) -> Statement:
    """A genuine smaller checkpoint that holds the entry, with the big tree's proof."""
    small = _smaller_checkpoint(statement.log_index + 1)
    return replace(
        statement, inclusion=replace(statement.inclusion, tree_size=small.tree_size,
                                     checkpoint=small),
    )


def _typed_tree_size_only(statement: Statement) -> Statement:
    checkpoint = statement.inclusion.checkpoint
    smaller = replace(checkpoint, tree_size=checkpoint.tree_size - 1)
    return replace(
        statement, inclusion=replace(statement.inclusion, tree_size=smaller.tree_size,
                                     checkpoint=smaller),
    )


def _proof_hash_flipped(statement: Statement) -> Statement:
    hashes = list(statement.inclusion.hashes)
    hashes[0] = _flip(hashes[0], 0)
    return replace(statement, inclusion=replace(statement.inclusion, hashes=tuple(hashes)))


def _other_entry_altered(statement: Statement) -> Statement:
    """Another log entry changed and the tree re-rooted: the signed root no longer matches."""
    leaves = list(LOG.leaves)
    other = (statement.log_index + 1) % len(leaves)
    leaves[other] = merkle.leaf_hash(_flip(LOG.entries[other], 5))
    proof = merkle.inclusion_proof(leaves, statement.log_index)
    return replace(statement, inclusion=replace(statement.inclusion, hashes=tuple(proof)))


def _wrong_index(statement: Statement) -> Statement:
    return replace(statement, inclusion=LOG.inclusion((statement.log_index + 1) % 5))


Tamper = Callable[[Statement], Statement]


class Case(NamedTuple):
    """One tamper: what changes, and the error class and message pattern it must raise.

    VerificationFailedError is a subclass of InvalidReceiptError: the class says how precisely
    the failure is named, the pattern that it failed for the intended reason.
    """

    name: str
    tamper: Tamper
    error: type[Exception]
    match: str


def _signature_flipped(s: Statement) -> Statement:
    return replace(s, statement=replace(s.statement, signature=_flip(s.statement.signature, 3)))


def _checkpoint_signature_flipped(s: Statement) -> Statement:
    checkpoint = s.inclusion.checkpoint
    note = _note_signature_changed(checkpoint.note, lambda raw: _flip(raw, 7))
    return _with_checkpoint(s, replace(checkpoint, note=note))


def _checkpoint_root_flipped_in_note(s: Statement) -> Statement:
    checkpoint = s.inclusion.checkpoint
    old = base64.b64encode(checkpoint.root_hash)
    new = base64.b64encode(_flip(checkpoint.root_hash, 0))
    return _with_checkpoint(s, replace(checkpoint, note=checkpoint.note.replace(old, new)))


def _proof_hash_dropped(s: Statement) -> Statement:
    return replace(s, inclusion=replace(s.inclusion, hashes=s.inclusion.hashes[:-1]))


SIGNATURE = "statement signature"
CHECKPOINT_SIGNATURE = "checkpoint of size 5: "
WRONG_ROOT = "does not lead to the given root"

COMMON_TAMPERS = [
    Case("flipped byte in the body (the log entry)",
         lambda s: _with_body(s, _flip(s.statement.body, 10)), VerificationFailedError, SIGNATURE),
    Case("flipped byte in the signature", _signature_flipped, VerificationFailedError, SIGNATURE),
    Case("altered receipt time in the body",
         lambda s: _resigned_body(s, integrated_time=s.integrated_time + 1),
         VerificationFailedError, SIGNATURE),
    Case("altered typed time", lambda s: replace(s, integrated_time=s.integrated_time + 1),
         InvalidReceiptError, "^integrated_time"),
    Case("altered typed log index", lambda s: replace(s, log_index=s.log_index + 1),
         InvalidReceiptError, "^log_index"),
    Case("key id of another key",
         lambda s: replace(s, statement=replace(s.statement, key_id=OTHER.key_id)),
         VerificationFailedError, "signed by key"),
    Case("wrong checkpoint signature", _checkpoint_signature_flipped,
         VerificationFailedError, CHECKPOINT_SIGNATURE),
    Case("checkpoint signed by another key", _checkpoint_other_key,
         VerificationFailedError, CHECKPOINT_SIGNATURE),
    Case("checkpoint root altered in its note", _checkpoint_root_flipped_in_note,
         VerificationFailedError, CHECKPOINT_SIGNATURE),
    Case("typed checkpoint root differs from its body",
         lambda s: _with_checkpoint(s, replace(s.inclusion.checkpoint, root_hash=bytes(32))),
         InvalidReceiptError, "root_hash differs"),
    Case("shrunk tree: a signed checkpoint from before the entry", _shrunk_tree,
         VerificationFailedError, "outside a tree"),
    Case("shrunk tree: a smaller signed checkpoint with the old proof", _shrunk_tree_old_proof,
         VerificationFailedError, "proof is longer"),
    Case("shrunk tree: typed tree size cut, signed body unchanged", _typed_tree_size_only,
         InvalidReceiptError, "tree_size 4 differs"),
    Case("flipped byte in an inclusion proof hash", _proof_hash_flipped,
         VerificationFailedError, WRONG_ROOT),
    Case("another log entry altered, proof recomputed", _other_entry_altered,
         VerificationFailedError, WRONG_ROOT),
    Case("inclusion proof of another entry", _wrong_index,
         InvalidReceiptError, "inclusion proof is for log index"),
    Case("proof hash dropped", _proof_hash_dropped, VerificationFailedError, "proof is shorter"),
]

RECEIPT_TAMPERS = [
    Case("typed owner differs", lambda s: replace(s, owner="mallory"),
         InvalidReceiptError, "^owner 'mallory'"),
    Case("typed fingerprint differs",
         lambda s: replace(s, host_fingerprint=_flip(s.host_fingerprint, 0)),
         InvalidReceiptError, "^host_fingerprint 0101"),
    Case("typed registration id differs", lambda s: replace(s, registration_id="reg-9999"),
         InvalidReceiptError, "^registration_id"),
]

VERDICT_TAMPERS = [
    Case("typed decision flipped", lambda s: replace(s, is_match=not s.is_match),
         InvalidReceiptError, "^is_match False"),
    Case("typed p-value differs", lambda s: replace(s, p_value=s.p_value * 2),
         InvalidReceiptError, "^p_value 2.5e-25"),
    Case("typed BER differs", lambda s: replace(s, ber=0.25), InvalidReceiptError, "^ber 0.25"),
    Case("p-value changed in the body", lambda s: _resigned_body(s, p_value=0.5),
         VerificationFailedError, SIGNATURE),
]

CASES = [(LOG.receipt(2), case) for case in COMMON_TAMPERS + RECEIPT_TAMPERS] + [
    (LOG.verdict(3), case) for case in COMMON_TAMPERS + VERDICT_TAMPERS
]


def test_genuine_receipts_and_verdicts_verify() -> None:
    for index in (0, 1, 2, 4):
        verify_receipt(LOG.receipt(index), PEM)
    verify_receipt(LOG.verdict(3), PEM)


def test_a_receipt_under_an_older_checkpoint_that_holds_it_verifies() -> None:
    small = sign_checkpoint(LOG.signer, LOG.leaves[:3])
    verify_receipt(replace(LOG.receipt(2), inclusion=LOG.inclusion(2, small)), PEM)


@pytest.mark.parametrize(
    ("statement", "case"),
    CASES,
    ids=[f"{type(statement).__name__}: {case.name}" for statement, case in CASES],
)
def test_every_tampered_statement_is_refused(statement: Statement, case: Case) -> None:
    tampered = case.tamper(statement)
    assert tampered != statement
    with pytest.raises(case.error, match=case.match):
        verify_receipt(tampered, PEM)


def test_another_public_key_is_refused_and_names_both_keys() -> None:
    with pytest.raises(VerificationFailedError, match=OTHER.key_id):
        verify_receipt(LOG.receipt(0), OTHER.public_key_pem())


def test_a_public_key_that_is_not_ed25519_pem_is_an_input_error() -> None:
    with pytest.raises(InvalidInputError):
        verify_receipt(LOG.receipt(0), b"-----BEGIN PUBLIC KEY-----\nAA\n-----END PUBLIC KEY-----")


def _single(entry: bytes) -> SignedLog:
    return build_log([entry], LOG.signer)


def test_a_validly_signed_but_non_canonical_body_is_refused() -> None:
    spaced = json.dumps(receipt_body(0), indent=1).encode()
    log = _single(spaced)
    with pytest.raises(InvalidReceiptError, match="canonical"):
        verify_receipt(log.receipt(0), PEM)


def test_a_signed_verdict_cannot_pass_as_a_receipt() -> None:
    log = _single(canonical_json(verdict_body(0)))
    as_receipt = Receipt(
        statement=log.statement(0), registration_id="reg-0000", owner="alice",
        integrated_time=1, host_fingerprint=b"", watermark_commitment=b"", layer="act", n_bits=256,
        log_index=0,
        inclusion=log.inclusion(0),
    )
    with pytest.raises(InvalidReceiptError, match="not a 'freemark/v1/registration'"):
        verify_receipt(as_receipt, PEM)


def test_rfc8785_integer_form_of_a_float_matches_the_typed_float() -> None:
    verdict = LOG.verdict(3)
    assert b'"ber":0,' in verdict.statement.body and verdict.ber == 0.0
    verify_receipt(verdict, PEM)


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("statement", [LOG.receipt(4), LOG.verdict(3)], ids=["receipt", "verdict"])
def test_a_saved_statement_loads_back_equal_and_verifies(
    tmp_path: Path, statement: Statement
) -> None:
    path = tmp_path / "statement.json"
    save_statement(path, statement)
    loaded = load_statement(path)
    assert loaded == statement
    verify_receipt(loaded, PEM)


def test_a_file_whose_readable_body_differs_from_the_signed_bytes_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "receipt.json"
    save_statement(path, LOG.receipt(1))
    data = json.loads(path.read_text())
    data["body"]["owner"] = "mallory"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidReceiptError, match="readable statement body"):
        load_statement(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [("not json", "not JSON"), ("[]", "must be a JSON object"), ('{"kind": "x"}', "neither")],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidReceiptError, match=match):
        load_statement(path)


# --- checkpoints and consistency ----------------------------------------------------------


def test_verify_checkpoint_returns_the_signed_contents() -> None:
    checkpoint = verify_checkpoint(LOG.checkpoint, PEM)
    assert (checkpoint.tree_size, checkpoint.root_hash) == (5, merkle.root(LOG.leaves))


def test_a_statement_later_than_its_checkpoint_is_refused() -> None:
    late = CHECKPOINT_TIME + MAX_CHECKPOINT_SKEW_S + 1
    log = _single(canonical_json(receipt_body(0, integrated_time=late * 1_000_000)))
    with pytest.raises(VerificationFailedError, match="after its checkpoint's"):
        verify_receipt(log.receipt(0), PEM)
    within = CHECKPOINT_TIME + MAX_CHECKPOINT_SKEW_S
    verify_receipt(_single(canonical_json(receipt_body(0, integrated_time=within * 1_000_000)))
                   .receipt(0), PEM)


def test_a_pinned_origin_refuses_a_checkpoint_of_another_log() -> None:
    verify_receipt(LOG.receipt(0), PEM, origin=ORIGIN)
    with pytest.raises(VerificationFailedError, match="not of the expected 'ttp.example/log'"):
        verify_receipt(LOG.receipt(0), PEM, origin="ttp.example/log")
    with pytest.raises(VerificationFailedError, match="not of the expected"):
        verify_checkpoint(LOG.checkpoint, PEM, origin="ttp.example/log")


def _consistency(old_size: int) -> tuple[ConsistencyProof, Checkpoint]:
    proof = merkle.consistency_proof(LOG.leaves, old_size)
    return (
        ConsistencyProof(old_size, 5, tuple(proof), LOG.checkpoint),
        _smaller_checkpoint(old_size),
    )


def test_a_consistency_proof_between_signed_checkpoints_verifies() -> None:
    for old_size in range(1, 6):
        verify_consistency_proof(*_consistency(old_size), PEM)


def test_a_forked_older_checkpoint_fails_consistency() -> None:
    proof, _ = _consistency(3)
    forked_leaves = [*LOG.leaves[:2], merkle.leaf_hash(b"rewritten history")]
    with pytest.raises(VerificationFailedError):
        verify_consistency_proof(proof, sign_checkpoint(LOG.signer, forked_leaves), PEM)


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def pem_file(tmp_path: Path) -> Path:
    path = tmp_path / "ttp.pem"
    path.write_bytes(PEM)
    return path


def test_cli_receipt_verify_prints_ok_and_exits_0(
    tmp_path: Path, pem_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, statement in (("r.json", LOG.receipt(0)), ("v.json", LOG.verdict(3))):
        save_statement(tmp_path / name, statement)
        assert main(["receipt", "verify", str(tmp_path / name), "--public-key", str(pem_file)]) == 0
        assert capsys.readouterr().out.startswith("OK ")


def test_cli_receipt_verify_exits_1_with_one_line_on_a_tampered_file(
    tmp_path: Path, pem_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    save_statement(path, replace(LOG.receipt(0), integrated_time=42))
    assert main(["receipt", "verify", str(path), "--public-key", str(pem_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "integrated_time" in captured.err


def test_cli_receipt_verify_exits_2_on_a_missing_file(
    tmp_path: Path, pem_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["receipt", "verify", str(tmp_path / "nope.json"), "--public-key",
                 str(pem_file)]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_the_library_verifies_without_the_server_package() -> None:
    """The library never imports the server: auditors install only `freemark`."""
    code = (
        "import sys, freemark, freemark.audit.receipt, freemark.rpc, freemark.tlog.merkle, freemark.cli.app\n"
        "assert not [m for m in sys.modules if m.startswith('freemark_keyserver')]\n"
    )
    client_root = Path(freemark.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(client_root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _panel_member(fingerprint: bytes, member_id: str = "", left_out: str = "") -> dict[str, str]:
    return {"fingerprint": fingerprint.hex(), "source": "operator" if member_id else "owner",
            "member_id": member_id, "left_out": left_out}


def _panel_receipt(members: list[dict[str, str]], sealed: list[bytes], **fields: object
                   ) -> Receipt:
    """A genuinely signed receipt listing `members` and signing the digest of `sealed`."""
    panel = ReferencePanel.of(sealed)
    body = receipt_body(0, panel={"size": panel.size, "sha256": panel.sha256.hex()},
                        panel_members=members, **fields)
    return _single(canonical_json(body)).receipt(0)


OWNERS = [bytes([n]) * 32 for n in (1, 2, 3)]
OPERATORS = [bytes([n]) * 32 for n in (7, 8)]


def test_a_receipt_names_each_panel_member_and_its_source() -> None:
    """Issue 18, item 7: the receipt lists the owner's and the operator's members, sealed or
    left out, and the sealed ones are exactly the panel it signs."""
    members = [*(_panel_member(f) for f in OWNERS), _panel_member(OPERATORS[0], "pan_a"),
               _panel_member(OPERATORS[1], "pan_b", left_out="leans toward the host")]
    receipt = _panel_receipt(members, [*OWNERS, OPERATORS[0]], panel_warning="")
    verify_receipt(receipt, PEM)
    assert [(m.source, m.member_id, m.sealed) for m in receipt.panel_members] == [
        ("owner", "", True)] * 3 + [("operator", "pan_a", True), ("operator", "pan_b", False)]


@pytest.mark.parametrize(("members", "sealed", "match"), [
    # the digest signs a member the list says was left out (or the reverse)
    ([_panel_member(OWNERS[0]), _panel_member(OPERATORS[0], "pan_a", left_out="leans")],
     [OWNERS[0], OPERATORS[0]], "sealed members"),
    ([_panel_member(OWNERS[0])], [OWNERS[0], OPERATORS[0]], "sealed members"),
    # an operator's member passed off as the owner's, and the reverse
    ([{**_panel_member(OPERATORS[0], "pan_a"), "source": "owner"}], [OPERATORS[0]],
     "operator's id"),
    ([{**_panel_member(OWNERS[0]), "source": "operator"}], [OWNERS[0]], "no member id"),
    ([_panel_member(OWNERS[0]), _panel_member(OWNERS[0])], [OWNERS[0]], "twice"),
], ids=["left-out-but-signed", "unlisted", "operator-as-owner", "owner-as-operator", "twice"])
def test_a_receipt_whose_panel_members_contradict_its_panel_is_refused(
        members: list[dict[str, str]], sealed: list[bytes], match: str) -> None:
    with pytest.raises(InvalidReceiptError, match=match):
        verify_receipt(_panel_receipt(members, sealed), PEM)


def test_a_receipt_panel_member_of_an_unknown_source_is_refused() -> None:
    members = [{**_panel_member(OWNERS[0]), "source": "someone"}]
    with pytest.raises(InvalidReceiptError, match="source"):
        _panel_receipt(members, [OWNERS[0]])
