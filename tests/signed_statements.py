"""Real signed receipts and verdicts for tests: a real Ed25519 key and a real Merkle log.

Offline verification must be tested against the genuine article, not mocks: these helpers
sign canonical bodies with the server's `SigningKey`, append them to an RFC 6962 tree, sign a
checkpoint over it, and wrap each statement the way the server returns it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from freemark.records.schema import to_json_fields
from freemark.records.types import (
    COARSE_VERDICT_KIND,
    ENDPOINT_VERDICT_KIND,
    RECEIPT_KIND,
    VERDICT_KIND,
    Checkpoint,
    CoarseVerdict,
    EndpointVerdict,
    InclusionProof,
    Receipt,
    SignedStatement,
    SignedVerdict,
    VerdictPolicy,
)
from freemark.records.wire import read_statement
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.crypto import SigningKey

ORIGIN = "freemark-test-log"
CHECKPOINT_TIME = 1_700_000_100  # unix seconds
POLICY = VerdictPolicy.make(alpha_min=1e-12, alpha_max=1e-6, arbiter_disclosure="coarse")


def receipt_body(log_index: int, **overrides: Any) -> dict[str, Any]:
    """The fields of a registration statement, as the proto's Receipt comment lists them."""
    return {
        "kind": RECEIPT_KIND,
        "registration_id": f"reg-{log_index:04d}",
        "owner": "alice",
        "integrated_time": 1_700_000_000_000_000 + log_index,
        "host_fingerprint": bytes(range(32)).hex(),
        "watermark_commitment": bytes(range(32, 64)).hex(),
        "layer": "act",
        "n_bits": 256,
        "log_index": log_index,
        "panel": {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()},
        "architecture_digest": bytes(range(96, 128)).hex(),
        "panel_members": [],
        "panel_warning": "",
        "query_sets": [],
        **overrides,
    }


def verdict_body(log_index: int, **overrides: Any) -> dict[str, Any]:
    """The fields of a verdict statement, as the proto's SignedVerdict comment lists them.

    `ber` is 0.0, which RFC 8785 writes as `0`: the verifier must read it back as a float.
    """
    return {
        "kind": VERDICT_KIND,
        "registration_id": "reg-0000",
        "requested_by": "arbiter-1",
        "suspect_sha256": bytes(range(64, 96)).hex(),
        "suspect_size": 123_456,
        "policy": to_json_fields(POLICY),
        "reading": {"tensor": "act", "located": "named", "candidates": 1, "requested": ""},
        "n_bits": 256,
        "matches": 256,
        "ber": 0.0,
        "p_value": 1.25e-25,
        "log10_p_value": -24.903089986991944,
        "p_value_method": "permutation-betabinomial",
        "p_value_binomial": 8.636168555094445e-78,
        "log10_p_value_binomial": -77.06367614624004,
        "alpha": 1e-9,
        "is_match": True,
        "outcome": "match",
        "tests": [{"name": "plain", "statistic": 256, "n": 256, "p_value": 1.25e-25,
                   "log10_p_value": -24.903089986991944, "method": "permutation-betabinomial"}],
        "panel": {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()},
        "integrated_time": 1_700_000_050_000_000,
        "log_index": log_index,
        **overrides,
    }


def endpoint_verdict_body(log_index: int, **overrides: Any) -> dict[str, Any]:
    """The fields of an endpoint verdict statement: a verdict's judgement (the output tests)
    bound to an endpoint conversation, as the proto's EndpointVerdict comment lists them."""
    full = verdict_body(log_index)
    judgement = {k: full[k] for k in ("n_bits", "ber", "p_value_method", "p_value_binomial",
                                      "log10_p_value_binomial", "alpha", "panel", "policy",
                                      "registration_id", "requested_by", "log_index",
                                      "integrated_time")}
    return {**judgement, "kind": ENDPOINT_VERDICT_KIND, "n_bits": 48, "matches": 40,
            "p_value": 1e-12, "log10_p_value": -12.0, "is_match": True, "outcome": "match",
            "tests": [{"name": "labels", "statistic": 40, "n": 48, "p_value": 1e-12,
                       "log10_p_value": -12.0, "method": "heldout-betabinomial"}],
            "endpoint": "http://127.0.0.1:8080", "endpoint_address": "127.0.0.1",
            "model_name": "mnist", "model_version": "1", "answers": "labels",
            "query_set": 1, "query_set_commitment": bytes(range(32)).hex(),
            "set_disclosures": 0, "set_reused": False,
            "started_at": full["integrated_time"] - 2_000_000,
            "finished_at": full["integrated_time"] - 1_000_000,
            "exchanges": [{"method": "GET", "path": "/v2/models/mnist", "status": 200,
                           "inputs": 0, "request_sha256": hashlib.sha256(b"").hexdigest(),
                           "response_sha256": bytes(range(1, 33)).hex()},
                          {"method": "POST", "path": "/v2/models/mnist/infer", "status": 200,
                           "inputs": 128, "request_sha256": bytes(range(2, 34)).hex(),
                           "response_sha256": bytes(range(3, 35)).hex()}],
            **overrides}


def coarse_verdict_body(log_index: int, **overrides: Any) -> dict[str, Any]:
    """The fields of a coarse verdict statement: the decision, the p-value's bucket and the
    binding fields, none of the statistics."""
    full = verdict_body(log_index)
    decision = {k: full[k] for k in ("registration_id", "requested_by", "suspect_sha256",
                                     "suspect_size", "policy", "reading", "n_bits", "alpha",
                                     "is_match", "outcome", "panel", "integrated_time",
                                     "log_index")}
    return {**decision, "kind": COARSE_VERDICT_KIND, "p_value": 1e-20, "log10_p_value": -20.0,
            "p_value_above": 1e-30, **overrides}


@dataclass(frozen=True)
class SignedLog:
    """A log of signed entries with one signed checkpoint over all of them."""

    signer: SigningKey
    entries: tuple[bytes, ...]
    signatures: tuple[bytes, ...]
    checkpoint: Checkpoint

    @property
    def leaves(self) -> list[bytes]:
        """The RFC 6962 leaf hashes of the entries."""
        return [merkle.leaf_hash(entry) for entry in self.entries]

    def inclusion(self, index: int, checkpoint: Checkpoint | None = None) -> InclusionProof:
        """Inclusion proof of entry `index` in the tree of `checkpoint` (default: the whole log)."""
        checkpoint = checkpoint or self.checkpoint
        proof = merkle.inclusion_proof(self.leaves[: checkpoint.tree_size], index)
        return InclusionProof(index, checkpoint.tree_size, tuple(proof), checkpoint)

    def statement(self, index: int) -> SignedStatement:
        """Entry `index` as a signed statement."""
        return SignedStatement(self.entries[index], self.signatures[index], self.signer.key_id)

    def receipt(self, index: int) -> Receipt:
        """Entry `index` (a registration body) as the server's typed Receipt, read from its body."""
        return read_statement(Receipt, self.statement(index), self.inclusion(index))

    def verdict(self, index: int) -> SignedVerdict:
        """Entry `index` (a verdict body) as the server's typed SignedVerdict, read from its body."""
        return read_statement(SignedVerdict, self.statement(index), self.inclusion(index))

    def endpoint_verdict(self, index: int) -> EndpointVerdict:
        """Entry `index` (an endpoint verdict body) as the server's typed EndpointVerdict."""
        return read_statement(EndpointVerdict, self.statement(index), self.inclusion(index))

    def coarse_verdict(self, index: int) -> CoarseVerdict:
        """Entry `index` (a coarse verdict body) as the server's typed CoarseVerdict."""
        return read_statement(CoarseVerdict, self.statement(index), self.inclusion(index))


def sign_checkpoint(signer: SigningKey, leaves: Sequence[bytes]) -> Checkpoint:
    """A checkpoint over `leaves` signed by `signer`, in the wire form."""
    checkpoint = merkle.TreeHead(
        origin=ORIGIN,
        tree_size=len(leaves),
        root_hash=merkle.root(leaves),
        timestamp=CHECKPOINT_TIME,
    )
    signed = merkle.sign_checkpoint(signer, checkpoint)
    return Checkpoint(signed.note, checkpoint.tree_size, checkpoint.root_hash)


def build_log(entries: Sequence[bytes], signer: SigningKey | None = None) -> SignedLog:
    """Sign every entry (raw bytes, so tests can log non-canonical ones) and checkpoint them."""
    signer = signer or SigningKey.generate()
    leaves = [merkle.leaf_hash(entry) for entry in entries]
    return SignedLog(
        signer=signer,
        entries=tuple(entries),
        signatures=tuple(signer.sign(entry) for entry in entries),
        checkpoint=sign_checkpoint(signer, leaves),
    )


def standard_log(signer: SigningKey | None = None) -> SignedLog:
    """Five entries: registrations at 0, 1, 2 and 4, a verdict at 3."""
    bodies = [receipt_body(0), receipt_body(1), receipt_body(2), verdict_body(3), receipt_body(4)]
    return build_log([canonical_json(body) for body in bodies], signer)


def endpoint_log(signer: SigningKey | None = None) -> SignedLog:
    """Two entries: a registration at 0 and an endpoint verdict of it at 1."""
    bodies = [receipt_body(0), endpoint_verdict_body(1, registration_id="reg-0000")]
    return build_log([canonical_json(body) for body in bodies], signer)


def coarse_log(signer: SigningKey | None = None) -> SignedLog:
    """Two entries: a registration at 0 and a coarse verdict of it at 1."""
    bodies = [receipt_body(0), coarse_verdict_body(1, registration_id="reg-0000")]
    return build_log([canonical_json(body) for body in bodies], signer)
