"""What was said to an endpoint and what it answered, bound by hashes: the transcript.

One definition, for both sides: the key server puts it into a signed verdict, an owner's
`extract --endpoint` prints it. It names the endpoint as queried (URL, the address actually
connected to, model name and the version that answered), the time window on the wall clock,
and for every HTTP exchange the SHA-256 of the exact request and response bodies, so anyone
holding the bodies can show they are the ones the verdict was computed from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Exchange", "Transcript", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Exchange:
    """One request and its 2xx answer (a failed exchange ends the session; none is kept)."""

    method: str  # "GET" (metadata) or "POST" (infer)
    path: str  # e.g. /v2/models/mnist/infer
    status: int
    request_sha256: str  # of the exact body sent (of b"" for a GET)
    response_sha256: str  # of the exact body received
    inputs: int  # queries carried by the request (0 for metadata)


@dataclass(frozen=True)
class Transcript:
    """The whole conversation of one verification with one endpoint."""

    endpoint: str  # the base URL as normalised (scheme://host:port[/prefix])
    address: str  # the checked address every connection went to
    model_name: str
    model_version: str  # as the replies gave it ("" when they gave none)
    started_at: float  # unix seconds, wall clock, before the first request
    finished_at: float  # unix seconds, after the last answer
    exchanges: tuple[Exchange, ...]

    @property
    def inputs_sent(self) -> int:
        return sum(e.inputs for e in self.exchanges)
