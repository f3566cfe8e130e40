"""The `Store` interface: everything the key server persists, whatever the backend.

Priority between rival registrations is decided by log order (DESIGN §1.2), so the one thing
every backend must get right is `Store.append`: log indexes form a single total order across
threads, processes and replicas, with no gaps, and a registration is committed in the same
transaction as its log entry, so neither can ever exist without the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence

from freemark_keyserver.store.records import (
    CheckpointSigner,
    ClaimSignature,
    EntrySigner,
    LogEntry,
    PanelMember,
    Pending,
    Principal,
    Registration,
    StoredCheckpoint,
)

__all__ = ["ORPHAN_GRACE_S", "Store"]

# Host segments with no registration are collected once this old. A registration is appended
# moments after its last segment is written, so an hour is far beyond any write-to-append gap
# and a replica starting up never takes segments another replica is about to register.
ORPHAN_GRACE_S = 3600


class Store(ABC):
    """Everything the server persists. Every method is thread-safe."""

    # principals

    @abstractmethod
    def add_principal(self, principal: Principal) -> None:
        """Add a principal; raise `DuplicateError` if its name or token hash is taken."""

    @abstractmethod
    def principal_by_token_hash(self, token_hash: bytes) -> Principal | None:
        """The principal holding this token hash, disabled or not (auth decides)."""

    @abstractmethod
    def principal_by_name(self, name: str) -> Principal | None:
        """The principal with this name, or None."""

    @abstractmethod
    def list_principals(self) -> list[Principal]:
        """Every principal, by name."""

    @abstractmethod
    def disable_principal(self, name: str) -> None:
        """Disable a principal for good; raise `NotFoundError` if there is none by that name.

        Principals are disabled, never deleted, so the owner named by old registrations and
        log entries always resolves.
        """

    # the log and registrations

    @abstractmethod
    def append(
        self,
        kind: str,
        build_entry: Callable[[int, int], bytes],
        registration: Registration | None = None,
        *,
        sign: EntrySigner | None = None,
    ) -> LogEntry:
        """Append one log entry, and a registration with it, in one transaction.

        Under the database's write lock: take the next index (the current tree size) and the
        time, call ``build_entry(index, now_micros)`` for the canonical entry bytes (the
        caller embeds both in the entry, so the signed entry and the row agree), store the
        entry with its RFC 6962 leaf hash and, if `sign` is given, its statement signature
        ``sign(entry)`` (the server always signs: a row without one is refused by its ledger,
        its audit and every monitor), and, if given, the registration with that
        `log_index` and `created_at`. Either all of it commits or none of it does; an
        exception from `build_entry` rolls everything back. Times never decrease along the
        log, even across replicas whose clocks disagree.
        """

    @abstractmethod
    def append_batch(
        self,
        pending: Sequence[Pending],
        *,
        sign: EntrySigner | None = None,
        checkpoint: CheckpointSigner | None = None,
    ) -> list[LogEntry | Exception]:
        """Append several entries in one transaction, one commit (one fsync) for all: the
        log's group commit (`tlog.sequencer`).

        Each entry is built, signed and stored as `append` does, under a savepoint of its
        own: one whose `build_entry` raises, or whose registration the database refuses
        (`DuplicateError`), is left out, its exception in its place in the answer, and the
        others take consecutive indexes and times that never decrease. An entry the caller
        built beforehand (`Pending.built`) is stored as it is where it was built for the index
        it gets at no earlier time than its predecessor's, and built again otherwise
        (`Pending.entry_at`). With `checkpoint`, the note
        it returns for the tree after the batch, ``checkpoint(size before, new entries)``,
        is stored in the same transaction, so every acknowledged entry already has a signed
        checkpoint when it commits. Anything else that fails rolls the whole batch back and
        raises.
        """

    @abstractmethod
    def now(self) -> int:
        """The store's clock (unix microseconds): the time an entry appended now would get,
        for a caller that builds entries ahead of `append_batch` (`Pending.built`)."""

    @abstractmethod
    def get_registration(self, registration_id: str) -> Registration | None:
        """The registration with this id, or None."""

    @abstractmethod
    def find_by_fingerprint(self, host_fingerprint: bytes) -> list[Registration]:
        """Registrations of this exact host model, earliest log entry first."""

    @abstractmethod
    def find_by_architecture(self, architecture_digest: bytes) -> list[Registration]:
        """Registrations of models with this architecture, earliest log entry first."""

    @abstractmethod
    def list_registrations(
        self, owner: str | None, page_size: int, page_token: str
    ) -> tuple[list[Registration], str]:
        """One page of registrations in log order, and the token for the next ("" at the end).

        `owner` None lists everyone's. Pagination is by key (log index), so pages stay
        correct while registrations are appended. A malformed token raises `ValueError`.
        """

    @abstractmethod
    def revoke(self, registration_id: str, at: int) -> bool:
        """Mark a registration revoked at `at`; False if it is absent or already revoked."""

    @abstractmethod
    def registrations_for_rewrap(self) -> Iterator[Registration]:
        """Every registration, revoked ones too, in log order, for master key rotation.

        Fetched in batches with no transaction held between them, so the caller may call
        `update_envelopes` while iterating.
        """

    @abstractmethod
    def update_envelopes(
        self, registration_id: str, key_version: int, envelope: bytes, host_envelope: bytes
    ) -> None:
        """Replace both envelopes and their key version atomically; `NotFoundError` if absent."""

    # prior-claim signatures

    @abstractmethod
    def claim_signatures(self, after_log_index: int = -1) -> list[ClaimSignature]:
        """The sealed claim signatures of registrations logged after `after_log_index`, in
        log order, each with its registration's owner and log index (the claim index reads
        them on start, then only the new ones: replicas share it through the database)."""

    @abstractmethod
    def update_claim_envelope(self, registration_id: str, key_version: int, envelope: bytes
                              ) -> None:
        """Replace a claim signature's envelope after rotation; `NotFoundError` if absent."""

    # the operator's reference panels

    @abstractmethod
    def add_disclosure(self, registration_id: str, query_set: int, endpoint: str, at: int
                       ) -> None:
        """Record that `query_set` of an output key was sent to `endpoint` (once per pair)."""

    @abstractmethod
    def disclosures(self, registration_id: str) -> list[tuple[int, str]]:
        """(query set, endpoint) for every disclosure of the registration's sets."""

    @abstractmethod
    def add_panel_member(self, member: PanelMember) -> None:
        """Store a panel member; `DuplicateError` if the same model is already active for its
        family. Store its sealed segments (`put_host_blob` under its id) first."""

    @abstractmethod
    def panel_members(self, family: bytes | None = None, *, active: bool = True
                      ) -> list[PanelMember]:
        """Members of one family (None: every family), oldest first; removed ones too unless
        `active`."""

    @abstractmethod
    def remove_panel_member(self, member_id: str, at: int) -> bool:
        """Stop a member joining later registrations; False if absent or already removed."""

    @abstractmethod
    def update_panel_envelope(self, member_id: str, key_version: int, envelope: bytes) -> None:
        """Replace a member's stream header after rotation; `NotFoundError` if absent."""

    # host models

    @abstractmethod
    def put_host_blob(self, registration_id: str, segments: Iterable[bytes]) -> int:
        """Store a registration's sealed host segments, in order; return how many there were.

        Call it before the `append` that stores the registration: the segments are durable
        when it returns. They are consumed lazily (PostgreSQL commits them a few megabytes
        per transaction, so neither the model nor the database's write lock is held for its
        whole length; SQLite writes one fsynced file beside the database). Until the registration commits,
        no reader looks for them; if it never does, they are orphans for
        `collect_orphan_host_blobs`. `DuplicateError` if this id already has segments.
        """

    @abstractmethod
    def host_blob(self, registration_id: str) -> Iterator[bytes]:
        """A registration's host segments in order, each fetched when the iterator gets to it.

        Yields nothing for an id without segments; completeness is for the reader to check
        (the stream header knows the count, and `crypto.open_stream` refuses a short one).
        """

    @abstractmethod
    def host_blob_segments(self, registration_id: str) -> int:
        """How many host segments this id has, without reading them (for audits)."""

    @abstractmethod
    def collect_orphan_host_blobs(self, written_before: int) -> int:
        """Delete host blobs that no registration or panel member refers to and whose newest segment was
        written before `written_before` (unix microseconds); return how many blobs went."""

    @abstractmethod
    def tree_size(self) -> int:
        """How many entries the log holds."""

    @abstractmethod
    def entries(self, start: int, end: int) -> list[LogEntry]:
        """Entries with start <= index < end, with their stored signatures (empty where the
        row has none); `ValueError` if the range is not in the log."""

    @abstractmethod
    def leaf_hashes(self, end: int) -> list[bytes]:
        """Leaf hashes of the first `end` entries; `ValueError` if the log is shorter."""

    # checkpoints

    @abstractmethod
    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Store a signed checkpoint; the first one stored for a tree size is kept.

        Replicas may each sign the same tree size; both attest to the same tree, so a later
        one for a size already stored is not an error and is dropped.
        """

    @abstractmethod
    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest tree size, or None."""

    @abstractmethod
    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint, by tree size."""

    @abstractmethod
    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None:
        """The checkpoint of exactly this tree size, or None."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; later calls raise `StoreError`."""
