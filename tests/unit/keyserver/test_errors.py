"""The error catalog is complete: every status and reason the proto promises has a code, and back."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from freemark.v1 import errors_pb2
from freemark_keyserver.errors import ERROR_DOMAIN, ErrorCode, ServiceError

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


# --- the catalog against the proto's ErrorReason (proto/freemark/v1/errors.proto) ----------

REASONS_PROTO = PROTO.with_name("errors.proto")


def test_the_catalog_and_the_proto_reasons_are_the_same_set() -> None:
    declared = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    assert {code.reason for code in ErrorCode} == declared
    for code in ErrorCode:
        assert code.reason == code.name  # the wire reason is the catalog's own name


def test_each_reason_goes_out_under_the_status_its_proto_comment_names() -> None:
    documented: dict[str, str] = {}
    comment: list[str] = []
    for line in REASONS_PROTO.read_text().splitlines():
        line = line.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        value = re.match(r"([A-Z_]+) = \d+;", line)
        if value:
            statuses = re.findall(r"Status: ([A-Z_]+)\.", " ".join(comment))
            documented[value.group(1)] = statuses[0] if statuses else ""
        comment = []
    documented.pop("ERROR_REASON_UNSPECIFIED")
    assert documented == {code.reason: code.status.name for code in ErrorCode}


def test_the_error_domain_is_the_proto_package() -> None:
    assert ERROR_DOMAIN == "freemark.v1" == errors_pb2.DESCRIPTOR.package
    assert f'"{ERROR_DOMAIN}"' in REASONS_PROTO.read_text()
