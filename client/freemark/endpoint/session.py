"""One verification's conversation with one Open Inference Protocol v2 endpoint.

`EndpointSession` parses and checks the URL, resolves the name once and checks every answer
against the policy's allow-list, then talks only to the checked address: metadata first
(what the model takes and whether it answers labels or scores), then the queries in batches.
Every exchange goes into the transcript. A session is one verdict's worth of queries: the
query budget and the total deadline count over all of its calls.

Batches go out one at a time, but the endpoint is not left idle while the client works: the
next batch is encoded, and the last reply decoded and checked, while the endpoint computes
the current one (`transport.send`, then `Pending.reply`). So a reply refused as malformed
is refused after the next batch went out; the set is burned either way (the key server
counts it as disclosed before the first query).

Consistency (a lying endpoint): `answer` sends `policy.repeats` of the inputs a second time,
shuffled with all the others into random positions of random batches, and refuses the
endpoint when more than `policy.max_disagreement` of the repeats get a different top-1 class.
A deterministic model, and a copy behind deterministic preprocessing, answers every repeat
the same; an endpoint whose answers are not a function of the inputs (randomised answers,
answers that depend on the batch or on how often it was asked) is caught. An endpoint that
adds noise to its inputs flips answers near the decision boundary, so the caller should draw
repeats from natural inputs (`repeat_from`, e.g. the decoys a query set is shuffled among):
those do not sit on a boundary, and an honest noisy endpoint answers them the same.
"""

from __future__ import annotations

import re
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from freemark.endpoint.oip import (
    Kind,
    ModelMetadata,
    check_inputs,
    decode_infer,
    encode_infer,
    parse_metadata,
)
from freemark.endpoint.policy import Address, EndpointPolicy, normalise_address
from freemark.endpoint.ratelimit import EndpointRateLimiter
from freemark.endpoint.transcript import Exchange, Transcript, sha256_hex
from freemark.endpoint.transport import Destination, Pending, send
from freemark.errors import (
    EndpointBudgetError,
    EndpointInconsistentError,
    EndpointResponseError,
    EndpointUnreachableError,
    InvalidInputError,
)

__all__ = ["EndpointSession", "Resolver"]

Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's signature and answer

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _base(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an OIP base URL such as http://host:8080."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidInputError(f"endpoint URL {url!r} is malformed ({e})") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise InvalidInputError(f"endpoint URL {url!r}: the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(f"endpoint URL {url!r}: credentials in the URL are not accepted")
    if parts.query or parts.fragment:
        raise InvalidInputError(f"endpoint URL {url!r}: give the base URL (scheme://host:port), "
                                "without a query or fragment")
    host = (parts.hostname or "").rstrip(".")
    prefix = parts.path.rstrip("/")
    if not host or not _PREFIX.match(prefix) or any(p in ("", ".", "..")
                                                    for p in prefix.split("/")[1:]):
        raise InvalidInputError(f"endpoint URL {url!r}: no host, or a path with characters other "
                                "than letters, digits and ._~-")
    return parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme], prefix


def _name(value: str, what: str) -> str:
    if not _MODEL.match(value):
        raise InvalidInputError(f"{what} {value!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return value


class EndpointSession:
    """One verification against one model behind one OIP v2 REST endpoint.

    `resolver` (socket.getaddrinfo by default) is asked once, here; every address it gives
    must pass the allow-list, and each connection goes to the first of them. `limiter` is the
    per-endpoint rate limit kept by the caller across sessions (none for an owner's own
    check). `clock` stamps the transcript; `monotonic` runs the deadlines; `rng` picks and
    places the repeats (a fresh secret seed by default, so an endpoint cannot predict them).
    """

    def __init__(self, url: str, model: str, *, policy: EndpointPolicy,
                 version: str | None = None, output: str | None = None,
                 resolver: Resolver = socket.getaddrinfo,
                 limiter: EndpointRateLimiter | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 rng: np.random.Generator | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        scheme, host, port, prefix = _base(url)
        self.model = _name(model, "model name")
        self._version = _name(version, "model version") if version else ""
        self._output = output
        self.policy = policy
        self.origin = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
        self.endpoint = self.origin + prefix
        policy.check_host(host)
        addresses = self._resolve(resolver, host, port)
        policy.check_addresses(host, addresses)
        self._destination = Destination(scheme, host, port, str(addresses[0]))
        path = f"{prefix}/v2/models/{self.model}"
        self._model_path = path + (f"/versions/{self._version}" if self._version else "")
        self._limiter = limiter
        self._clock, self._monotonic = clock, monotonic
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._context = ssl_context
        self._deadline: float | None = None
        self._started = 0.0
        self._finished = 0.0
        self._exchanges: list[Exchange] = []
        self._versions: set[str] = set()
        self._metadata: ModelMetadata | None = None

    def _resolve(self, resolver: Resolver, host: str, port: int) -> list[Address]:
        try:
            return [normalise_address(host)]
        except ValueError:
            pass
        try:
            answers = resolver(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise EndpointUnreachableError(f"{self.endpoint}: the name {host!r} does not resolve "
                                           f"({e})") from None
        addresses: list[Address] = []
        for answer in answers:
            address = normalise_address(str(answer[4][0]))
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise EndpointUnreachableError(f"{self.endpoint}: the name {host!r} has no address")
        return addresses

    @property
    def address(self) -> str:
        """The checked address every connection of this session goes to."""
        return self._destination.address

    def _send(self, method: str, path: str, body: bytes | None) -> Pending:
        """Send one request to the checked address (`transport.send`); the first starts the
        total deadline and the transcript's time window."""
        if self._deadline is None:
            self._deadline = self._monotonic() + self.policy.total_timeout_s
            self._started = self._clock()
        return send(self._destination, method, path, body,
                    connect_timeout=self.policy.connect_timeout_s,
                    read_timeout=self.policy.read_timeout_s, deadline=self._deadline,
                    max_bytes=self.policy.max_response_bytes, monotonic=self._monotonic,
                    context=self._context)

    def _finish(self, pending: Pending, method: str, path: str, body: bytes | None,
                inputs: int) -> bytes:
        """Read a sent request's reply and put the exchange into the transcript (the request
        hashed first, while the endpoint computes: the next request waits on no hash of this
        one once the reply is in)."""
        request_sha256 = sha256_hex(body or b"")
        reply = pending.reply()
        self._finished = self._clock()
        self._exchanges.append(Exchange(method, path, reply.status, request_sha256,
                                        sha256_hex(reply.body), inputs))
        return reply.body

    def _request(self, method: str, path: str, body: bytes | None, inputs: int) -> bytes:
        return self._finish(self._send(method, path, body), method, path, body, inputs)

    def metadata(self) -> ModelMetadata:
        """The model's checked metadata (asked once per session)."""
        if self._metadata is None:
            body = self._request("GET", self._model_path, None, 0)
            self._metadata = parse_metadata(body, model=self.model, output=self._output,
                                            where=self.endpoint + self._model_path)
            if self._version and self._metadata.versions and \
                    self._version not in self._metadata.versions:
                raise EndpointResponseError(f"{self.endpoint}: model {self.model!r} has no "
                                            f"version {self._version!r}")
        return self._metadata

    @property
    def kind(self) -> Kind:
        """"labels" or "scores": what the endpoint answers, told from its metadata."""
        return self.metadata().kind

    def answer(self, inputs: np.ndarray, *, repeat_from: Sequence[int] | np.ndarray | None = None
               ) -> np.ndarray:
        """The endpoint's answers to `inputs` (batch first): labels as int64 [n], or scores as
        [n, C] in the declared float type. Refuses, sending nothing, when the inputs do not fit
        the metadata or the budget; refuses an inconsistent endpoint (module docstring)."""
        inputs = np.asarray(inputs)
        n = int(inputs.shape[0]) if inputs.ndim else 0
        if n < 1:
            raise InvalidInputError("answer() needs at least one input (batch first)")
        meta = self.metadata()
        infer_path = self._model_path + "/infer"
        where = self.endpoint + infer_path
        wire = check_inputs(inputs, meta, where)
        pool = np.arange(n) if repeat_from is None else np.unique(np.asarray(repeat_from,
                                                                            dtype=np.int64))
        if pool.size and (pool.min() < 0 or pool.max() >= n):
            raise InvalidInputError("repeat_from holds an index outside the inputs")
        k = min(self.policy.repeats, int(pool.size))
        planned = n + k
        sent = sum(e.inputs for e in self._exchanges)
        if sent + planned > self.policy.query_budget:
            raise EndpointBudgetError(
                f"{self.endpoint}: {planned} queries ({n} and {k} repeats) after {sent} already "
                f"sent would pass the budget of one verification ({self.policy.query_budget}); "
                "nothing was sent")
        if self._limiter is not None:
            self._limiter.take(self.origin, planned)
        repeats = self._rng.choice(pool, size=k, replace=False)
        # Slot s < n is input s; slot n + j is the repeat of input repeats[j]. Send slots in a
        # random order, so a repeat lands anywhere, in any batch.
        order = self._rng.permutation(planned)
        source = np.concatenate([np.arange(n), repeats])
        by_slot: list[np.ndarray | None] = [None] * planned
        # A pipeline of one request in flight: the next batch is encoded, and the last reply
        # decoded, while the endpoint computes the current one (never two requests at once).
        current = self._batch(inputs, source, order, meta, wire)
        start = len(current[0])
        pending: Pending | None = self._send("POST", infer_path, current[2])
        try:
            while pending is not None:
                following = self._batch(inputs, source, order[start:], meta, wire) \
                    if start < planned else None
                body = self._finish(pending, "POST", infer_path, current[2], len(current[0]))
                pending = None
                if following is not None:
                    pending = self._send("POST", infer_path, following[2])
                    start += len(following[0])
                slots, request_id, _ = current
                reply = decode_infer(body, meta=meta, request_id=request_id, n=len(slots),
                                     where=where)
                self._note_version(reply.model_version, where)
                for slot, value in zip(slots, reply.answers):
                    by_slot[slot] = value
                if following is not None:
                    current = following
        finally:
            if pending is not None:
                pending.close()
        answers = np.stack([a for a in by_slot if a is not None])
        if meta.kind == "scores" and answers.ndim != 2:
            raise EndpointResponseError(f"{where}: the batches disagree on the number of classes")
        self._check_repeats(answers, n, repeats, where)
        return answers[:n]

    def _batch(self, inputs: np.ndarray, source: np.ndarray, pending: np.ndarray,
               meta: ModelMetadata, wire: np.dtype[Any]) -> tuple[np.ndarray, str, bytes]:
        """The next request: up to `max_batch` of the pending slots, halved until its body is
        within `max_request_bytes` (a single query over it is refused: nothing can carry it)."""
        size = min(self.policy.max_batch, len(pending))
        request_id = uuid.uuid4().hex
        while True:
            slots = pending[:size]
            body = encode_infer(inputs[source[slots]], meta, wire, request_id)
            if len(body) <= self.policy.max_request_bytes:
                return slots, request_id, body
            if size == 1:
                raise EndpointBudgetError(
                    f"{self.endpoint}: one query is {len(body)} bytes of JSON, over the "
                    f"{self.policy.max_request_bytes}-byte limit of one request; nothing more "
                    "was sent")
            size //= 2

    def _note_version(self, version: str, where: str) -> None:
        self._versions.add(version)
        if len(self._versions) > 1 or (self._version and version not in ("", self._version)):
            shown = ", ".join(repr(v) for v in sorted(self._versions | {self._version} - {""}))
            raise EndpointResponseError(f"{where}: answers came from model versions {shown} in "
                                        "one verification; a verdict needs one model")

    def _check_repeats(self, answers: np.ndarray, n: int, repeats: np.ndarray, where: str) -> None:
        if not repeats.size:
            return
        top1 = answers if answers.ndim == 1 else answers.argmax(axis=1)
        differ = int(np.count_nonzero(top1[n:] != top1[repeats]))
        if differ > self.policy.max_disagreement * repeats.size:
            raise EndpointInconsistentError(
                f"{where}: answered {differ} of {repeats.size} repeated queries differently (at "
                f"most {self.policy.max_disagreement:.0%} may differ): its answers are not a "
                "function of its inputs, so they cannot be evidence; nothing was signed")

    def transcript(self) -> Transcript:
        """The conversation so far, bound by hashes (freemark.endpoint.transcript)."""
        version = next(iter(self._versions), "") if len(self._versions) == 1 else ""
        return Transcript(self.endpoint, self.address, self.model, version or self._version,
                          self._started, self._finished, tuple(self._exchanges))
