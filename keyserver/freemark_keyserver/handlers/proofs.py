"""The log for anyone who checks it: GetCheckpoint, GetInclusionProof, GetConsistencyProof,
GetEntries and GetPublicKey.

Checkpoints are signed on demand, one per tree size, and stored (`context.signed_checkpoint`),
so every replica answers the same signed checkpoint for the same size. Entries are served with
the statement signature stored beside each one.
"""

from __future__ import annotations

from freemark.records import wire
from freemark.records.types import ConsistencyProof, SignedStatement
from freemark.tlog import merkle
from freemark.tlog.note import verifier_key
from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.context import Context, inclusion_proof, signed_checkpoint

__all__ = ["get_checkpoint", "get_consistency_proof", "get_entries", "get_inclusion_proof",
           "public_key"]

# Log entries per GetEntries reply: a few hundred kilobytes, far under gRPC's 4 MiB message cap.
MAX_ENTRIES_PAGE = 256


def get_checkpoint(ctx: Context) -> pb.SignedCheckpoint:
    """The signed checkpoint of the whole log."""
    return wire.checkpoint_to_proto(signed_checkpoint(ctx))


def _size(ctx: Context, requested: int) -> int:
    current = ctx.store.tree_size()
    size = requested or current
    if size > current:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"the log has only {current} entries")
    return size


def get_inclusion_proof(ctx: Context, request: pb.GetInclusionProofRequest) -> pb.InclusionProof:
    size = _size(ctx, request.tree_size)
    if request.log_index >= size:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no log entry {request.log_index} in a tree of {size}")
    return wire.inclusion_to_proto(inclusion_proof(ctx, request.log_index, size))


def get_consistency_proof(ctx: Context, request: pb.GetConsistencyProofRequest
                          ) -> pb.ConsistencyProof:
    size = _size(ctx, request.new_size)
    if not 1 <= request.old_size <= size:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"old_size must be in [1, {size}]")
    proof = ConsistencyProof(
        old_size=request.old_size, new_size=size, checkpoint=signed_checkpoint(ctx, size),
        hashes=tuple(merkle.consistency_proof(ctx.store.leaf_hashes(size), request.old_size)))
    return wire.consistency_to_proto(proof)


def get_entries(ctx: Context, request: pb.GetEntriesRequest) -> pb.GetEntriesResponse:
    """Entries [start, end), at most `MAX_ENTRIES_PAGE` and none past the tree size."""
    size = ctx.store.tree_size()
    if request.start >= size:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"start {request.start} is not below the tree size {size}")
    if request.end and request.end <= request.start:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "end must be above start (or 0)")
    end = min(request.end or size, request.start + MAX_ENTRIES_PAGE, size)
    # Served as stored, unchecked: each entry's own signature is what lets an outside monitor
    # tell a statement of the TTP from a row someone wrote into its database.
    return wire.entries_to_proto([SignedStatement(e.entry, e.signature, e.key_id)
                                  for e in ctx.store.entries(request.start, end)])


def public_key(ctx: Context) -> pb.PublicKey:
    return pb.PublicKey(pem=ctx.signer.public_key_pem(), key_id=ctx.signer.key_id,
                        origin=ctx.config.origin,
                        note_verifier_key=verifier_key(ctx.config.origin, ctx.signer.verifier()))
