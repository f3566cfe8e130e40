"""What the store holds: frozen records, the roles a principal may have, and the clock.

Every stored timestamp is in unix microseconds (`now_micros`); a `Clock` is injected wherever
the store reads the time, so tests can fix it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "ROLES",
    "CheckpointSigner",
    "ClaimSignature",
    "Clock",
    "EntrySigner",
    "LogEntry",
    "Pending",
    "Principal",
    "Registration",
    "StoredCheckpoint",
    "leaf_hash",
    "now_micros",
]

ROLES = frozenset({"owner", "arbiter", "admin"})

Clock = Callable[[], int]

# Signs a log entry's exact bytes: (entry) -> (key id, signature). The server's signing key.
EntrySigner = Callable[[bytes], tuple[str, bytes]]

# Signs the checkpoint of the log once a batch of entries follows its first `size` ones:
# (size, the batch's entries) -> the signed note, stored in the batch's own transaction.
CheckpointSigner = Callable[[int, Sequence["LogEntry"]], bytes]


def now_micros() -> int:
    """Wall-clock time in unix microseconds: the resolution every stored timestamp uses."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Principal:
    """Someone who may call the server: an owner, an arbiter or an admin.

    Only a hash of the bearer token is stored, so a leaked database does not leak credentials.
    """

    name: str
    role: str
    token_hash: bytes
    created_at: int
    disabled: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {sorted(ROLES)}")


@dataclass(frozen=True)
class Registration:
    """A registered key bundle: public lookup fields in the clear, secrets in envelopes.

    `created_at` (unix microseconds) and `log_index` are assigned by `Store.append`; whatever
    the caller puts there is ignored on insert. `host_envelope` holds what opens the registered
    host: a `crypto.StreamHeader` whose segments are this registration's host blob, or, for
    records written before schema version 3, the whole host sealed in one `crypto.Envelope`.
    """

    registration_id: str
    owner: str
    created_at: int
    host_fingerprint: bytes
    architecture_digest: bytes
    layer: str
    units: int
    n_bits: int
    commitment: bytes
    key_version: int
    envelope: bytes
    host_envelope: bytes
    log_index: int
    revoked_at: int | None = None


@dataclass(frozen=True)
class PanelMember:
    """A reference model the operator keeps for an architecture family (`panel add`).

    Every later registration of that family gets the member's activations in its panel.
    The model itself is sealed like a host: `envelope` is a `crypto.StreamHeader` whose
    segments are stored under `member_id` beside the hosts' segments.
    """

    member_id: str
    family: bytes  # freemark.formats.pt2.architecture_digest: the family it calibrates
    fingerprint: bytes
    label: str
    added_at: int
    key_version: int
    envelope: bytes
    removed_at: int | None = None


@dataclass(frozen=True)
class LogEntry:
    """One leaf of the append-only log: the exact bytes hashed, where they sit, and the TTP's
    statement signature over them (`key_id` and `signature` empty: the store holds none)."""

    index: int
    kind: str
    entry: bytes
    leaf_hash: bytes
    created_at: int
    key_id: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as stored: the C2SP signed note (text and signature lines)."""

    tree_size: int
    note: bytes


@dataclass(frozen=True)
class ClaimSignature:
    """A registration's sealed prior-claim signature (`freemark_keyserver.claims`): its index
    group in the clear, the signature sealed under the registration's id and owner. `owner`
    and `log_index` are its registration's, filled in when read back."""

    registration_id: str
    group: bytes
    key_version: int
    envelope: bytes
    owner: str = ""
    log_index: int = -1


@dataclass(frozen=True)
class Pending:
    """One entry waiting to be appended (`Store.append_batch`): its kind, the function that
    builds its bytes from (log index, integrated time), and the registration it carries.

    `built` is the entry as the log's sequencer built and signed it before the transaction,
    for the index and the time `at` it reserved (`tlog.sequencer`: that work then runs outside
    the log's write lock). The transaction stores it only where it finds that index free and
    no later time before it; anywhere else (another replica appended first, an entry before
    it failed) the entry is built again under the lock, at its reserved time or its
    predecessor's if later (`entry_at`): reservations are made in order, so times still never
    decrease, and one entry built again does not push the time past the reservations after
    it."""

    kind: str
    build_entry: Callable[[int, int], bytes]
    registration: Registration | None = None
    claim: ClaimSignature | None = None  # stored with the registration, in its savepoint
    built: LogEntry | None = None
    at: int | None = None  # the time reserved for it (unix microseconds), if any

    def build(self, index: int, now: int, sign: EntrySigner | None) -> LogEntry:
        """The entry at `index`, integrated at `now`: its bytes, leaf hash and signature
        (no database work)."""
        entry = self.build_entry(index, now)
        if not isinstance(entry, bytes):
            raise TypeError(f"build_entry returned {type(entry).__name__}, not bytes")
        key_id, signature = sign(entry) if sign is not None else ("", b"")
        return LogEntry(index, self.kind, entry, leaf_hash(entry), now, key_id, signature)

    def entry_at(self, index: int, now: int, after: int, sign: EntrySigner | None
                 ) -> LogEntry:
        """The entry the transaction stores at `index`, the previous entry's time being
        `after`: the one built beforehand if it was built for this index at no earlier time,
        otherwise one built now, at its reserved time (or `now` if none) or `after` if later
        (times never decrease)."""
        built = self.built
        if built is not None and built.index == index and built.created_at >= after:
            return built
        return self.build(index, max(now if self.at is None else self.at, after), sign)


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash, SHA-256(0x00 || entry): the same as `freemark.tlog.merkle`."""
    return hashlib.sha256(b"\x00" + entry).digest()
