"""C2SP signed notes: the format, key ids, cosignatures, and every malformed note refused."""

from __future__ import annotations

import base64
import hashlib

import pytest

from freemark.errors import LogProofError
from freemark.tlog.note import (
    MAX_SIGNATURES,
    add_signature,
    note_key_id,
    open_note,
    parse_note,
    sign_note,
    verifier_key,
)
from freemark_keyserver.crypto import SigningKey

KEY = SigningKey.generate()
WITNESS = SigningKey.generate()
NAME = "ttp.example/log"
TEXT = "ttp.example/log\n3\nAAAA\n"


def test_a_note_is_text_a_blank_line_and_em_dash_signature_lines() -> None:
    note = sign_note(TEXT, NAME, KEY)
    text, sep, line = note.decode().rpartition("\n\n")
    assert text + "\n" == TEXT and sep
    assert line.startswith("\u2014 ttp.example/log ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    assert len(raw) == 4 + 64
    expected_id = hashlib.sha256(NAME.encode() + b"\n" + b"\x01"
                                 + KEY.verifier().public_bytes()).digest()[:4]
    assert raw[:4] == expected_id == note_key_id(NAME, KEY.verifier())
    assert open_note(note, NAME, KEY.verifier()) == TEXT


def test_the_verifier_key_names_the_key_and_its_id() -> None:
    name, key_hash, key = verifier_key(NAME, KEY.verifier()).split("+", 2)  # base64 has +
    assert name == NAME and key_hash == note_key_id(NAME, KEY.verifier()).hex()
    assert base64.b64decode(key) == b"\x01" + KEY.verifier().public_bytes()


def test_a_witness_cosignature_is_ignored_by_the_log_key_and_checked_by_its_own() -> None:
    note = add_signature(sign_note(TEXT, NAME, KEY), "witness.example/w1", WITNESS)
    assert len(parse_note(note).signatures) == 2
    assert open_note(note, NAME, KEY.verifier()) == TEXT
    assert open_note(note, "witness.example/w1", WITNESS.verifier()) == TEXT


def test_a_note_of_another_key_or_name_is_refused() -> None:
    note = sign_note(TEXT, NAME, KEY)
    with pytest.raises(LogProofError, match="not signed by key"):
        open_note(note, NAME, WITNESS.verifier())  # same name, other key: another id
    with pytest.raises(LogProofError, match="not signed by key"):
        open_note(note, "other.example/log", KEY.verifier())  # same key, other name


def test_a_known_key_whose_signature_fails_rejects_the_note() -> None:
    note = sign_note(TEXT, NAME, KEY).decode()
    altered = note.replace("\n3\n", "\n4\n", 1).encode()
    with pytest.raises(LogProofError, match="does not verify"):
        open_note(altered, NAME, KEY.verifier())
    # The same key id under the expected name with a signature by someone else fails too.
    text, line = note.rsplit("\n\n", 1)
    raw = base64.b64decode(line.split(" ")[2])
    forged = raw[:4] + WITNESS.sign(TEXT.encode())
    bad = f"{text}\n\n\u2014 {NAME} {base64.b64encode(forged).decode()}\n".encode()
    with pytest.raises(LogProofError, match="does not verify"):
        open_note(bad, NAME, KEY.verifier())


def _line(name: str, raw: bytes) -> str:
    return f"\u2014 {name} {base64.b64encode(raw).decode()}\n"


GOOD_LINE = _line(NAME, b"\x00" * 68)
MALFORMED = {
    "not utf-8": TEXT.encode() + b"\n\xff\xfe\n",
    "control character": ("ttp\x07\n" + "\n" + GOOD_LINE).encode(),
    "carriage return": ("ttp\r\n" + "\n" + GOOD_LINE).encode(),
    "no blank line": (TEXT + GOOD_LINE).encode(),
    "no signature lines": (TEXT + "\n").encode(),
    "no final newline": (TEXT + "\n" + GOOD_LINE.rstrip("\n")).encode(),
    "hyphen, not em dash": (TEXT + "\n" + GOOD_LINE.replace("\u2014", "-")).encode(),
    "no space after name": (TEXT + "\n" + f"\u2014 {NAME}").encode() + b"\n",
    "name with a plus": (TEXT + "\n" + _line("a+b", b"\x00" * 68)).encode(),
    "empty name": (TEXT + "\n" + _line("", b"\x00" * 68)).encode(),
    "signature not base64": (TEXT + "\n" + f"\u2014 {NAME} %%%%\n").encode(),
    "non-canonical base64": (TEXT + "\n" + f"\u2014 {NAME} AAAAAB==\n").encode(),
    "signature only a key id": (TEXT + "\n" + _line(NAME, b"\x00" * 4)).encode(),
    "too many signatures": (TEXT + "\n" + GOOD_LINE * (MAX_SIGNATURES + 1)).encode(),
    "too large": (TEXT * 5000 + "\n" + GOOD_LINE).encode(),
}


@pytest.mark.parametrize("note", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_notes_are_refused(note: bytes) -> None:
    with pytest.raises(LogProofError):
        parse_note(note)
    with pytest.raises(LogProofError):
        open_note(note, NAME, KEY.verifier())


def test_an_ed25519_key_line_of_the_wrong_length_is_refused() -> None:
    key_id = note_key_id(NAME, KEY.verifier())
    note = (TEXT + "\n" + _line(NAME, key_id + b"\x00" * 10)).encode()
    parse_note(note)  # well formed: another algorithm could have such a signature
    with pytest.raises(LogProofError, match="not an Ed25519 signature"):
        open_note(note, NAME, KEY.verifier())


def test_signing_refuses_a_text_or_name_it_could_not_write() -> None:
    with pytest.raises(ValueError, match="newline"):
        sign_note("no newline", NAME, KEY)
    with pytest.raises(ValueError, match="control"):
        sign_note("bell\x07\n", NAME, KEY)
    with pytest.raises(ValueError, match="spaces"):
        sign_note(TEXT, "two words", KEY)
