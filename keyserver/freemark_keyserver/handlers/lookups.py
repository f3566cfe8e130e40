"""Registrations as the log says they are, for every flow: one by id (`lookup`), those a
query of the log's registry finds (`lookup_many`), and who may see which (`visible`).

Every lookup reads the registration from the signed log (`tlog.ledger`) and its sealed
secrets from the store; where the two disagree the log decides and the operator is alerted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from freemark.audit.registry import LogRegistry, RegistrationState
from freemark_keyserver.auth import OWNER
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.store import Principal, Registration
from freemark_keyserver.tlog.ledger import DECIDING_COLUMNS

__all__ = ["lookup", "lookup_many", "visible"]

log = logging.getLogger("freemark_keyserver")


def _logged(record: Registration, state: RegistrationState) -> Registration:
    """The stored record with every deciding column replaced by the signed log's value.

    A column that differs (an insider's edit, a bad restore) changes no decision: the log
    decides, and the difference is logged as an alert for the operator, whose audit fails
    on it until the database is repaired.
    """
    logged = replace(record, **{column: getattr(state, name) for column, name in DECIDING_COLUMNS.items()})
    differ = [c for c in DECIDING_COLUMNS if getattr(record, c) != getattr(logged, c)]
    if differ:
        log.error("ALERT: registration %s: the database's %s disagree with the signed log; "
                  "deciding by the log (run freemark-keyserver audit)", record.registration_id,
                  ", ".join(differ))
    return logged


def lookup(ctx: Context, registration_id: str) -> Registration | None:
    """A registration as the log says it is, with its sealed secrets from the store.

    None if the log holds no such registration (a row the log does not justify is ignored
    and reported); a logged registration whose row is gone fails closed (INTERNAL).
    """
    state = ctx.ledger.read(ctx.store, lambda registry: registry.get(registration_id))
    record = ctx.store.get_registration(registration_id)
    if state is None:
        if record is not None:
            log.error("ALERT: registration %s is in the database but not in the signed log; "
                      "ignored (run freemark-keyserver audit)", registration_id)
        return None
    if record is None:
        log.error("ALERT: registration %s is in the signed log but not in the database",
                  registration_id)
        raise ServiceError(ErrorCode.INTERNAL, "the key server's store is missing a logged "
                           "registration; the operator has been alerted")
    return _logged(record, state)


def lookup_many(ctx: Context, query: Callable[[LogRegistry], list[RegistrationState]]
                ) -> list[Registration]:
    """The registrations a query of the log's registry finds, each as `lookup` reads it."""
    states = ctx.ledger.read(ctx.store, query)
    found = [lookup(ctx, s.registration_id) for s in states]
    return [r for r in found if r is not None]


def visible(ctx: Context, principal: Principal, registration_id: str) -> Registration:
    """The record, if this principal may see it; other owners' records are NOT_FOUND."""
    if not registration_id or len(registration_id) > 64:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "give a registration id")
    record = lookup(ctx, registration_id)
    if record is None or (principal.role == OWNER and record.owner != principal.name):
        raise ServiceError(ErrorCode.NOT_FOUND, f"no registration {registration_id!r} visible to you")
    return record
