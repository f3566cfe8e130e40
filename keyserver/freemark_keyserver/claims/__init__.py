"""The claim index: which earlier registrations a new upload is worth checking against.

Register's prior-claim check (`handlers.register`) runs the upload on an earlier owner's secret
triggers and judges every tensor with that owner's key: sound, but a run per earlier
registration of the same input kind, hours at a hub's 10,000 fine-tunes of one base model.
The index picks the few earlier registrations an upload could be a copy of, so only those get
the full check: `signature` (what is compared: a tensor's probe-similarity structure, blind to
relabelled, rescaled and padded units) and `index` (the sealed signatures, kept in an exact
inner-product index per input group, rebuilt from the store and shared by replicas through
it). docs/keyserver.md, "The claim index", says what it cannot see.
"""

from freemark_keyserver.claims.index import ClaimIndex, claim_record_id, sealed_claim
from freemark_keyserver.claims.signature import (
    PROBES,
    group_of,
    input_kind,
    kind_of_inputs,
    probe_rows,
    signature,
)

__all__ = [
    "PROBES",
    "ClaimIndex",
    "claim_record_id",
    "group_of",
    "input_kind",
    "kind_of_inputs",
    "probe_rows",
    "sealed_claim",
    "signature",
]
