"""VerifyEndpoint: judge a model behind a live Open Inference Protocol endpoint with a
registration's output key, and sign and log the verdict.

The key server is an HTTP client here, and the endpoint is hostile input
(`freemark.endpoint`, docs/blackbox.md): it queries only what the operator's allow-list
admits, under the policy's deadlines, caps, budget and per-endpoint rate limit. Every
refusal of the endpoint (`freemark.errors.EndpointError`) becomes the catalog's
`ErrorCode[REASON]` with its message, and nothing is signed or logged.

A query set is burned once an endpoint has seen it: the handler sends a set no endpoint has
seen while one remains, and otherwise the one disclosed to the fewest endpoints, and the
verdict says which (`set_disclosures`, `set_reused`). The disclosure is stored before the
first query leaves, so a verification that is then refused still counts it. The set's
queries go out shuffled among the set's natural ranking items (decoys, answered alike by
an honest endpoint, noisy or not), which also carry the session's repeated-query
consistency check. The answers are judged against the panel answers the TTP measured at
registration (`handlers.outputs`), never the owner's. A requester other than the
registration's owner gets the coarse form where the policy says so, as for a file Verify
(`context.disclosed`): the decision and a p-value bucket, with the conversation's binding
in full.

The set's commitment is hashed beside the conversation (`_BESIDE`), while the endpoint
computes and this thread waits for its answers; it signs and logs nothing, so a refused
conversation still signs and logs nothing. (The key is opened before the first request, in
this thread: opened beside the metadata request it gained nothing, its parsing holding the
interpreter lock the request needed.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from freemark.blackbox.commit import query_set_commitment
from freemark.blackbox.judge import judge_answers, set_items
from freemark.blackbox.key import OutputKey
from freemark.blackbox.responder import Answers, read_answers
from freemark.endpoint import EndpointRateLimiter, EndpointSession, Transcript
from freemark.errors import EndpointError, EndpointResponseError, InvalidInputError
from freemark.records import wire
from freemark.records.types import (
    AnyEndpointVerdict,
    CoarseEndpointVerdict,
    EndpointExchange,
    EndpointVerdict,
)
from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.auth import ADMIN, ARBITER, OWNER, require_role
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers import outputs, panels
from freemark_keyserver.handlers.context import (
    Admission,
    Context,
    append_entry,
    disclosed,
    inclusion_proof,
    policy_alpha,
    sign_statement,
)
from freemark_keyserver.handlers.lookups import visible
from freemark_keyserver.store import Principal, Registration

__all__ = ["MAX_MODEL_NAME", "choose_set", "verify_endpoint"]

log = logging.getLogger("freemark_keyserver")
MAX_MODEL_NAME = 256
MAX_URL = 2048
# Work a VerifyEndpoint does beside its conversation, while the endpoint computes and the
# handler's thread waits for the answers (hashing releases the interpreter lock): nothing
# here signs or logs, so a refused conversation leaves only a result nobody reads.
_BESIDE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="freemark-verify-endpoint")
Resolver = Callable[..., Any]


def _refused(exc: EndpointError) -> ServiceError:
    """The catalog's refusal for an endpoint failure: its reason, its message."""
    return ServiceError(ErrorCode[exc.REASON], str(exc),
                        retry_after=getattr(exc, "retry_after", None))


def choose_set(n_sets: int, disclosures: list[tuple[int, str]]) -> tuple[int, int]:
    """(set, how many endpoints saw it before): a set no endpoint has seen, else the one
    the fewest endpoints saw (the lowest-numbered among equals)."""
    seen = [set() for _ in range(n_sets)]  # type: list[set[str]]
    for query_set, endpoint in disclosures:
        if 0 <= query_set < n_sets:
            seen[query_set].add(endpoint)
    chosen = min(range(n_sets), key=lambda k: (len(seen[k]), k))
    return chosen, len(seen[chosen])


def _target(ctx: Context, principal: Principal, request: pb.VerifyEndpointRequest
            ) -> tuple[Registration, float, OutputKey, outputs.MeasuredPanel]:
    """Authorise before anything is sent: the caller's role, the registration visible and
    active and holding an output key (alone or beside a white-box key), the request's
    fields; the alpha to judge at, within the policy; and the key with its measured
    panel."""
    require_role(principal, OWNER, ARBITER, ADMIN)
    record = visible(ctx, principal, request.registration_id)
    if record.revoked_at is not None:
        raise ServiceError(ErrorCode.REVOKED,
                           f"registration {record.registration_id} was revoked; it proves nothing")
    sealed = panels.open_output_key(ctx, record)
    if sealed is None:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"registration {record.registration_id} holds a white-box key, read "
                           "from a model's activations: upload the suspect model with freemark "
                           "verify --model")
    if not request.endpoint or len(request.endpoint) > MAX_URL:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"endpoint must be an http(s) URL of at most {MAX_URL} characters")
    if not request.model_name or len(request.model_name) > MAX_MODEL_NAME:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"model_name must name the served model (1 to {MAX_MODEL_NAME} "
                           "characters)")
    return record, policy_alpha(ctx, request.alpha), *sealed


def verify_endpoint(ctx: Context, principal: Principal, request: pb.VerifyEndpointRequest, *,
                    admit: Admission, limiter: EndpointRateLimiter | None,
                    resolver: Resolver | None = None,
                    clock: Callable[[], float] = time.time) -> pb.EndpointVerdict:
    """The VerifyEndpoint call (module docstring)."""
    record, alpha, key, panel = _target(ctx, principal, request)
    admit.check(record)
    try:
        session = EndpointSession(request.endpoint, request.model_name,
                                  policy=ctx.config.endpoint_policy, limiter=limiter,
                                  resolver=resolver or ctx.resolver, clock=clock)
        kind = session.kind  # the metadata: labels or scores, before any query is sent
    except EndpointError as exc:
        raise _refused(exc) from exc
    admit.charge(record)
    set_id, before = choose_set(key.n_sets, ctx.store.disclosures(record.registration_id))
    ctx.store.add_disclosure(record.registration_id, set_id, session.endpoint,
                             int(clock() * 1_000_000))
    q, _ = set_items(key, set_id)
    # Hashed while the endpoint computes: this thread only waits for its answers then.
    commitment = _BESIDE.submit(query_set_commitment, key.queries[q])
    try:
        answers, ranking = _ask(session, key, set_id, labels_only=request.labels_only
                                or kind == "labels")
    except EndpointError as exc:
        log.info("VerifyEndpoint of %s by %s refused by the endpoint's answers (%s); set %d "
                 "counted as disclosed", record.registration_id, principal.name, exc.REASON,
                 set_id)
        raise _refused(exc) from exc
    verdict = judge_answers(key, set_id, answers, ranking, panel_query_scores=panel.query_scores,
                            panel_ranking_scores=panel.ranking_scores, alpha=alpha)
    transcript = session.transcript()
    binding = {
        "registration_id": record.registration_id, "requested_by": principal.name,
        **_bound(transcript), "answers": "scores" if answers.has_scores else "labels",
        "query_set": set_id, "query_set_commitment": commitment.result(),
        "set_disclosures": before, "set_reused": before > 0,
        "policy": ctx.config.verdict_policy,
    }
    coarse, judgement = disclosed(ctx, principal.name, record, verdict)
    verdict_type: type[AnyEndpointVerdict] = CoarseEndpointVerdict if coarse else EndpointVerdict
    body, index, _ = append_entry(ctx, verdict_type.KIND, lambda i, t: wire.encode_body(
        verdict_type, {**judgement, **binding, "log_index": i, "integrated_time": t}))
    log.info("endpoint verdict on %s by %s: %s (log10 p %.1f, %s, set %d%s) at log index %d",
             record.registration_id, principal.name, verdict.outcome, verdict.log10_p_value,
             "coarse" if coarse else "full", set_id, ", reused" if before else "", index)
    signed = wire.read_statement(verdict_type, sign_statement(ctx, body),
                                 inclusion_proof(ctx, index))
    return wire.endpoint_verdict_to_proto(signed)


def _ask(session: EndpointSession, key: OutputKey, set_id: int, *, labels_only: bool
         ) -> tuple[Answers, Answers | None]:
    """Send one set's queries among its natural ranking items, in one session (which sends
    every input, and the repeats drawn from the ranking items, in a secret random order), and
    read the answers back (the ranking items' only where scores are read)."""
    q, r = set_items(key, set_id)
    inputs = np.concatenate([key.queries[q], key.ranking_inputs[r]])
    decoys = np.arange(len(q), len(inputs))
    back = np.asarray(session.answer(inputs, repeat_from=decoys if len(decoys) else None))
    try:
        answers = read_answers(back[:len(q)], len(q), key.n_classes)
        ranking = None
        if answers.has_scores and not labels_only and len(r):
            ranking = read_answers(back[len(q):], len(r), key.n_classes)
    except InvalidInputError as exc:
        raise EndpointResponseError(f"{session.endpoint}: {exc}") from exc
    if labels_only:
        answers = Answers(labels=answers.labels, scores=None)
    return answers, ranking


def _bound(transcript: Transcript) -> dict[str, Any]:
    """The transcript's fields as the verdict signs them."""
    return {
        "endpoint": transcript.endpoint, "endpoint_address": transcript.address,
        "model_name": transcript.model_name, "model_version": transcript.model_version,
        "started_at": int(transcript.started_at * 1_000_000),
        "finished_at": int(transcript.finished_at * 1_000_000),
        "exchanges": tuple(EndpointExchange(
            method=e.method, path=e.path, status=e.status, inputs=e.inputs,
            request_sha256=bytes.fromhex(e.request_sha256),
            response_sha256=bytes.fromhex(e.response_sha256)) for e in transcript.exchanges),
    }
