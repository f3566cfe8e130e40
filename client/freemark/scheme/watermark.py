"""The watermark bits b, bound to the owner and a random nonce (docs/design.md §1.1).

b is not free-form: anyone holding (owner, nonce) can recompute it, so the TTP can
check that a registered watermark belongs to the registering owner, and a thief
cannot claim someone else's bit string as his own without also claiming the owner id.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

DOMAIN = b"freemark/v1/watermark"
NONCE_BYTES = 32
MIN_BITS = 16
MAX_BITS = 8192


def new_nonce() -> bytes:
    """A fresh random 32-byte nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def check_n_bits(n_bits: int) -> None:
    """Raise a clear error when N is outside the supported range."""
    from freemark.errors import InvalidInputError

    if not isinstance(n_bits, int) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise InvalidInputError(
            f"n_bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {n_bits!r}"
        )


def watermark_bits(owner: str, nonce: bytes, n_bits: int) -> np.ndarray:
    """b = first n_bits of SHAKE-256(DOMAIN || len(owner) || owner || nonce), as uint8 0/1.

    The owner is length-prefixed so ("ab", "c...") and ("a", "bc...") never collide.
    """
    from freemark.errors import InvalidInputError

    check_n_bits(n_bits)
    if not owner:
        raise InvalidInputError("owner must be a non-empty string")
    if len(nonce) != NONCE_BYTES:
        raise InvalidInputError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    owner_bytes = owner.encode("utf-8")
    message = DOMAIN + len(owner_bytes).to_bytes(4, "big") + owner_bytes + nonce
    stream = hashlib.shake_256(message).digest((n_bits + 7) // 8)
    return np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n_bits].copy()


def commitment(bits: np.ndarray) -> bytes:
    """SHA-256 of the packed bits: what a receipt may publish without revealing b."""
    packed = np.packbits(np.asarray(bits, dtype=np.uint8))
    return hashlib.sha256(len(bits).to_bytes(4, "big") + packed.tobytes()).digest()
