"""C2SP signed notes (c2sp.org/signed-note): text signed by one or more named Ed25519 keys.

The log's checkpoints are signed notes (`freemark.tlog.merkle.TreeHead.to_text` is the text), so
any tool of the transparency-log ecosystem (Go's `note` package, witnesses, monitors) can read
and check them, and a witness can add its cosignature as one more line without touching ours.

A note is its text (ending in a newline), a blank line, then one or more signature lines
``— <key name> <base64(key id || signature)>``. The key id is the first four bytes of
SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key); the signature is Ed25519 over
the text, final newline included. A key is identified by name and id together: a line whose
name or id is not the expected key's is ignored, a line of the expected key that does not
verify rejects the whole note, and a note with no verifying line of the expected key is
rejected.

Parsing is strict and refuses anything the spec forbids (control characters other than
newline, an empty key name or one with a space or '+', a signature shorter than its key id,
non-canonical base64, more than `MAX_SIGNATURES` lines, a note over `MAX_NOTE_BYTES`). Every
failure raises `LogProofError` with a one-line reason.

Quick start::

    note = sign_note("hello\\n", "example.com/log", signing_key)
    text = open_note(note, "example.com/log", verifier)       # raises unless signed
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Protocol

from freemark.errors import CryptoError, LogProofError
from freemark.tlog.signatures import Verifier

__all__ = [
    "ED25519",
    "KEY_ID_BYTES",
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Note",
    "NoteSignature",
    "NoteSigner",
    "add_signature",
    "check_key_name",
    "note_key_id",
    "open_note",
    "parse_note",
    "sign_note",
    "verifier_key",
]

ED25519 = 0x01  # the signed-note signature type byte of Ed25519
KEY_ID_BYTES = 4
ED25519_SIGNATURE_BYTES = 64
# The spec asks verifiers to bound a note; it requires at least 16 signatures to be accepted.
MAX_SIGNATURES = 16
MAX_NOTE_BYTES = 64 * 1024
_DASH = "\u2014 "  # em dash and a space open every signature line


class NoteSigner(Protocol):
    """What signs a note: the server's `SigningKey` is one."""

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature over `message`."""
        ...

    def verifier(self) -> Verifier:
        """The matching public key."""
        ...


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key's name, its 4-byte id and the signature after it."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        """The line as written in a note, newline included."""
        blob = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{_DASH}{self.name} {blob}\n"


@dataclass(frozen=True)
class Note:
    """A parsed note: its text (final newline included) and its signature lines, in order."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def to_bytes(self) -> bytes:
        """The note as bytes: text, blank line, signature lines."""
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode("utf-8")


def check_key_name(name: str) -> None:
    """Raise `ValueError` unless `name` may name a note key (and so a log origin)."""
    if not name:
        raise ValueError("a key name must be non-empty")
    if "+" in name or any(c.isspace() for c in name) or not name.isprintable():
        raise ValueError(f"key name {name!r} must have no spaces, '+' or control characters")


def note_key_id(name: str, verifier: Verifier) -> bytes:
    """The 4-byte key id of an Ed25519 key under `name`, as the spec recommends."""
    material = name.encode("utf-8") + b"\n" + bytes([ED25519]) + verifier.public_bytes()
    return hashlib.sha256(material).digest()[:KEY_ID_BYTES]


def verifier_key(name: str, verifier: Verifier) -> str:
    """The key in the ecosystem's verifier-key form, ``<name>+<hex id>+<base64(0x01||key)>``.

    It pins name and key together; publish it beside the PEM for tools that read notes.
    """
    check_key_name(name)
    encoded = base64.b64encode(bytes([ED25519]) + verifier.public_bytes()).decode("ascii")
    return f"{name}+{note_key_id(name, verifier).hex()}+{encoded}"


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise ValueError("a note text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ValueError("a note text must not hold control characters other than newline")


def sign_note(text: str, name: str, signer: NoteSigner) -> bytes:
    """A note of `text` signed by `signer` under key `name`."""
    check_key_name(name)
    _check_text(text)
    signature = NoteSignature(name, note_key_id(name, signer.verifier()),
                              signer.sign(text.encode("utf-8")))
    return Note(text, (signature,)).to_bytes()


def add_signature(note: bytes, name: str, signer: NoteSigner) -> bytes:
    """`note` with one more signature line over its text (a witness's cosignature).

    The note is only parsed, not verified: the caller checks the signature it relies on first.
    """
    parsed = parse_note(note)
    if len(parsed.signatures) >= MAX_SIGNATURES:
        raise LogProofError(f"the note already has {MAX_SIGNATURES} signatures")
    check_key_name(name)
    extra = NoteSignature(name, note_key_id(name, signer.verifier()),
                          signer.sign(parsed.text.encode("utf-8")))
    return Note(parsed.text, (*parsed.signatures, extra)).to_bytes()


def _signature_line(line: str, number: int) -> NoteSignature:
    if not line.startswith(_DASH):
        raise LogProofError(f"signature line {number} does not start with an em dash and a space")
    name, sep, blob = line[len(_DASH):].partition(" ")
    if not sep:
        raise LogProofError(f"signature line {number} has no space between key name and signature")
    try:
        check_key_name(name)
    except ValueError as exc:
        raise LogProofError(f"signature line {number}: {exc}") from None
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise LogProofError(f"signature line {number}: the signature is not base64") from None
    if base64.b64encode(raw).decode("ascii") != blob:
        raise LogProofError(f"signature line {number}: the signature is not canonical base64")
    if len(raw) <= KEY_ID_BYTES:
        raise LogProofError(f"signature line {number}: the signature is shorter than a key id")
    return NoteSignature(name, raw[:KEY_ID_BYTES], raw[KEY_ID_BYTES:])


def parse_note(note: bytes) -> Note:
    """The text and signature lines of a note, or `LogProofError` naming the first fault.

    It checks the format only; `open_note` checks a signature.
    """
    if len(note) > MAX_NOTE_BYTES:
        raise LogProofError(f"the note is {len(note)} bytes, over the limit of {MAX_NOTE_BYTES}")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        raise LogProofError("the note is not UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in decoded):
        raise LogProofError("the note holds control characters other than newline")
    if not decoded.endswith("\n"):
        raise LogProofError("the note does not end with a newline")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise LogProofError("the note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    lines = block.split("\n")[:-1]  # the block ends with a newline
    if not lines:
        raise LogProofError("the note has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise LogProofError(f"the note has {len(lines)} signatures, over the limit of "
                            f"{MAX_SIGNATURES}")
    return Note(text, tuple(_signature_line(line, i + 1) for i, line in enumerate(lines)))


def open_note(note: bytes, name: str, verifier: Verifier) -> str:
    """The text of `note` once a signature of key (`name`, `verifier`) verifies over it.

    Lines of other keys are ignored (a witness's cosignature, a rotated key); a line of this
    key that fails rejects the note, and so does a note without one.
    """
    parsed = parse_note(note)
    expected = note_key_id(name, verifier)
    ours = [s for s in parsed.signatures if s.name == name and s.key_id == expected]
    if not ours:
        names = ", ".join(sorted({s.name for s in parsed.signatures}))
        raise LogProofError(f"the note is not signed by key {name!r} (id {expected.hex()}); "
                            f"it has signatures by {names}")
    message = parsed.text.encode("utf-8")
    for signature in ours:
        if len(signature.signature) != ED25519_SIGNATURE_BYTES:
            raise LogProofError(f"the signature of key {name!r} is not an Ed25519 signature")
        try:
            verifier.verify(signature.signature, message)
        except CryptoError:
            raise LogProofError(f"the signature of key {name!r} does not verify: the note was "
                                "altered or not signed by this key") from None
    return parsed.text
