"""The client's error tree: catch `FreemarkError` to handle anything this library raises.

One base class lets the CLI print one readable line for any failure, while callers
that care can tell a bad input from a refused key or a server-side failure.
"""

from __future__ import annotations


class FreemarkError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(FreemarkError, ValueError):
    """An argument or file is malformed: wrong layer, bad shape, out-of-range N, ..."""


class ModelFileError(InvalidInputError):
    """A model file is unreadable, not a model, or needs unsafe loading (pickle, compiled code)."""


class UniquenessError(FreemarkError):
    """A derived key also decodes from an unrelated (null-panel) model, so it proves nothing."""


class DerivationError(FreemarkError):
    """Gradient descent did not push every bit past its margin."""
