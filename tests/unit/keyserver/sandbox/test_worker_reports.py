"""What a sandbox child's report of a failure may carry (issue 18): a failure while reading
the file names what is wrong with it; a failure while the model runs on a key's triggers
comes back as one fixed status with the exception's class name and nothing the model wrote,
and the parent keeps no more than a bare class name whatever a child sends."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from freemark.errors import InvalidInputError
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.sandbox import protocol, worker
from freemark_keyserver.sandbox.errors import RUN_FAILED, SandboxRunFailed
from freemark_keyserver.sandbox.protocol import TriggerRun

SECRET = 9206772093063736  # what an out-of-range index packed from trigger pixels would read
IDENTITY = bytes(range(64))


def _request(n_sets: int) -> bytes:
    triggers = TriggerSet(inputs=np.full((3, 4), 0.25, dtype=np.float32))
    return protocol.encode_request([TriggerRun("act", 0, triggers) for _ in range(n_sets)],
                                   False, {})


def _runner(spec: dict[str, Any]) -> Any:
    def run(triggers: TriggerSet) -> np.ndarray:
        if spec["layer"] == "act":
            raise IndexError(f"index {SECRET} is out of bounds for dimension 1 with size 1")
        return np.zeros((len(triggers), 2))
    return run


def test_a_run_failing_on_the_triggers_sends_a_fixed_status_without_its_text() -> None:
    reply, _ = worker.answer(_request(2), (IDENTITY, _runner))
    assert str(SECRET).encode() not in reply and b"out of bounds" not in reply
    _, results = protocol.decode_reply(reply, [3, 3])
    assert all(isinstance(r, SandboxRunFailed) for r in results)
    assert [(str(r), r.error_type) for r in results if isinstance(r, SandboxRunFailed)] == \
        [(RUN_FAILED, "IndexError")] * 2  # the later set ran too: no short-circuit


def test_a_failure_reading_the_file_for_a_set_keeps_its_message() -> None:
    def unreadable(spec: dict[str, Any]) -> Any:
        raise InvalidInputError("no layer named 'act'; valid layers: fc1, fc2")

    reply, _ = worker.answer(_request(1), (IDENTITY, unreadable))
    _, (result,) = protocol.decode_reply(reply, [3])
    assert isinstance(result, InvalidInputError) and "no layer named 'act'" in str(result)


@pytest.mark.parametrize(("sent", "kept"), [
    ("IndexError", "IndexError"),
    (f"index {SECRET} is out of bounds", "?"),
    ("A" * 65, "?"),
])
def test_the_parent_keeps_a_bare_class_name_only(sent: str, kept: str) -> None:
    """A compromised child could write anything in a run_failed report: the parent drops it."""
    status = json.dumps({"kind": protocol.RUN_FAILED, "message": sent}).encode()
    reply = (protocol.OK + protocol._npy(np.frombuffer(IDENTITY, dtype=np.uint8))
             + protocol._npy(np.frombuffer(status, dtype=np.uint8)))
    _, (result,) = protocol.decode_reply(reply, [3])
    assert isinstance(result, SandboxRunFailed)
    assert result.error_type == kept and str(result) == RUN_FAILED
