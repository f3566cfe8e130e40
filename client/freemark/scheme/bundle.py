"""The key bundle: one frozen dataclass, converted to and from `freemark.v1.KeyBundle` here only.

A bundle file (`.fmk`) is a magic line followed by the serialized protobuf. The bundle
is secret (key, triggers, nonce): files are created with mode 0600.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from freemark.errors import InvalidInputError
from freemark.scheme.probes import MAX_PROBES, MIN_PROBES
from freemark.scheme.triggers import TriggerSet
from freemark.scheme.watermark import check_n_bits, watermark_bits
from freemark.secretfile import write_private
from freemark.v1 import bundle_pb2

SCHEME_VERSION = 1
FILE_MAGIC = b"FREEMARK-KEY\x00v1\n"
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


@dataclass(frozen=True)
class MarginReport:
    """Host margins at derivation: the target m and the achieved min/median/mean."""

    target: float
    min: float
    median: float
    mean: float


@dataclass(frozen=True, eq=False)
class KeyBundle:
    """Everything needed to extract and judge a watermark; see proto/freemark/v1/bundle.proto."""

    layer: str
    pooling: int
    triggers: TriggerSet
    owner: str
    nonce: bytes
    n_bits: int
    key: np.ndarray
    anchor_seed: bytes
    margins: MarginReport
    host_fingerprint: bytes
    centred: bool = True
    scheme_version: int = SCHEME_VERSION
    probe_profile: np.ndarray | None = None  # (probes, units): the host on the alignment probes

    @property
    def units(self) -> int:
        """Width of the key's layer."""
        return int(self.key.shape[1])

    @property
    def probes(self) -> int:
        """How many alignment probes the profile covers (0: no aligned test for this key)."""
        return 0 if self.probe_profile is None else int(self.probe_profile.shape[0])

    @property
    def bits(self) -> np.ndarray:
        """The watermark b, recomputed from (owner, nonce, n_bits)."""
        return watermark_bits(self.owner, self.nonce, self.n_bits)


def tensor_to_proto(array: np.ndarray) -> bundle_pb2.Tensor:
    """A numpy array as a little-endian `Tensor` message."""
    array = np.asarray(array)
    if array.dtype.name not in _DTYPES:
        raise InvalidInputError(f"unsupported tensor dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return bundle_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=data.tobytes())


def tensor_from_proto(message: bundle_pb2.Tensor, what: str) -> np.ndarray:
    """The inverse of `tensor_to_proto`; checks dtype and that the byte count fits the shape."""
    if message.dtype not in _DTYPES:
        raise InvalidInputError(f"{what}: unsupported tensor dtype {message.dtype!r}")
    dtype = np.dtype(message.dtype).newbyteorder("<")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(message.data):
        raise InvalidInputError(f"{what}: {len(message.data)} bytes do not fit shape {shape} {dtype.name}")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def to_proto(bundle: KeyBundle) -> bundle_pb2.KeyBundle:
    """The wire/storage form of a bundle."""
    triggers = bundle_pb2.TriggerSet(inputs=tensor_to_proto(bundle.triggers.inputs))
    if bundle.triggers.attention_mask is not None:
        triggers.attention_mask.CopyFrom(tensor_to_proto(bundle.triggers.attention_mask))
    if bundle.triggers.labels is not None:
        triggers.labels.CopyFrom(tensor_to_proto(bundle.triggers.labels))
    m = bundle.margins
    return bundle_pb2.KeyBundle(
        scheme_version=bundle.scheme_version, layer=bundle.layer,
        pooling=bundle_pb2.Pooling.ValueType(bundle.pooling),
        triggers=triggers, owner=bundle.owner, nonce=bundle.nonce, n_bits=bundle.n_bits,
        key=tensor_to_proto(bundle.key.astype(np.float32)), anchor_seed=bundle.anchor_seed,
        margins=bundle_pb2.MarginReport(target=m.target, min=m.min, median=m.median, mean=m.mean),
        host_fingerprint=bundle.host_fingerprint, centred=bundle.centred, units=bundle.units,
        probe_profile=(None if bundle.probe_profile is None
                       else tensor_to_proto(bundle.probe_profile.astype(np.float32))),
    )


def from_proto(message: bundle_pb2.KeyBundle) -> KeyBundle:
    """Validate and convert a `KeyBundle` message; any inconsistency is InvalidInputError."""
    if message.scheme_version != SCHEME_VERSION:
        raise InvalidInputError(f"unsupported key bundle scheme version {message.scheme_version}")
    if not message.layer:
        raise InvalidInputError("key bundle names no layer")
    if message.pooling not in (bundle_pb2.POOLING_NONE, bundle_pb2.POOLING_SPATIAL_MEAN,
                               bundle_pb2.POOLING_TOKEN_MEAN):
        raise InvalidInputError("key bundle has no valid pooling")
    check_n_bits(message.n_bits)
    key = tensor_from_proto(message.key, "key")
    if key.shape != (message.n_bits, message.units) or not np.all(np.isfinite(key)):
        raise InvalidInputError(
            f"key shape {key.shape} does not match n_bits={message.n_bits}, units={message.units}"
        )
    if len(message.host_fingerprint) != 32:
        raise InvalidInputError("key bundle host fingerprint must be a SHA-256 digest")
    inputs = tensor_from_proto(message.triggers.inputs, "trigger inputs")
    mask = (tensor_from_proto(message.triggers.attention_mask, "attention mask")
            if message.triggers.HasField("attention_mask") else None)
    labels = (tensor_from_proto(message.triggers.labels, "trigger labels")
              if message.triggers.HasField("labels") else None)
    profile = None
    if message.HasField("probe_profile"):
        profile = tensor_from_proto(message.probe_profile, "probe profile")
        if (profile.ndim != 2 or profile.shape[1] != message.units
                or not MIN_PROBES <= profile.shape[0] <= MAX_PROBES
                or not np.all(np.isfinite(profile))):
            raise InvalidInputError(
                f"probe profile of shape {profile.shape} does not fit a layer of "
                f"{message.units} units and {MIN_PROBES}..{MAX_PROBES} probes")
    m = message.margins
    bundle = KeyBundle(
        layer=message.layer, pooling=message.pooling,
        triggers=TriggerSet(inputs=inputs, attention_mask=mask, labels=labels),
        owner=message.owner, nonce=bytes(message.nonce), n_bits=message.n_bits, key=key,
        anchor_seed=bytes(message.anchor_seed),
        margins=MarginReport(target=m.target, min=m.min, median=m.median, mean=m.mean),
        host_fingerprint=bytes(message.host_fingerprint), centred=message.centred,
        scheme_version=message.scheme_version, probe_profile=profile,
    )
    _ = bundle.bits  # recomputing b validates owner and nonce
    return bundle


def to_bytes(bundle: KeyBundle) -> bytes:
    """Serialized bundle (deterministic protobuf; not used for signing)."""
    return to_proto(bundle).SerializeToString(deterministic=True)


def from_bytes(data: bytes) -> KeyBundle:
    """Parse serialized bundle bytes, with a clear error on garbage."""
    message = bundle_pb2.KeyBundle()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidInputError(f"not a freemark key bundle ({exc})") from exc
    return from_proto(message)


def save_bundle(path: str | Path, bundle: KeyBundle) -> None:
    """Write a `.fmk` file with mode 0600, atomically (`freemark.secretfile.write_private`)."""
    write_private(Path(path), FILE_MAGIC + to_bytes(bundle))


def read_key_file(path: str | os.PathLike[str], magic: bytes, *, max_bytes: int, what: str
                  ) -> bytes:
    """The body of a key file written as `magic` + body (a bundle here, an output key in
    `freemark.blackbox.key`), its size checked before it is read; `what` names the kind of
    key in refusals."""
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise InvalidInputError(f"{path}: {size} bytes is larger than any {what}")
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read key file ({exc.strerror})") from exc
    if not data.startswith(magic):
        raise InvalidInputError(f"{path}: not a freemark {what} file (bad magic)")
    return data[len(magic):]


def load_bundle(path: str | Path) -> KeyBundle:
    """Read a `.fmk` file written by `save_bundle`."""
    return from_bytes(read_key_file(path, FILE_MAGIC, max_bytes=MAX_BUNDLE_BYTES,
                                    what="key bundle"))
