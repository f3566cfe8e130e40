"""A small pool of database connections, shared by both backends.

Each operation borrows a connection and gives it back, so a connection is never used by two
threads at once and their number is bounded by the number of concurrent callers, not of
threads ever seen. A connection the backend says is no longer usable (its server went away)
is closed instead of going back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

from freemark_keyserver.store.errors import StoreError

__all__ = ["ConnectionPool"]


class _Connection(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Connection)


def _always(conn: object) -> bool:
    return True


class ConnectionPool(Generic[C]):
    """Idle connections made by `connect`, lent one at a time; thread-safe."""

    def __init__(
        self, connect: Callable[[], C], *, reusable: Callable[[C], bool] = _always
    ) -> None:
        self._connect = connect
        self._reusable = reusable
        self._lock = threading.Lock()
        self._idle: list[C] = []
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[C]:
        """Borrow a connection (an idle one, or a new one); `StoreError` once closed."""
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed and self._reusable(conn)
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        """Close every idle connection; borrowed ones are closed when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
