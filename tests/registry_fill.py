"""A registry at hub scale, filled fast: synthetic registrations of one family, through the store.

What a test or bench needs to put K earlier registrations in front of one real Register
without registering K models: each synthetic registration is a receipt signed by the server's
key (the ledger and the audit accept it), appended with the store's batch append, carrying the
anchor's sealed bundle (so the full check on it is a real scan with a real key) and a sealed
claim signature near a real model's (so the claim index must rank among realistic
neighbours). Used by bench/registry.py and tests/integration/test_claim_index.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from freemark.records import wire
from freemark.records.types import NO_PANEL, RECEIPT_KIND, Receipt
from freemark.scheme.activations import capture
from freemark.scheme.probes import with_probes
from freemark_keyserver import claims
from freemark_keyserver.crypto import seal
from freemark_keyserver.handlers import panels
from freemark_keyserver.handlers.context import Context, sign_statement
from freemark_keyserver.store import Pending, Registration

BATCH = 500
NOISE = 0.02  # spread of a synthetic signature around its real base


def key_signature(model: nn.Module, anchor_triggers: Any, layer: str = "act") -> np.ndarray:
    """A model's claim signature: its key layer read on an index group's probes."""
    activations, _ = capture(model, layer, with_probes(anchor_triggers, claims.PROBES))
    vector = claims.signature(claims.probe_rows(activations))
    assert vector is not None
    return vector


def fill(ctx: Context, anchor: Registration, count: int, bases: Sequence[np.ndarray],
         start: int = 0, owner: str = "hub") -> None:
    """Append `count` synthetic registrations of the anchor's family, numbered from `start`,
    owned by `owner`, their signatures near `bases` (in turn)."""
    bundle, panel = panels.open_sealed(ctx, anchor)
    plaintext = panels.seal_bytes(bundle, panel)
    group = claims.group_of(bundle.triggers)
    rng = np.random.default_rng(start)

    def sign(body: bytes) -> tuple[str, bytes]:
        signed = sign_statement(ctx, body)
        return signed.key_id, signed.signature

    for first in range(start, start + count, BATCH):
        pending = []
        for number in range(first, min(first + BATCH, start + count)):
            rid = f"reg_synthetic{number:07d}"
            fingerprint = hashlib.sha256(rid.encode()).digest()
            record = Registration(
                registration_id=rid, owner=owner, created_at=0, host_fingerprint=fingerprint,
                architecture_digest=anchor.architecture_digest, layer=anchor.layer,
                units=anchor.units, n_bits=anchor.n_bits, commitment=anchor.commitment,
                key_version=ctx.keyring.current_version,
                envelope=seal(ctx.keyring, plaintext, record_id=rid, owner=owner).to_bytes(),
                host_envelope=b"synthetic", log_index=0)
            base = bases[number % len(bases)]
            vector = base + NOISE * rng.standard_normal(base.shape)
            claim = claims.sealed_claim(ctx.keyring, rid, owner, group, anchor.registration_id,
                                        (vector / np.linalg.norm(vector)).astype(np.float32))

            def body(i: int, t: int, rid: str = rid, fingerprint: bytes = fingerprint) -> bytes:
                return wire.encode_body(Receipt, {
                    "registration_id": rid, "owner": owner, "host_fingerprint": fingerprint,
                    "watermark_commitment": anchor.commitment, "layer": anchor.layer,
                    "n_bits": anchor.n_bits, "log_index": i, "integrated_time": t,
                    "panel": NO_PANEL, "architecture_digest": anchor.architecture_digest,
                    "panel_members": (), "panel_warning": "", "query_sets": ()})

            pending.append(Pending(RECEIPT_KIND, body, record, claim))
        for result in ctx.store.append_batch(pending, sign=sign):
            if isinstance(result, Exception):
                raise result
