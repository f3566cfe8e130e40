"""What every flow shares: the `Context`, a streamed call as a handler reads it (`Stream`),
sandbox calls and their refusal mapping, log appends and signed statements with their proofs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from freemark.errors import InvalidInputError, ModelFileError
from freemark.records import wire
from freemark.records.types import Checkpoint, InclusionProof, SignedStatement, Verdict
from freemark.scheme.bundle import KeyBundle
from freemark.tlog import merkle
from freemark.v1 import keyservice_pb2 as pb
from freemark.verdict.decision import DEFAULT_ALPHA, coarse_values
from freemark_keyserver import cancellation
from freemark_keyserver.claims import ClaimIndex
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.crypto import MasterKeyring, SigningKey
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.sandbox import formats
from freemark_keyserver.sandbox.runner import (
    RUN_FAILED,
    ModelIdentity,
    SandboxBusy,
    SandboxError,
    SandboxPool,
    SandboxResourceError,
    SandboxResult,
    SandboxRunFailed,
    SandboxTimeout,
    run_batch,
    run_model,
)
from freemark_keyserver.store import ClaimSignature, Pending, Registration, Store, StoredCheckpoint
from freemark_keyserver.tlog.ledger import Ledger
from freemark_keyserver.tlog.sequencer import Sequencer

__all__ = [
    "Admission",
    "Context",
    "Runner",
    "Stream",
    "append_entry",
    "disclosed",
    "inclusion_proof",
    "policy_alpha",
    "public",
    "sandbox_refusals",
    "sandbox_runner",
    "sandboxed",
    "sign_statement",
    "signed_checkpoint",
]

log = logging.getLogger("freemark_keyserver")
H_co = TypeVar("H_co", covariant=True)


class Admission(Protocol):
    """The registration's Verify rate limit as the caller meets it (`rpc.ratelimit`); a
    VerifyEndpoint is charged the same token as a Verify."""

    def check(self, record: Registration) -> None:
        """RATE_LIMITED when the caller's bucket for `record` is empty; takes nothing."""

    def charge(self, record: Registration) -> None:
        """Take a token from the caller's bucket for `record`, or RATE_LIMITED."""


@dataclass
class Context:
    """What every handler needs; built once by the server."""

    config: ServerConfig
    store: Store
    keyring: MasterKeyring
    signer: SigningKey
    pool: SandboxPool | None = None  # None: the process-wide `sandbox.runner.shared_pool`
    sandbox: Callable[..., SandboxResult] = run_model
    batch: Callable[..., tuple[ModelIdentity, list[np.ndarray | Exception]]] = run_batch
    # The name lookup VerifyEndpoint checks against the allow-list (once per conversation;
    # every connection goes to the address checked): injected like the sandbox, so a test
    # scripts a DNS answer that changes after the check.
    resolver: Callable[..., Any] = socket.getaddrinfo
    # The log's registrations, what decides; every entry checked against the signer's key.
    ledger: Ledger = field(init=False)
    # The log's append path: concurrent appends committed together with their checkpoint.
    sequencer: Sequencer = field(init=False)
    # Which earlier registrations a Register checks in full (`freemark_keyserver.claims`).
    claims: ClaimIndex = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.signer.verifier())
        self.claims = ClaimIndex(self.keyring)
        self.sequencer = Sequencer(self.store, self.ledger, lambda body: _entry_signature(self, body),
                                   lambda size, root, last: _checkpoint_note(self, size, root, last))
        if self.pool is not None:
            self.sandbox = functools.partial(run_model, pool=self.pool)
            self.batch = functools.partial(run_batch, pool=self.pool)

    def close(self) -> None:
        """Answer the log's queued appends and stop its writer, close the store, then stop
        the sandbox pool (its fork server kills any child)."""
        self.sequencer.close()
        self.store.close()
        if self.pool is not None:
            self.pool.close()


class Stream(Protocol[H_co]):
    """A streamed call (Register, Verify) as its handler reads it: the header it starts with,
    then its files, each spooled only when the handler asks for it. So a call refused on
    its header (role, bundle, registration, format, rate) reads no file. `rpc.service`
    implements it over the gRPC request stream and the upload spool."""

    def header(self) -> H_co:
        """The stream's first message, its header (MALFORMED_REQUEST if it is not one)."""
        ...

    def receive(self, upload: pb.UploadHeader, *, suffix: str
                ) -> contextlib.AbstractContextManager[Path]:
        """The current file's bytes, received (`rpc.uploads.spooled`: a sealed memory file
        named with `suffix`) and checked against `upload` (size, SHA-256, caps); gone when
        the block ends. A file
        named under the server's model root (`upload.model_path`) is copied instead, and
        its SHA-256 may still be computing when the block starts (`settle`)."""
        ...

    def settle(self) -> None:
        """Wait until every file received so far has its SHA-256 in its header (a named
        file's is hashed while the sandbox reads it); raises what hashing raised."""
        ...

    def next_upload(self) -> pb.UploadHeader | None:
        """The header of the file that follows (Register's references); None at the end."""
        ...


# --- the sandbox ----------------------------------------------------------------------------

# How the flows run a model: (model, bundle, weights, probes) -> the sandbox's answer, its
# failures already mapped to statuses (`sandbox_runner`).
Runner = Callable[[Path, KeyBundle, Path | None, int], SandboxResult]


def sandboxed(ctx: Context, model: Path, bundle: KeyBundle, weights: Path | None = None,
              options: dict[str, Any] | None = None, probes: int = 0) -> SandboxResult:
    """Run an untrusted model in the sandbox on the bundle's triggers and `probes` of its
    alignment probes (built in the child), mapping its failures to statuses.

    `options` name a format other than `.pt2` (`formats.sandbox_options`)."""
    extra = {"options": options} if options else {}
    with sandbox_refusals():
        return ctx.sandbox(model, layer=bundle.layer, pooling=bundle.pooling,
                           triggers=bundle.triggers, probes=probes, weights_path=weights,
                           limits=ctx.config.sandbox, **extra)


def sandbox_runner(ctx: Context, options: dict[str, Any] | None = None) -> Runner:
    """`sandboxed` with these `options`, as the `Runner` the panel readers take; None: each
    file's own, told from its first bytes as for a stored host (`formats.stored_host_options`:
    a program, or a packed checkpoint), for panels that mix them (references are programs,
    or checkpoints beside a checkpoint host; each was header-checked when it arrived)."""
    return lambda model, bundle, weights, probes: sandboxed(
        ctx, model, bundle, weights,
        formats.stored_host_options(model) if options is None else options, probes)


@contextlib.contextmanager
def sandbox_refusals() -> Iterator[None]:
    """The status of each way a sandbox run can fail (the model's fault or the sandbox's).

    A failure of the model on a key's triggers is one fixed INVALID_MODEL (`RUN_FAILED`),
    whatever failed: its text could carry the secret values it was computed from. The
    operator's log gets the exception's class name, never a message."""
    try:
        yield
    except SandboxRunFailed as exc:
        log.warning("a sandbox run failed on a key's inputs (%s); the caller is told only "
                    "that it failed", exc.error_type)
        raise ServiceError(ErrorCode.INVALID_MODEL, RUN_FAILED) from exc
    except ModelFileError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, public(exc)) from exc
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, public(exc)) from exc
    except SandboxTimeout as exc:
        raise ServiceError(ErrorCode.SANDBOX_DEADLINE, str(exc)) from exc
    except SandboxResourceError as exc:
        raise ServiceError(ErrorCode.SANDBOX_LIMIT, str(exc)) from exc
    except SandboxBusy as exc:
        raise ServiceError(ErrorCode.SANDBOX_BUSY, str(exc), retry_after=exc.retry_after) from exc
    except SandboxError as exc:
        raise ServiceError(ErrorCode.SANDBOX_CRASHED, str(exc)) from exc


def policy_alpha(ctx: Context, requested: float) -> float:
    """The alpha a verdict is judged at (0 asks for the scheme default), once it is inside
    the operator's verdict policy: ALPHA_OUTSIDE_POLICY names the range otherwise."""
    if requested and not 0.0 < requested < 1.0:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "alpha must be in (0, 1)")
    policy = ctx.config.verdict_policy
    alpha = requested or DEFAULT_ALPHA
    if not policy.alpha_min <= alpha <= policy.alpha_max:
        asked = f"alpha {alpha:g}" + ("" if requested else " (the default)")
        raise ServiceError(ErrorCode.ALPHA_OUTSIDE_POLICY,
                           f"{asked} is outside this key server's verdict policy: it signs "
                           f"verdicts for {policy.describe()}")
    return alpha


def disclosed(ctx: Context, principal_name: str, record: Registration, verdict: Verdict
              ) -> tuple[bool, dict[str, Any]]:
    """(coarse, the judgement fields to sign) of a verdict for this requester: the coarse
    form (`decision.coarse_values`: the decision and a p-value bucket, no statistic a thief
    could steer by) for anyone but the registration's owner where the operator's policy
    says so, the full one otherwise. One rule for a file Verify and a VerifyEndpoint."""
    coarse = (ctx.config.verdict_policy.arbiter_disclosure == "coarse"
              and principal_name != record.owner)
    return coarse, coarse_values(verdict) if coarse else wire.signed_values(verdict)


def public(exc: Exception) -> str:
    """A model error's message without server paths (they name spool files)."""
    text = str(exc)
    if ": refused: " in text:
        return "refused: " + text.split(": refused: ", 1)[1]
    return text.replace(tempfile.gettempdir(), "<tmp>")


# --- log and signatures ---------------------------------------------------------------------


def append_entry(ctx: Context, kind: str, build: Callable[[int, int], bytes],
                 registration: Registration | None = None,
                 claim: ClaimSignature | None = None) -> tuple[bytes, int, int]:
    """Append one signed statement; `build(log index, integrated time)` is its body, and its
    signature (`sign_statement`) is stored with it in the same transaction, which also
    stores a signed checkpoint covering it (`tlog.sequencer`: concurrent appends share one).

    A registration's sealed claim signature (`claim`) is stored in the same transaction.
    Returns (body, log index, integrated time) once the entry is durable.
    """
    cancellation.check_active()  # a caller who has gone gets nothing signed or logged
    entry = ctx.sequencer.append(Pending(kind, build, registration, claim))
    return entry.entry, entry.index, entry.created_at


def _entry_signature(ctx: Context, body: bytes) -> tuple[str, bytes]:
    """The statement signature stored with an entry: `sign_statement`'s, as the store wants it."""
    signed = sign_statement(ctx, body)
    return signed.key_id, signed.signature


def sign_statement(ctx: Context, body: bytes) -> SignedStatement:
    """The server's signature over a log entry's body (Ed25519 is deterministic: the one
    stored with the entry and the one its receipt or verdict carries are the same bytes)."""
    return SignedStatement(body=body, signature=ctx.signer.sign(body), key_id=ctx.signer.key_id)


def signed_checkpoint(ctx: Context, size: int | None = None) -> Checkpoint:
    """Sign the tree head of the first `size` entries (default: all) and store it.

    The timestamp is the last entry's integrated time, so every replica signs the same
    checkpoint for the same size and timestamps never go backwards. A new checkpoint is
    signed only over entries the ledger checked, each with the server's own statement
    signature (`Ledger.checked_root`): a database row the TTP never signed gets no checkpoint
    (INTERNAL, and an ALERT for the operator).
    """
    size = ctx.store.tree_size() if size is None else size
    stored = ctx.store.checkpoint_at(size)
    if stored is None:
        root = ctx.ledger.checked_root(ctx.store, size)
        last = ctx.store.entries(size - 1, size)[0].created_at if size else 0
        ctx.store.add_checkpoint(StoredCheckpoint(size, _checkpoint_note(ctx, size, root, last)))
        stored = ctx.store.checkpoint_at(size)
        assert stored is not None
    return wire.checkpoint_from_note(stored.note)


def _checkpoint_note(ctx: Context, size: int, root: bytes, last: int) -> bytes:
    """The signed note of the tree of `size` entries with this root, timestamped with its
    last entry's integrated time `last` (microseconds) in seconds: the same note on every
    replica for the same size, and timestamps that never go backwards."""
    checkpoint = merkle.TreeHead(origin=ctx.config.origin, tree_size=size, root_hash=root,
                                 timestamp=last // 1_000_000)
    return merkle.sign_checkpoint(ctx.signer, checkpoint).note


def inclusion_proof(ctx: Context, index: int, size: int | None = None) -> InclusionProof:
    """Entry `index`'s inclusion in the tree of the first `size` entries (default: the
    latest signed checkpoint, which the append that stored the entry already covers), with
    that tree's signed checkpoint; the path comes from the ledger's checked tree."""
    published = ctx.sequencer.published
    if size is None and published is not None and published.tree_size > index:
        checkpoint = published  # this process's, just stored
    else:
        if size is None:
            latest = ctx.store.latest_checkpoint()
            size = latest.tree_size if latest is not None and latest.tree_size > index else None
        checkpoint = signed_checkpoint(ctx, size)
    return InclusionProof(log_index=index, tree_size=checkpoint.tree_size,
                          hashes=tuple(ctx.ledger.inclusion_proof(ctx.store, index,
                                                                  checkpoint.tree_size)),
                          checkpoint=checkpoint)
