"""Envelope encryption for stored secrets and the TTP's signing key.

Keys, triggers and watermarks are secrets (DESIGN §4). Each record is sealed under its own
random data key (AES-256-GCM); the data key is wrapped under a versioned master key. Rotating
the master key therefore re-wraps 32-byte data keys and never decrypts a payload (`rewrap`,
like `MultiFernet.rotate`: encrypt with the newest key, decrypt with any).

Large payloads (registered host models, up to gigabytes) are sealed as a stream instead
(`seal_stream`/`open_stream`): the same wrapped data key, but the payload cut into 1 MiB
segments, each its own AES-GCM ciphertext, so neither sealing nor opening ever holds more than
one segment in memory. The nonces follow the STREAM construction (Hoang, Reyhanitabar,
Rogaway, Vizár 2015): a random prefix, the segment index and a flag set only on the last
segment, so a reordered, dropped, duplicated or truncated sequence fails to open. The same
segments under a key that lives only in memory for one call (`ScratchStream`, never wrapped or
written) keep an upload parked on disk unreadable there (`rpc.uploads`).

Everything that can fail on hostile or corrupted input raises one opaque `CryptoError` that
does not say which check failed (pyca's `InvalidToken`), so the server cannot become an
oracle telling an attacker which byte to change next.

The checking half of signing (`Verifier`, `canonical_json`, `verify_json`, `CryptoError`)
lives in the library's `freemark.tlog.signatures`, so auditors verify offline without this
package; it is re-exported here so server code has one import for both halves.

Key files hold secrets, so they are created 0600 atomically (`freemark.secretfile.write_private`,
the one writer of secret files), and a key file that group or others can read is refused rather
than silently used.

The package, by job, as pyca layers it (safe recipes over private primitives): `keyring`
(versioned master keys, their file and environment formats), `envelope` (`seal`,
`open_envelope`, `rewrap`), `stream` (segmented payloads), `signing` (the TTP's key); the
private `_primitives` (the only module that calls AES-GCM and Ed25519), `_wrapping` (data keys
and associated data) and `_keyfiles`. This module re-exports the public API.

Quick start::

    keyring = load_or_create_keyring(Path("state/master.keys"))
    blob = seal(keyring, secret, record_id="r1", owner="alice").to_bytes()
    secret = open_envelope(keyring, Envelope.from_bytes(blob), record_id="r1", owner="alice")

    header, segments = seal_stream(keyring, Path("model.pt2"), record_id="r1", owner="alice")
    stored = list(segments)                  # in practice: written to the store one by one
    for plaintext in open_stream(keyring, header, iter(stored), record_id="r1", owner="alice"):
        ...                                  # use the output only once the loop ends cleanly

    signer = load_or_create_signing_key(Path("state/signing.pem"))
    signature = sign_json(signer, {"record": "r1"})
    Verifier.from_pem(signer.public_key_pem()).verify(signature, canonical_json({"record": "r1"}))
"""


from __future__ import annotations

from freemark.tlog.signatures import CryptoError, Verifier, canonical_json, verify_json
from freemark_keyserver.crypto._primitives import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from freemark_keyserver.crypto.envelope import Envelope, open_envelope, rewrap, seal
from freemark_keyserver.crypto.keyring import (
    MAX_KEY_VERSION,
    MasterKeyring,
    keyring_from_env,
    keyring_from_file,
    load_or_create_keyring,
    save_keyring,
)
from freemark_keyserver.crypto.signing import (
    SigningKey,
    load_or_create_signing_key,
    sign_json,
    signing_key_from_pem,
)
from freemark_keyserver.crypto.stream import (
    SEGMENT_BYTES,
    ScratchStream,
    StreamHeader,
    is_stream_header,
    open_stream,
    rewrap_stream,
    seal_stream,
)

__all__ = [
    "KEY_BYTES",
    "MAX_KEY_VERSION",
    "NONCE_BYTES",
    "SEGMENT_BYTES",
    "TAG_BYTES",
    "CryptoError",
    "Envelope",
    "MasterKeyring",
    "ScratchStream",
    "SigningKey",
    "StreamHeader",
    "Verifier",
    "canonical_json",
    "is_stream_header",
    "keyring_from_env",
    "keyring_from_file",
    "load_or_create_keyring",
    "load_or_create_signing_key",
    "open_envelope",
    "open_stream",
    "rewrap",
    "rewrap_stream",
    "save_keyring",
    "seal",
    "seal_stream",
    "sign_json",
    "signing_key_from_pem",
    "verify_json",
]
