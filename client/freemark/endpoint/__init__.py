"""Querying a model behind an Open Inference Protocol v2 REST endpoint, as untrusted input.

One implementation serves the owner's `freemark extract --endpoint` and the key server's
endpoint verification. The endpoint is attack surface: whoever names it may point it
anywhere, and whoever runs it may answer anything. So every request is under an
`EndpointPolicy` (allow-list checked on resolved addresses, no redirects, verified TLS,
connect/read/total deadlines, a response cap checked while reading, a query budget per
verification, a per-endpoint rate limit) and every answer is read strictly against the
model's metadata. Every failure is an `EndpointError` (freemark.errors) whose `REASON` is
the refusal the key server sends.

Quick start::

    from freemark.endpoint import EndpointPolicy, EndpointSession
    session = EndpointSession("http://127.0.0.1:8080", "mnist",
                              policy=EndpointPolicy(allow=("127.0.0.1",)))
    answers = session.answer(queries)  # labels [n] or scores [n, C], as session.kind says
    transcript = session.transcript()  # endpoint, model, version, time window, SHA-256s

Modules: `policy` (the value type and the allow-list rules), `transport` (one HTTP exchange
over http.client, pinned to the checked address), `oip` (the protocol's messages, read
strictly), `session` (one verification), `transcript`, `ratelimit`.
"""

from freemark.endpoint.oip import ModelMetadata, TensorSpec
from freemark.endpoint.policy import EndpointPolicy
from freemark.endpoint.ratelimit import EndpointRateLimiter
from freemark.endpoint.session import EndpointSession, Resolver
from freemark.endpoint.transcript import Exchange, Transcript

__all__ = ["EndpointPolicy", "EndpointRateLimiter", "EndpointSession", "Exchange",
           "ModelMetadata", "Resolver", "TensorSpec", "Transcript"]
