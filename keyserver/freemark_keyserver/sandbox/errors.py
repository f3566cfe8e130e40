"""Why the sandbox gave no activations, when it was not the model file's own fault.

Shared by both sides: the pool raises them, `protocol` turns a child's report into them, and
`runner`, the sandbox's face, re-exports them; the key server maps each to its status
(`handlers.context.sandbox_refusals`).
"""

from __future__ import annotations

__all__ = ["RUN_FAILED", "SandboxBusy", "SandboxError", "SandboxResourceError",
           "SandboxRunFailed", "SandboxTimeout", "SandboxUnavailable"]

# What a requester is told of any failure of a run on a key's triggers, whatever failed.
RUN_FAILED = "the model failed on the key's inputs"


class SandboxError(Exception):
    """The sandbox could not produce activations for a reason other than the model file itself."""


class SandboxTimeout(SandboxError):
    """The worker ran past `SandboxLimits.wall_seconds` and was killed with its process group."""


class SandboxResourceError(SandboxError):
    """The worker hit its memory or CPU-time limit."""


class SandboxBusy(SandboxError):
    """Every sandbox worker is busy and the queue is full; `retry_after` seconds is a hint."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SandboxUnavailable(SandboxBusy):
    """The fork server is down or was relaunched under the run; nothing was decided. Busy
    to the caller (SANDBOX_BUSY: retry after the hint), an alert for the operator."""

    RETRY_SECONDS = 5.0  # about what a relaunch takes (imports and the isolation probe)

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=self.RETRY_SECONDS)


class SandboxRunFailed(SandboxError):
    """The model raised while it ran on a key's triggers or probes. What it raised can be
    computed from those secret values (an out-of-range index names the index), so nothing of
    it crosses but `error_type`, the exception's class name, for the operator's log; the
    message is the fixed `RUN_FAILED` (issue 18)."""

    def __init__(self, error_type: str) -> None:
        super().__init__(RUN_FAILED)
        self.error_type = error_type
