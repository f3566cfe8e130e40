"""The output key: one frozen dataclass, its fields, and its encrypted file.

The key is a secret (its queries are what a thief would filter, its watermark binds the
owner), so it never rests on disk in the clear: the file is the format's magic line, a
random scrypt salt and AES-256-GCM nonce, and the ciphertext of the key's fields under a key
derived from the owner's passphrase, with the magic and salt as associated data. It is
written through `freemark.secretfile.write_private` (mode 0600, atomic) like every other
secret of the project, and follows `freemark.scheme.bundle`'s conventions: a magic line, a
size cap, and every inconsistency refused as `InvalidInputError` on load.

The fields are stored as arrays of a numpy `.npz` archive read with `allow_pickle=False`
(nothing in the file can run code); `_FIELDS` (the dataclass's own field list) is the one
definition both directions follow.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from freemark.blackbox.archive import read_npz
from freemark.errors import InvalidInputError
from freemark.scheme.bundle import read_key_file
from freemark.scheme.watermark import watermark_bits
from freemark.secretfile import write_private
from freemark.verdict.outputs import RANK_DEPTH

__all__ = ["FILE_MAGIC", "MIN_PASSPHRASE", "OutputKey", "decode_output_key", "encode_output_key",
           "is_output_key", "load_output_key", "save_output_key"]

OUTPUT_KEY_VERSION = 1
FILE_MAGIC = b"FREEMARK-OUTKEY\x00v1\n"
MAX_KEY_BYTES = 512 * 1024 * 1024
MIN_PASSPHRASE = 8
# scrypt at 2^15 × 8 (32 MiB, about 0.1 s): a stolen key file costs a guesser that per try.
_SCRYPT = {"length": 32, "n": 2 ** 15, "r": 8, "p": 1}
_SALT, _NONCE = 16, 12
_INPUT_DTYPES = {"float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64"}


def _array(kind: str) -> dict[str, str]:
    return {"kind": kind}


@dataclass(frozen=True, eq=False)
class OutputKey:
    """Secret queries and what the host answers on them; see docs/blackbox.md.

    Items are of two kinds. Queries (`queries`, one per watermark bit) carry two target
    classes; the bit picks the one the host answers (`targets`), the other is the one it
    must rank below (`others`). Ranking items (`ranking_inputs`) are natural images with the
    host's top `RANK_DEPTH` classes in order. Each item has a fold (0 or 1: which half of
    the panel shaped it) and a set id (the disjoint sets disclosed one per endpoint).
    """

    owner: str = field(metadata=_array("text"))
    nonce: bytes = field(metadata=_array("bytes"))
    n_classes: int = field(metadata=_array("int"))
    queries: np.ndarray = field(metadata=_array("inputs"))  # (Q, *input shape), host dtype
    classes: np.ndarray = field(metadata=_array("array"))  # (Q, 2) the two target classes
    folds: np.ndarray = field(metadata=_array("array"))  # (Q,)
    set_ids: np.ndarray = field(metadata=_array("array"))  # (Q,)
    ranking_inputs: np.ndarray = field(metadata=_array("inputs"))  # (R, *input shape)
    ranking_orders: np.ndarray = field(metadata=_array("array"))  # (R, RANK_DEPTH)
    ranking_folds: np.ndarray = field(metadata=_array("array"))  # (R,)
    ranking_set_ids: np.ndarray = field(metadata=_array("array"))  # (R,)
    host_fingerprint: bytes = field(metadata=_array("bytes"))
    panel_fingerprints: np.ndarray = field(metadata=_array("array"))  # (P, 32) uint8
    panel_folds: np.ndarray = field(metadata=_array("array"))  # (P,) the fold each derived
    # The panel's scores on every item, as the owner measured them: the owner's null for a
    # local check; a verifier measures its own.
    panel_query_scores: np.ndarray = field(metadata=_array("array"))  # (P, Q, C)
    panel_ranking_scores: np.ndarray = field(metadata=_array("array"))  # (P, R, C)
    parameters: dict[str, Any] = field(metadata=_array("json"))  # derivation, surrogates
    version: int = field(default=OUTPUT_KEY_VERSION, metadata=_array("int"))

    @property
    def bits(self) -> np.ndarray:
        """The watermark, one bit per query, recomputed from (owner, nonce)."""
        return watermark_bits(self.owner, self.nonce, len(self.queries)).astype(np.int64)

    @property
    def targets(self) -> np.ndarray:
        """t_b: the class the host answers on each query."""
        return self.classes[np.arange(len(self.classes)), self.bits]

    @property
    def others(self) -> np.ndarray:
        """The second target class, which the host ranks below t_b."""
        return self.classes[np.arange(len(self.classes)), 1 - self.bits]

    @property
    def n_sets(self) -> int:
        """How many disjoint query sets the key holds."""
        return int(self.set_ids.max()) + 1

    @property
    def panel(self) -> list[bytes]:
        """The panel members' weight fingerprints."""
        return [bytes(row) for row in self.panel_fingerprints]


_FIELDS = dataclasses.fields(OutputKey)


def encode_output_key(key: OutputKey) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for spec in _FIELDS:
        value = getattr(key, spec.name)
        kind = spec.metadata["kind"]
        if kind == "text":
            arrays[spec.name] = np.frombuffer(value.encode(), dtype=np.uint8)
        elif kind == "bytes":
            arrays[spec.name] = np.frombuffer(value, dtype=np.uint8)
        elif kind == "int":
            arrays[spec.name] = np.asarray(value, dtype=np.int64)
        elif kind == "json":
            arrays[spec.name] = np.frombuffer(json.dumps(value, sort_keys=True).encode(),
                                              dtype=np.uint8)
        else:
            arrays[spec.name] = np.ascontiguousarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def decode_output_key(data: bytes | memoryview) -> OutputKey:
    """The key `encode_output_key` wrote, checked (`_validate`); its arrays are read-only
    views of `data` (`archive.read_npz`: a VerifyEndpoint opens a key on its critical path)."""
    try:
        arrays = read_npz(data)
    except InvalidInputError as exc:
        raise InvalidInputError(f"not a freemark output key ({exc})") from exc
    values: dict[str, Any] = {}
    for spec in _FIELDS:
        if spec.name not in arrays:
            raise InvalidInputError(f"output key lacks its {spec.name!r} field")
        array, kind = arrays[spec.name], spec.metadata["kind"]
        try:
            if kind == "text":
                values[spec.name] = array.astype(np.uint8).tobytes().decode()
            elif kind == "bytes":
                values[spec.name] = array.astype(np.uint8).tobytes()
            elif kind == "int":
                values[spec.name] = int(array)
            elif kind == "json":
                values[spec.name] = json.loads(array.astype(np.uint8).tobytes())
            else:
                values[spec.name] = array
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"output key field {spec.name!r} is malformed") from exc
    key = OutputKey(**values)
    _validate(key)
    return key


def _validate(key: OutputKey) -> None:
    """Every shape, range and dtype a judge relies on; raises InvalidInputError."""
    if key.version != OUTPUT_KEY_VERSION:
        raise InvalidInputError(f"unsupported output key version {key.version}")
    q, r, p = len(key.queries), len(key.ranking_inputs), len(key.panel_folds)
    c = key.n_classes
    checks = [
        (key.queries.dtype.name in _INPUT_DTYPES, "queries have an unsupported dtype"),
        (key.ranking_inputs.dtype == key.queries.dtype
         and key.ranking_inputs.shape[1:] == key.queries.shape[1:],
         "ranking inputs and queries differ in dtype or shape"),
        (c >= 2, "fewer than two classes"),
        (key.classes.shape == (q, 2) and np.all((key.classes >= 0) & (key.classes < c))
         and np.all(key.classes[:, 0] != key.classes[:, 1]), "target classes out of range"),
        (key.ranking_orders.shape == (r, RANK_DEPTH)
         and np.all((key.ranking_orders >= 0) & (key.ranking_orders < c)),
         "ranking orders out of range"),
        (all(a.shape == (n,) and np.all(np.isin(a, (0, 1)))
             for a, n in ((key.folds, q), (key.ranking_folds, r), (key.panel_folds, p))),
         "folds must be 0 or 1, one per item and panel member"),
        (key.set_ids.shape == (q,) and key.ranking_set_ids.shape == (r,) and q > 0
         and np.all(key.set_ids >= 0) and np.all(key.ranking_set_ids >= 0)
         and set(np.unique(key.set_ids)) == set(range(int(key.set_ids.max()) + 1)),
         "set ids must number the sets 0..K-1"),
        (len(key.host_fingerprint) == 32, "host fingerprint must be a SHA-256 digest"),
        (len(key.nonce) == 32, "nonce must be 32 bytes"),
        (key.panel_fingerprints.shape == (p, 32) and p >= 2, "panel fingerprints malformed"),
        (key.panel_query_scores.shape == (p, q, c)
         and key.panel_ranking_scores.shape == (p, r, c)
         and np.all(np.isfinite(key.panel_query_scores))
         and np.all(np.isfinite(key.panel_ranking_scores)), "panel scores malformed"),
    ]
    for ok, why in checks:
        if not ok:
            raise InvalidInputError(f"output key: {why}")
    _ = key.bits  # recomputing b validates owner and nonce and the query count


def _kdf(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, **_SCRYPT).derive(passphrase)


def save_output_key(path: str | os.PathLike[str], key: OutputKey, passphrase: bytes) -> None:
    """Encrypt `key` under `passphrase` and write it with mode 0600, atomically."""
    _validate(key)
    if len(passphrase) < MIN_PASSPHRASE:
        raise InvalidInputError(f"an output key's passphrase needs at least {MIN_PASSPHRASE} "
                                f"bytes")
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    sealed = AESGCM(_kdf(passphrase, salt)).encrypt(nonce, encode_output_key(key), FILE_MAGIC + salt)
    write_private(Path(path), FILE_MAGIC + salt + nonce + sealed)


def is_output_key(path: str | os.PathLike[str]) -> bool:
    """Whether `path` starts like an output key file (a white-box `.fmk` does not)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(FILE_MAGIC)) == FILE_MAGIC
    except OSError:
        return False


def load_output_key(path: str | os.PathLike[str], passphrase: bytes) -> OutputKey:
    """Read and decrypt a file written by `save_output_key`. A wrong passphrase and a
    tampered file give the same error (which check failed is not said)."""
    body = read_key_file(path, FILE_MAGIC, max_bytes=MAX_KEY_BYTES, what="output key")
    if len(body) < _SALT + _NONCE + 16:
        raise InvalidInputError(f"{path}: not a freemark output key file (too short)")
    salt, nonce, sealed = body[:_SALT], body[_SALT:_SALT + _NONCE], body[_SALT + _NONCE:]
    try:
        plain = AESGCM(_kdf(passphrase, salt)).decrypt(nonce, sealed, FILE_MAGIC + salt)
    except InvalidTag:
        raise InvalidInputError(f"{path}: cannot open the output key: wrong passphrase or "
                                f"a damaged file") from None
    return decode_output_key(plain)
