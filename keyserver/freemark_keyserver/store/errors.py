"""The store's errors: one base class, and the two conditions callers act on."""

from __future__ import annotations

__all__ = ["DuplicateError", "NotFoundError", "StoreError"]


class StoreError(Exception):
    """The store cannot do what was asked (closed, schema too new, ...)."""


class DuplicateError(StoreError):
    """A record with the same unique key (name, token hash, registration id) already exists."""


class NotFoundError(StoreError):
    """The record to change does not exist."""
