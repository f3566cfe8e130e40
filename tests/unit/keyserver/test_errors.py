"""The error catalog is complete: every status the proto promises has a code, and back."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from freemark_keyserver.errors import ErrorCode, ServiceError

PROTO = Path(__file__).resolve().parents[3] / "proto" / "freemark" / "v1" / "keyservice.proto"


def test_every_documented_status_has_a_catalog_entry_and_vice_versa() -> None:
    documented = set(re.findall(r"^//   ([A-Z_]+) ", PROTO.read_text(), flags=re.MULTILINE))
    used = {code.status.name for code in ErrorCode} - {"INTERNAL"}
    assert documented == used


def test_every_code_has_a_status_and_public_summary() -> None:
    for code in ErrorCode:
        assert isinstance(code.status, grpc.StatusCode) and code.summary
        error = ServiceError(code, "what to do")
        assert str(error) == f"{code.summary}: what to do"
