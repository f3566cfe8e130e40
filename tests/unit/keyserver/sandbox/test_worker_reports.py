"""What a sandbox child's report of a failure may carry (issue 18): a failure while reading
the file names what is wrong with it; a failure while the model runs on a key's triggers
comes back as one fixed status with the exception's class name and nothing the model wrote,
and the parent keeps no more than a bare class name whatever a child sends. Scans of one
kind share a forward pass and fail closed together (issue 21)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

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


class _Counted(torch.nn.Module):
    """Records the batch size of each forward pass; fails on a batch holding a value over 2
    (the error's text names a would-be secret)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.passes = torch.nn.Linear(4, 3), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        if bool((x > 2).any()):
            raise IndexError(f"index {SECRET} is out of bounds for dimension 1 with size 1")
        return torch.relu(self.fc(x))


def test_scans_of_one_kind_share_one_forward_pass_and_fail_closed_together() -> None:
    """Register's candidate scans (issue 21): scans of one width and input kind are read in
    one forward pass, another width in its own; a failure in a shared pass fails every
    scan of it with the fixed status (each is then a claim), the other pass's scans are
    answered, and no text of the model's crosses over."""
    model = _Counted()

    def scans(spec: dict[str, Any]) -> Any:
        return worker._Scan(model, int(spec["width"]), 0)

    def request(values: list[float], widths: list[int]) -> bytes:
        return protocol.encode_request(
            [TriggerRun(None, 0, TriggerSet(inputs=np.full((3, 4), v, dtype=np.float32)),
                        width=w) for v, w in zip(values, widths, strict=True)], False, {})

    reply, _ = worker.answer(request([0.25, 0.5, 0.75, 0.5], [3, 3, 3, 0]), (IDENTITY, scans))
    _, results = protocol.decode_reply(reply, [3] * 4, [True] * 4)
    # `accepts` runs one zero input per pass; then one pass for the three scans of width 3,
    # one for the scan of any width.
    assert [n for n in model.passes if n > 1] == [9, 3]
    assert all(isinstance(r, protocol.LayerScan) and r.shape[0] == 3 for r in results)
    alone, _ = worker.answer(request([0.5], [3]), (IDENTITY, scans))
    assert np.array_equal(protocol.decode_reply(alone, [3], [True])[1][0], results[1])
    reply, _ = worker.answer(request([0.25, 3.0, 0.75, 0.5], [3, 3, 3, 0]), (IDENTITY, scans))
    assert str(SECRET).encode() not in reply and b"out of bounds" not in reply
    _, results = protocol.decode_reply(reply, [3] * 4, [True] * 4)
    assert [(str(r), r.error_type) for r in results[:3] if isinstance(r, SandboxRunFailed)] \
        == [(RUN_FAILED, "InvalidInputError")] * 3
    assert isinstance(results[3], protocol.LayerScan)
