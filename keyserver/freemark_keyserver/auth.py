"""Principals, roles and bearer tokens; mTLS client certificates map to principals by name.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored, so a stolen
database does not reveal usable tokens (high-entropy tokens need no slow hash).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

import grpc

from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.store import Principal, Store

OWNER, ARBITER, ADMIN = "owner", "arbiter", "admin"
TOKEN_PREFIX = "fmk_"
_BEARER = "bearer "


def new_token() -> str:
    """A fresh bearer token (printed once by `principal add`)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """What the store keeps instead of the token."""
    return hashlib.sha256(b"freemark/v1/token" + token.encode("utf-8")).digest()


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if (key.lower() == "authorization" and isinstance(value, str)
                and value.lower().startswith(_BEARER)):
            return value[len(_BEARER):].strip()
    return None


def authenticate(store: Store, context: grpc.ServicerContext) -> Principal:
    """The caller's principal from its bearer token, else from its mTLS certificate."""
    token = _bearer(context.invocation_metadata() or ())
    principal: Principal | None = None
    if token:
        principal = store.principal_by_token_hash(hash_token(token))
        if principal is not None and not hmac.compare_digest(principal.token_hash, hash_token(token)):
            principal = None
        if principal is None:
            raise ServiceError(ErrorCode.UNAUTHENTICATED,
                               "the bearer token is not valid; ask the TTP operator for a token")
    else:
        names = (context.auth_context() or {}).get("x509_common_name", [])
        if names:
            principal = store.principal_by_name(names[0].decode("utf-8", "replace"))
    if principal is None:
        raise ServiceError(ErrorCode.UNAUTHENTICATED,
                           "send 'authorization: Bearer <token>' metadata or a client certificate")
    if principal.disabled:
        raise ServiceError(ErrorCode.UNAUTHENTICATED, f"principal {principal.name!r} is disabled")
    return principal


def require_role(principal: Principal, *roles: str) -> None:
    """PERMISSION_DENIED unless the principal has one of `roles`."""
    if principal.role not in roles:
        raise ServiceError(ErrorCode.PERMISSION_DENIED,
                           f"role {principal.role!r} may not do this (needs {' or '.join(roles)})")
