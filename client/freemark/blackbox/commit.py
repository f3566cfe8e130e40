"""The public commitment to an output key's query sets, logged in the receipt.

A query set is burned once an endpoint has seen it, so the log must say which queries were
registered, and when, without disclosing them: SHA-256 over each set's queries. Anybody who
later holds a disclosed set (an arbiter given the queries, the endpoint's operator who
received them) can recompute the digest and find it in the receipt.
"""

from __future__ import annotations

import hashlib

import numpy as np

from freemark.blackbox.judge import set_items
from freemark.blackbox.key import OutputKey

__all__ = ["QUERY_SET_DOMAIN", "query_set_commitment", "query_set_commitments"]

QUERY_SET_DOMAIN = b"freemark/v1/query-set\n"


def query_set_commitment(queries: np.ndarray) -> bytes:
    """SHA-256 over one set's queries in key order: a domain line, their dtype and shape as
    text, then their raw C-order bytes (so a reshaped or retyped set is another set)."""
    array = np.ascontiguousarray(queries)
    head = f"{array.dtype.str} {','.join(str(d) for d in array.shape)}\n".encode()
    return hashlib.sha256(QUERY_SET_DOMAIN + head + array.tobytes()).digest()


def query_set_commitments(key: OutputKey) -> tuple[bytes, ...]:
    """Every set's commitment, in set order (the receipt's `query_sets`)."""
    return tuple(query_set_commitment(key.queries[set_items(key, k)[0]])
                 for k in range(key.n_sets))
