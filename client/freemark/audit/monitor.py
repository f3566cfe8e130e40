"""An outside monitor of the TTP's log: remember the last checkpoint, check every new one.

The log's promise (append-only, one history for everyone) is only worth something if someone
who does not trust the server checks it. A monitor keeps a small state (the last checkpoint it
accepted and, when it has verified every entry, the tree's right edge: `merkle.Frontier`) and,
each run, fetches the latest checkpoint and proves it extends the remembered one:

1. the checkpoint's note is signed by the TTP's key under the pinned origin (the state's, or
   the caller's on a first run): another log, or a forged signature, is a fault;
2. the log did not shrink and its time did not go backwards;
3. the same size with another root, or a consistency proof that fails, is a fork: the TTP
   signed two histories (a restore from backup, say, followed by new entries);
4. when the state holds a frontier (on a first run the monitor recomputes the whole tree from
   the served entries when it has at most `FRESH_RECOMPUTE_LIMIT` of them), the new entries
   are fetched and must extend it to exactly the signed root, each one a JSON object naming
   its own index and carrying the TTP's statement signature over its bytes
   (`freemark.audit.registry.verify_entry`): the entries anyone can read are the ones the
   checkpoints sign, and each one is a statement the TTP made, not a row someone with write
   access to its database slipped under a checkpoint.

Every fault raises `LogProofError` with a one-line reason; the state is replaced (atomically,
`freemark.secretfile.write_private`) only after a run in which every check passed, so a fault
is raised again on the next run. The TTP is reached through any `LogSource`, of which
`freemark.rpc.KeyServiceClient` is one.

Quick start::

    with KeyServiceClient(server, token=token) as ttp:
        state, report = check_log(ttp, Verifier.from_pem(pem), load_state(path), origin=origin)
    save_state(path, state)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from freemark.audit.registry import verify_entry
from freemark.errors import InvalidInputError, InvalidReceiptError, LogProofError
from freemark.records.types import Checkpoint, ConsistencyProof, SignedStatement
from freemark.records.wire import JsonFields, checkpoint_from_json, checkpoint_to_json
from freemark.secretfile import write_private
from freemark.tlog import merkle
from freemark.tlog.signatures import Verifier

__all__ = [
    "FRESH_RECOMPUTE_LIMIT",
    "LogSource",
    "MonitorReport",
    "MonitorState",
    "check_log",
    "load_state",
    "save_state",
    "verify_entries",
]

# A first run recomputes the tree from every entry up to this many (a few seconds of fetching
# and hashing); past it, it starts from the latest checkpoint and checks consistency only.
FRESH_RECOMPUTE_LIMIT = 100_000
_STATE_FORMAT = "freemark/v1/monitor-state"


class LogSource(Protocol):
    """The log calls a monitor makes; `KeyServiceClient` is one."""

    def get_checkpoint(self) -> Checkpoint:
        """The latest signed checkpoint."""
        ...

    def get_consistency_proof(self, old_size: int, new_size: int = 0) -> ConsistencyProof:
        """The proof from `old_size` to `new_size`, with the checkpoint of `new_size`."""
        ...

    def get_entries(self, start: int, end: int) -> list[SignedStatement]:
        """Entries [start, end), each with the statement signature the log stores for it."""
        ...


@dataclass(frozen=True)
class MonitorState:
    """What a monitor remembers: the last checkpoint it accepted (and its note) and, when
    every entry up to it was verified, the tree's frontier."""

    checkpoint: Checkpoint
    origin: str
    frontier: merkle.Frontier | None


@dataclass(frozen=True)
class MonitorReport:
    """What one run checked."""

    origin: str
    old_size: int | None  # None on a first run
    new_size: int
    root_hash: bytes
    timestamp: int
    entries_verified: int  # entries fetched and folded into the frontier this run
    entries_checked: bool  # whether the state holds a frontier (every entry verified)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON values (the CLI's `--json`)."""
        return {"ok": True, "origin": self.origin, "old_size": self.old_size,
                "new_size": self.new_size, "root_hash": self.root_hash.hex(),
                "timestamp": self.timestamp, "entries_verified": self.entries_verified,
                "entries_checked": self.entries_checked}


def verify_entries(entries: Sequence[SignedStatement], start: int, frontier: merkle.Frontier,
                   verifier: Verifier) -> merkle.Frontier:
    """`frontier` extended by `entries` (leaves `start`, `start + 1`, ...), once each entry
    is a JSON object whose `log_index` is its place in the log, signed by `verifier`'s key."""
    if frontier.size != start:
        raise LogProofError(f"entries from {start} cannot extend a tree of {frontier.size}")
    for offset, entry in enumerate(entries):
        index = start + offset
        verify_entry(index, entry, verifier)
        try:
            body = json.loads(entry.body)
        except ValueError:  # UnicodeDecodeError is one too
            raise LogProofError(f"log entry {index} is not JSON") from None
        if not isinstance(body, dict) or body.get("log_index") != index:
            raise LogProofError(f"log entry {index} does not name its own index (it says "
                                f"{body.get('log_index') if isinstance(body, dict) else body!r})")
    return frontier.extended([merkle.leaf_hash(entry.body) for entry in entries])


def _opened(checkpoint: Checkpoint, verifier: Verifier, origin: str | None, what: str
            ) -> merkle.TreeHead:
    try:
        parsed = merkle.open_checkpoint(checkpoint.note, verifier, origin)
    except LogProofError as exc:
        raise LogProofError(f"{what}: {exc}") from None
    if (parsed.tree_size, parsed.root_hash) != (checkpoint.tree_size, checkpoint.root_hash):
        raise LogProofError(f"{what}: its typed size or root differs from its signed note")
    return parsed


def _check_extension(source: LogSource, verifier: Verifier, old: merkle.TreeHead,
                     new: merkle.TreeHead) -> None:
    """Raise unless the signed tree `new` extends the signed tree `old`."""
    merkle.check_successor(old, new)
    if new.tree_size == old.tree_size:
        if new.root_hash != old.root_hash:
            raise LogProofError(
                f"FORK: the log signed two different trees of {new.tree_size} entries (root "
                f"{old.root_hash.hex()} before, {new.root_hash.hex()} now)")
        return
    if old.tree_size == 0:
        return  # every tree extends the empty one
    proof = source.get_consistency_proof(old.tree_size, new.tree_size)
    served = _opened(proof.checkpoint, verifier, new.origin, "the consistency proof's checkpoint")
    if (served.tree_size, served.root_hash) != (new.tree_size, new.root_hash):
        raise LogProofError(
            f"FORK: the log signed two different trees of {new.tree_size} entries in one run "
            f"(roots {new.root_hash.hex()} and {served.root_hash.hex()})")
    try:
        merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash,
                                  proof.hashes)
    except LogProofError as exc:
        raise LogProofError(f"FORK: the tree of {new.tree_size} entries does not extend the one "
                            f"of {old.tree_size} this monitor saw before: {exc}") from None


def check_log(source: LogSource, verifier: Verifier, previous: MonitorState | None, *,
              origin: str | None = None) -> tuple[MonitorState, MonitorReport]:
    """One monitoring run (module docstring); the new state and what was checked, or raise.

    `origin` pins the log on a first run; later runs pin the state's, and a different
    `origin` given with a state is refused.
    """
    if previous is not None and origin is not None and origin != previous.origin:
        raise InvalidInputError(f"the state follows log {previous.origin!r}, not {origin!r}")
    pinned = previous.origin if previous is not None else origin
    latest = source.get_checkpoint()
    new = _opened(latest, verifier, pinned, "the latest checkpoint")
    frontier: merkle.Frontier | None
    if previous is None:
        old_size = None
        frontier = merkle.Frontier() if new.tree_size <= FRESH_RECOMPUTE_LIMIT else None
    else:
        old = _opened(previous.checkpoint, verifier, pinned, "the remembered checkpoint")
        _check_extension(source, verifier, old, new)
        old_size, frontier = old.tree_size, previous.frontier
    verified = 0
    if frontier is not None:
        start = frontier.size
        frontier = verify_entries(source.get_entries(start, new.tree_size), start, frontier,
                                  verifier)
        verified = new.tree_size - start
        if frontier.root() != new.root_hash:
            raise LogProofError(
                f"the entries served for [{start}, {new.tree_size}) do not make the signed root "
                f"{new.root_hash.hex()} (they make {frontier.root().hex()}): the log serves "
                "other entries than it signs")
    state = MonitorState(latest, new.origin, frontier)
    report = MonitorReport(new.origin, old_size, new.tree_size, new.root_hash, new.timestamp,
                           verified, frontier is not None)
    return state, report


# --- the state file ---------------------------------------------------------------------------


def load_state(path: str | Path) -> MonitorState | None:
    """The state in `path`, or None if there is no file yet (a first run)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"monitor state {path}: {exc}") from None
    try:
        fields = JsonFields(json.loads(text), "monitor state")
        if fields.text("format") != _STATE_FORMAT:
            raise InvalidReceiptError(f"monitor state.format must be {_STATE_FORMAT!r}")
        checkpoint = checkpoint_from_json(fields.raw("checkpoint"), "monitor state.checkpoint")
        frontier = None
        if fields.raw("frontier") is not None:
            frontier = merkle.Frontier(checkpoint.tree_size, fields.hex_list("frontier"))
        return MonitorState(checkpoint, fields.text("origin"), frontier)
    except (ValueError, InvalidReceiptError) as exc:  # json's and Frontier's are ValueErrors
        raise InvalidInputError(f"monitor state {path} is unreadable: {exc}") from None


def save_state(path: str | Path, state: MonitorState) -> None:
    """Replace the state file in one step (a crash leaves the old state or the new one)."""
    data = {
        "format": _STATE_FORMAT,
        "origin": state.origin,
        "checkpoint": checkpoint_to_json(state.checkpoint),
        "frontier": None if state.frontier is None else [h.hex() for h in state.frontier.hashes],
    }
    write_private(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
