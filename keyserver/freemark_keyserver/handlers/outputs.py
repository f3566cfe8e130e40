"""Output keys at the TTP: the key read from a Register header, the host and the panel read
through their outputs in the sandbox, and the sealed form kept with the registration.

An output key (`freemark.blackbox`, docs/blackbox.md) is judged on a model's answers alone,
against a null fitted on the panel's answers. The owner's key carries the panel's answers as
he measured them; the TTP never uses those: it runs every reference in its sandbox on the
key's queries and ranking items and seals its own measurement beside the key
(`seal_bytes`). A registration holding an output key is marked by its layer, `OUTPUTS_LAYER`
(no module can be called that), so the white-box flows skip it. A registration may also
hold an output key beside its white-box key (one Register carrying both): its sealed form is
then inside the white-box registration's (`panels.open_output_key`).

A model file is judged on an output key too (`suspect_tests`): the sandbox reads its
answers to every query, and the output tests join the verdict. And a later Register is
judged with every earlier output key the same way (`claim_runs`, `claimed_by`): a match is
a prior claim on the upload, whatever key kind it is registered with.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freemark.blackbox.archive import read_npz
from freemark.blackbox.judge import check_host_answers, output_tests
from freemark.blackbox.key import OutputKey, decode_output_key, encode_output_key
from freemark.blackbox.responder import Answers
from freemark.errors import InvalidInputError
from freemark.verdict.decision import DEFAULT_ALPHA
from freemark.verdict.outputs import RANK_DEPTH, OutputTest, decide_outputs
from freemark_keyserver.crypto import Envelope, open_envelope
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.context import Context, sandbox_refusals
from freemark_keyserver.sandbox.runner import ModelIdentity, TriggerRun
from freemark_keyserver.store import Registration

__all__ = ["MIN_ARCHITECTURES", "MIN_REFERENCES", "OUTPUTS_LAYER", "MeasuredPanel", "Reading",
           "check_host", "claim_runs", "claimed_by", "host_runs", "is_output_registration",
           "measure_panel", "open_bytes", "open_sealed", "parse_key", "read_host",
           "reading_of", "seal_bytes", "suspect_tests"]

# The receipt's and the store's layer for an output key: parentheses never name a module.
OUTPUTS_LAYER = "(outputs)"
# As the library's derivation requires (`freemark.blackbox.queries.check_panel`): half the
# panel shapes each fold and the other half is the held-out null.
MIN_REFERENCES = 8
MIN_ARCHITECTURES = 2
SEALED_MAGIC = b"freemark/v1/sealed-output-key\n"


def is_output_registration(record: Registration) -> bool:
    """Whether `record` holds an output key (judged through outputs, never activations)."""
    return record.layer == OUTPUTS_LAYER


def parse_key(raw: bytes, owner: str, max_bytes: int) -> OutputKey:
    """The output key of a Register header, checked, and bound to the caller."""
    if len(raw) > max_bytes:
        raise ServiceError(ErrorCode.TOO_LARGE, f"output key over the cap of {max_bytes} bytes")
    try:
        key = decode_output_key(raw)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_BUNDLE, str(exc)) from exc
    if key.owner != owner:
        raise ServiceError(ErrorCode.PERMISSION_DENIED,
                           f"the watermark is bound to owner {key.owner!r}, you are {owner!r}: "
                           f"derive the key with --owner {owner}")
    return key


@dataclass(frozen=True)
class Reading:
    """One model's answers, read in the sandbox: scores on the queries and ranking items."""

    identity: ModelIdentity
    architecture: bytes  # `freemark.formats.pt2.shape_digest`
    query_scores: np.ndarray  # (Q, C)
    ranking_scores: np.ndarray  # (R, C)


def host_runs(key: OutputKey) -> list[TriggerRun]:
    """The sandbox runs that read a model's answers to a key's queries and ranking items."""
    return [TriggerRun.outputs_of(key.queries), TriggerRun.outputs_of(key.ranking_inputs)]


def reading_of(key: OutputKey, identity: ModelIdentity,
               results: Sequence[np.ndarray | Exception], what: str, *, classes: bool = True
               ) -> Reading:
    """A model's `Reading` from the results of its `host_runs` (the first two); a failed run
    raises its own refusal (`sandbox_refusals`)."""
    answers: list[np.ndarray] = []
    for result in results[:2]:
        if isinstance(result, Exception):
            with sandbox_refusals():
                raise result
        answers.append(result)
    queries, ranking = answers
    if classes and queries.shape[1] != key.n_classes:
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{what} answers {queries.shape[1]} classes; "
                           f"the key is for {key.n_classes}")
    return Reading(identity, bytes(getattr(queries, "architecture", b"")),
                   np.asarray(queries, dtype=np.float64), np.asarray(ranking, dtype=np.float64))


def _read(ctx: Context, path: Path, key: OutputKey, what: str, *, classes: bool = True
          ) -> Reading:
    with sandbox_refusals():
        identity, results = ctx.batch(path, host_runs(key), limits=ctx.config.sandbox,
                                      options={})
    return reading_of(key, identity, results, what, classes=classes)


def suspect_tests(ctx: Context, path: Path, key: OutputKey, panel: MeasuredPanel
                  ) -> list[OutputTest]:
    """The output tests of an uploaded suspect (a .pt2 program, read in the sandbox like the
    host): its scores on every set's queries and ranking items, judged against the panel
    answers the TTP measured at registration. Every set at once: a file read in the
    sandbox discloses no query to anyone, so nothing is burned and all the evidence
    counts. Raises InvalidInputError for a suspect that answers another number of classes
    than the host (the key cannot be read on it)."""
    reading = _read(ctx, path, key, "the suspect", classes=False)
    if reading.query_scores.shape[1] != key.n_classes:
        raise InvalidInputError(f"the suspect answers {reading.query_scores.shape[1]} classes; "
                                f"the output key is for {key.n_classes}")
    return _tests_of(key, panel, reading.query_scores, reading.ranking_scores)


def _tests_of(key: OutputKey, panel: MeasuredPanel, query_scores: np.ndarray,
              ranking_scores: np.ndarray) -> list[OutputTest]:
    """The output tests of a model's scores on every set's queries and ranking items."""
    answers = Answers(labels=query_scores.argmax(axis=1), scores=query_scores)
    ranking = Answers(labels=ranking_scores.argmax(axis=1), scores=ranking_scores)
    return output_tests(key, None, answers, ranking, panel_query_scores=panel.query_scores,
                        panel_ranking_scores=panel.ranking_scores)


def claim_runs(key: OutputKey) -> list[TriggerRun]:
    """The sandbox runs that read an upload's answers to an earlier output key's queries and
    ranking items, for Register's prior-claim check (`claimed_by`)."""
    return [TriggerRun.outputs_of(key.queries, claim=True),
            TriggerRun.outputs_of(key.ranking_inputs, claim=True)]


def claimed_by(key: OutputKey, panel: MeasuredPanel,
               answers: Sequence[np.ndarray | Exception]) -> float | None:
    """Whether an earlier output key claims an upload, from its `claim_runs`' answers: the
    log10 p of its verdict when that is a match at the default alpha (every set at once,
    as a file Verify reads it), 0.0 when a run failed (fail closed: a thief cannot buy a
    clearance by making his copy fail on the queries), None when it is not a copy (it
    does not take the key's inputs, or answers another number of classes: the key cannot
    be read on it) or the key does not match it. Nothing of this is shown to the caller."""
    queries, ranking = answers
    if isinstance(queries, Exception) or isinstance(ranking, Exception):
        return 0.0
    if queries.shape[1] != key.n_classes or ranking.shape[1] != key.n_classes:
        return None
    verdict = decide_outputs(_tests_of(key, panel, np.asarray(queries, dtype=np.float64),
                                       np.asarray(ranking, dtype=np.float64)),
                             key.panel, alpha=DEFAULT_ALPHA)
    return verdict.log10_p_value if verdict.is_match else None


def read_host(ctx: Context, path: Path, key: OutputKey) -> Reading:
    """Read the host; it must be the key's host and answer every query and ranking item as
    the key says (`check_host`)."""
    host = _read(ctx, path, key, "the host")
    check_host(key, host)
    return host


def check_host(key: OutputKey, host: Reading) -> None:
    """HOST_MISMATCH unless `host` is the key's host (its fingerprint) and answers every query
    and ranking item as the key says."""
    if host.identity.fingerprint != key.host_fingerprint:
        raise ServiceError(ErrorCode.HOST_MISMATCH,
                           "the uploaded model's weights are not the ones the output key was "
                           "derived on (host fingerprint differs)")
    try:
        check_host_answers(key, host.query_scores.argmax(axis=1))
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.HOST_MISMATCH, str(exc)) from exc
    orders = np.argsort(-host.ranking_scores, axis=1, kind="stable")[:, :RANK_DEPTH]
    wrong = int(np.count_nonzero(np.any(orders != key.ranking_orders, axis=1)))
    if wrong:
        raise ServiceError(ErrorCode.HOST_MISMATCH,
                           f"the host ranks {wrong} of {len(orders)} natural ranking items "
                           f"otherwise than the key says")


@dataclass(frozen=True)
class MeasuredPanel:
    """The panel's answers as the TTP measured them, in the key's panel order."""

    fingerprints: np.ndarray  # (P, 32) uint8
    query_scores: np.ndarray  # (P, Q, C) float32
    ranking_scores: np.ndarray  # (P, R, C) float32


def measure_panel(ctx: Context, paths: Sequence[Path], key: OutputKey, host: Reading, *,
                  others: bool = False) -> tuple[MeasuredPanel, list[Path]]:
    """Read every reference in the sandbox. They must be the panel the key was derived
    against (the key's folds say which half shaped which queries, so only those models are
    held out where the null needs them), at least 8, of at least 2 architectures, none the
    host. With `others` (a Register that carries a white-box key too), references that are
    not the key's panel members are returned, in their order, for the white-box key's
    panel instead of refused."""
    if len(paths) < MIN_REFERENCES:
        raise ServiceError(ErrorCode.INVALID_BUNDLE,
                           f"an output key is registered with its panel: upload the key's "
                           f"{len(key.panel)} reference models with --reference (at least "
                           f"{MIN_REFERENCES}; {len(paths)} given): the TTP measures the null on "
                           f"them itself")
    readings: dict[bytes, Reading] = {}
    rest: list[Path] = []
    for number, path in enumerate(paths, start=1):
        reading = _read(ctx, path, key, f"reference #{number}")
        fingerprint = reading.identity.fingerprint
        if fingerprint == host.identity.fingerprint or fingerprint in readings:
            raise ServiceError(ErrorCode.INVALID_MODEL, f"reference #{number} has the same weights "
                               "as the host or another reference: a panel needs distinct, "
                               "independent models")
        if others and fingerprint not in key.panel:
            rest.append(path)
            continue
        readings[fingerprint] = reading
    if set(readings) != set(key.panel):
        raise ServiceError(ErrorCode.INVALID_BUNDLE,
                           f"the references are not the panel the output key was derived against "
                           f"({len(set(readings) & set(key.panel))} of its {len(key.panel)} "
                           f"members given, {len(set(readings) - set(key.panel))} others): "
                           "upload exactly the models given to keygen --outputs --reference")
    architectures = {r.architecture for r in readings.values()}
    if len(architectures) < MIN_ARCHITECTURES:
        raise ServiceError(ErrorCode.INVALID_BUNDLE,
                           f"the {len(readings)} reference models share one architecture; an "
                           f"output key's panel needs at least {MIN_ARCHITECTURES}: queries shaped "
                           "against one architecture transfer to another unmeasured")
    ordered = [readings[f] for f in key.panel]
    return MeasuredPanel(
        fingerprints=np.asarray(key.panel_fingerprints, dtype=np.uint8),
        query_scores=np.stack([r.query_scores for r in ordered]).astype(np.float32),
        ranking_scores=np.stack([r.ranking_scores for r in ordered]).astype(np.float32)), rest


def seal_bytes(key: OutputKey, panel: MeasuredPanel) -> bytes:
    """The plaintext the TTP seals: a magic line, then an .npz (no pickle) of the key's own
    encoding and the panel's answers as the TTP measured them."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, key=np.frombuffer(encode_output_key(key), dtype=np.uint8),
             fingerprints=panel.fingerprints, query_scores=panel.query_scores,
             ranking_scores=panel.ranking_scores)
    return SEALED_MAGIC + buffer.getvalue()


def open_bytes(plaintext: bytes) -> tuple[OutputKey, MeasuredPanel]:
    """The inverse of `seal_bytes`."""
    if not plaintext.startswith(SEALED_MAGIC):
        raise InvalidInputError("not a sealed output key")
    try:  # views, not copies (`read_npz`): every VerifyEndpoint opens it before its first query
        arrays = read_npz(memoryview(plaintext)[len(SEALED_MAGIC):])
        panel = MeasuredPanel(arrays["fingerprints"], arrays["query_scores"],
                              arrays["ranking_scores"])
        key = arrays["key"]
    except (InvalidInputError, KeyError) as exc:
        raise InvalidInputError(f"not a sealed output key ({exc})") from exc
    return decode_output_key(key.data), panel


def open_sealed(ctx: Context, record: Registration) -> tuple[OutputKey, MeasuredPanel]:
    """A registration's output key and the panel answers the TTP measured, decrypted."""
    plaintext = open_envelope(ctx.keyring, Envelope.from_bytes(record.envelope),
                              record_id=record.registration_id, owner=record.owner)
    return open_bytes(plaintext)
