"""Whether the gRPC call a piece of work serves is still live, so deep code can stop when the
caller has gone.

The servicer binds each call's context (`bound`) around its handler; the sandbox pool asks
`current()` whether to go on waiting, and handlers call `check_active` just before they sign
and log, so a cancelled call or one past its deadline leaves no verdict behind. Outside a call
(the operator's CLI, tests that call handlers directly) nothing is bound and work runs to its
own limits.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["Call", "CallEnded", "bound", "check_active", "current"]


class Call(Protocol):
    """What is used of `grpc.ServicerContext`."""

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


class CallEnded(Exception):
    """The caller cancelled, or the call's deadline passed: stop, sign nothing, log nothing.

    `why` is "cancelled" or "deadline": the servicer answers CALL_ENDED (CANCELLED) or
    CALL_DEADLINE (DEADLINE_EXCEEDED), so a caller whose deadline the server noticed first
    sees the same status its own deadline would have given.
    """

    def __init__(self, why: str, where: str) -> None:
        super().__init__(f"the call ended ({why}) {where}")
        self.why = why


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("freemark_call",
                                                                       default=None)


@contextmanager
def bound(call: Call) -> Iterator[None]:
    token = _CURRENT.set(call)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Call | None:
    return _CURRENT.get()


def ended(call: Call | None) -> str | None:
    """Why `call` has ended ("cancelled" or "deadline"), or None while it is live."""
    if call is None:
        return None
    remaining = call.time_remaining()
    if remaining is not None and remaining <= 0:
        return "deadline"
    if not call.is_active():
        return "cancelled"
    return None


def check_active() -> None:
    """Raise `CallEnded` when the bound call has ended."""
    why = ended(current())
    if why is not None:
        raise CallEnded(why, "before its result was signed")
