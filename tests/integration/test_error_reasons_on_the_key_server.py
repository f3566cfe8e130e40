"""The real key server's refusals reach `KeyServiceClient` callers as the reason's named error.

One in-process server on loopback (SQLite, real sandbox) and real digits models; each case
provokes one reason the ordinary way. The reasons that need a hostile or pathological model
(NOT_UNIQUE, SANDBOX_LIMIT, SANDBOX_DEADLINE), a broken client (INVALID_BUNDLE,
UPLOAD_CORRUPT) or a server bug (INTERNAL) are sent through the servicer's own guard in
tests/unit/client/test_error_reasons.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from freemark.derive import derive_key
from freemark.errors import (
    AlreadyRegisteredError,
    HostMismatchError,
    InvalidModelError,
    MalformedRequestError,
    NotFoundError,
    PermissionDeniedError,
    RevokedError,
    ServerError,
    TooLargeError,
    UnauthenticatedError,
)
from freemark.formats.pt2 import load_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import load_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.server import create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models

UPLOAD_CAP = 2 * 1024 * 1024


@dataclass
class Setup:
    target: str
    tokens: dict[str, str]
    files: ModelFiles
    bundle: KeyBundle
    registration_id: str

    def client(self, who: str) -> KeyServiceClient:
        token = "fmk_not-a-real-token" if who == "wrong" else self.tokens[who]
        return KeyServiceClient(self.target, token=token, retries=0, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("reasons")
    files = build_models(folder)
    running = create_server(ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                                         max_upload_bytes=UPLOAD_CAP, grace_seconds=5))
    tokens = {}
    for name, role in (("owner", "owner"), ("arbiter", "arbiter")):
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    bundle = derive_key(load_program(files.host), layer="act", owner="owner",
                        triggers=load_triggers(files.triggers))
    target = f"127.0.0.1:{running.port}"
    with KeyServiceClient(target, token=tokens["owner"], timeout=300) as owner:
        receipt = owner.register(bundle, files.host)
    yield Setup(target, tokens, files, bundle, receipt.registration_id)
    running.stop(grace=1)


def _refused(expected: type[ServerError], reason: str, call: object) -> ServerError:
    assert callable(call)
    with pytest.raises(ServerError) as caught:
        call()
    assert type(caught.value) is expected, caught.value
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"{reason}: ")
    return caught.value


def test_unauthenticated(setup: Setup) -> None:
    with setup.client("wrong") as client:
        _refused(UnauthenticatedError, "UNAUTHENTICATED", client.get_checkpoint)


def test_permission_denied(setup: Setup) -> None:
    with setup.client("arbiter") as client:
        _refused(PermissionDeniedError, "PERMISSION_DENIED",
                 lambda: client.register(setup.bundle, setup.files.host))


def test_malformed_request_and_not_found(setup: Setup) -> None:
    with setup.client("owner") as client:
        _refused(MalformedRequestError, "MALFORMED_REQUEST", lambda: client.get_registration(""))
        _refused(NotFoundError, "NOT_FOUND", lambda: client.get_registration("reg_absent"))


def test_already_claimed(setup: Setup) -> None:
    with setup.client("owner") as client:
        error = _refused(AlreadyRegisteredError, "ALREADY_CLAIMED",
                         lambda: client.register(setup.bundle, setup.files.host))
    assert setup.registration_id in error.message


def test_host_mismatch(setup: Setup) -> None:
    with setup.client("owner") as client:
        _refused(HostMismatchError, "HOST_MISMATCH",
                 lambda: client.register(setup.bundle, setup.files.independent))


def test_invalid_model_and_too_large(setup: Setup, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model" * 100)
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (UPLOAD_CAP + 1))
    with setup.client("arbiter") as client:
        _refused(InvalidModelError, "INVALID_MODEL", lambda: client.verify(setup.registration_id, junk))
        _refused(TooLargeError, "TOO_LARGE", lambda: client.verify(setup.registration_id, big))


def test_revoked_last(setup: Setup) -> None:
    with setup.client("owner") as client:
        client.revoke(setup.registration_id, "test")
        _refused(RevokedError, "REVOKED",
                 lambda: client.verify(setup.registration_id, setup.files.finetuned))
