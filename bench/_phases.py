"""The key server's phases of a call, timed in the bench's own process: where a Register or
Verify spends its wall time (`bench/decoder.py --phases`).

Wraps, before the server is built, the functions each phase is one call of, and prints each
phase's seconds as it ends: the upload received and checked (`rpc.service.spooled`), a named
model copied (`copied`), the wait for its hash before signing (`_Stream.settle`), each sandbox
conversation (`handlers.context.run_batch` and `run_model`), sealing the host at rest
(`handlers.register.store_host`). Measurement only: the product code is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from freemark_keyserver.handlers import context, register
from freemark_keyserver.rpc import service

__all__ = ["install"]


def install(report: Callable[[str, float], None]) -> None:
    """Time every phase from now on; `report(name, seconds)` as each ends."""

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                report(name, time.perf_counter() - start)
        return call

    def entered(name: str, manager: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def enter(*args: Any, **kwargs: Any) -> Iterator[Any]:
            start = time.perf_counter()
            with manager(*args, **kwargs) as value:
                report(name, time.perf_counter() - start)
                yield value
        return enter

    service.spooled = entered("upload", service.spooled)  # type: ignore[assignment]
    service.copied = entered("copy", service.copied)  # type: ignore[assignment]
    service._Stream.settle = timed("hash wait", service._Stream.settle)  # type: ignore[method-assign]
    context.run_batch = timed("sandbox", context.run_batch)
    context.run_model = timed("sandbox", context.run_model)
    register.store_host = timed("seal", register.store_host)
