"""The sealed form of a registration: bundle and panel round-trip; older records still open."""

from __future__ import annotations

import numpy as np
import pytest

from freemark.errors import InvalidInputError
from freemark.panel import Reference
from freemark.scheme.bundle import KeyBundle, MarginReport, to_bytes
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.handlers.panels import SEALED_MAGIC, open_bytes, seal_bytes


def _bundle(profile: np.ndarray | None) -> KeyBundle:
    rng = np.random.default_rng(0)
    return KeyBundle(layer="act", pooling=1, triggers=TriggerSet(inputs=rng.normal(size=(4, 3))),
                     owner="alice", nonce=bytes(32), n_bits=16,
                     key=rng.normal(size=(16, 8)).astype(np.float32), anchor_seed=bytes(32),
                     margins=MarginReport(1.0, 1.0, 1.0, 1.0), host_fingerprint=bytes(range(32)),
                     probe_profile=profile)


def test_bundle_and_panel_round_trip() -> None:
    rng = np.random.default_rng(1)
    bundle = _bundle(rng.normal(size=(20, 8)).astype(np.float32))
    panel = [Reference(fingerprint=bytes([i]) * 32, trigger_activations=rng.normal(size=(4, 8)),
                       probe_activations=rng.normal(size=(20, 8 + i))) for i in range(3)]
    opened, members = open_bytes(seal_bytes(bundle, panel))
    assert to_bytes(opened) == to_bytes(bundle)
    assert [m.fingerprint for m in members] == [m.fingerprint for m in panel]
    for got, sent in zip(members, panel, strict=True):
        np.testing.assert_allclose(got.probe_activations, sent.probe_activations.astype(np.float32))
        assert got.probe_activations.shape == sent.probe_activations.shape


def test_a_record_sealed_before_panels_holds_a_bare_bundle() -> None:
    bundle = _bundle(None)
    opened, members = open_bytes(to_bytes(bundle))
    assert to_bytes(opened) == to_bytes(bundle) and members == []


def test_garbage_after_the_magic_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        open_bytes(SEALED_MAGIC + b"\xff\xff\xff")


def test_references_are_programs_or_checkpoints_beside_a_checkpoint_host() -> None:
    from freemark.formats.table import by_name
    from freemark.v1 import keyservice_pb2 as pb
    from freemark_keyserver.errors import ServiceError
    from freemark_keyserver.handlers.panels import reference_format

    checkpoint, program = by_name("hf"), by_name("pt2")
    for wire in (pb.MODEL_FORMAT_PT2, pb.MODEL_FORMAT_HF_CHECKPOINT):
        assert reference_format(pb.UploadHeader(format=wire), checkpoint).wire == wire
    assert reference_format(pb.UploadHeader(format=pb.MODEL_FORMAT_PT2), program) is program
    with pytest.raises(ServiceError, match="must be a torch.export program") as refused:
        reference_format(pb.UploadHeader(format=pb.MODEL_FORMAT_HF_CHECKPOINT), program)
    assert refused.value.code.name == "MALFORMED_REQUEST"
    for wire in (pb.MODEL_FORMAT_ONNX, pb.MODEL_FORMAT_SAFETENSORS):
        with pytest.raises(ServiceError, match="or a Hugging Face checkpoint"):
            reference_format(pb.UploadHeader(format=wire), checkpoint)
