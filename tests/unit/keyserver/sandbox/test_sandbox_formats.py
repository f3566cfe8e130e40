"""Model formats in the real sandbox worker: an ONNX graph that allocates without bound is
stopped by the sandbox's memory limit and reported as a resource refusal, not a crash; a
checkpoint and an ONNX model of it read the same activations through the worker; a bf16
decoder reads as in process, its memory limit grows with its file, and the operator's
parameter cap reaches the worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats.huggingface import load_checkpoint, pack
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2
from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.sandbox import formats
from freemark_keyserver.sandbox.limits import GiB, SandboxLimits
from freemark_keyserver.sandbox.protocol import SKIP_FINGERPRINT
from freemark_keyserver.sandbox.runner import (
    SandboxResourceError,
    TriggerRun,
    run_batch,
    run_model,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper


def _hungry(path: Path) -> Path:
    """x (batch, 4) -> x + sum(zeros(2^20, 2^16)): asks for 256 GiB at the key tensor."""
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 16], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="/big/ConstantOfShape",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["zeros"], ["total"], name="/big/ReduceSum", keepdims=0),
        helper.make_node("Add", ["x", "total"], ["act"], name="/act/Add"),
    ]
    graph = helper.make_graph(nodes, "hungry",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["b", 4])],
                              [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_allocating_graph_meets_the_memory_limit(tmp_path: Path) -> None:
    triggers = TriggerSet(inputs=np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(SandboxResourceError, match="memory"):
        run_model(_hungry(tmp_path / "hungry.onnx"), layer="act",
                  pooling=bundle_pb2.POOLING_NONE, triggers=triggers,
                  limits=SandboxLimits(memory_bytes=2 * GiB, cpu_seconds=60, wall_seconds=90),
                  options=formats.sandbox_options(pb.MODEL_FORMAT_ONNX))


def test_a_checkpoint_reads_the_same_in_the_worker_as_in_process(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
        vocab_size=100, max_position_embeddings=32)).save_pretrained(tmp_path / "ckpt")
    packed = pack(tmp_path / "ckpt", tmp_path / "ckpt.safetensors")
    mask = np.ones((4, 6), dtype=np.int64)
    mask[0, 3:] = 0
    triggers = TriggerSet(inputs=np.arange(24).reshape(4, 6) + 3, attention_mask=mask)
    layer = "bert.encoder.layer.0.intermediate"
    expected, pooling = capture(load_checkpoint(tmp_path / "ckpt"), layer, triggers)
    result = run_model(packed, layer=layer, pooling=pooling, triggers=triggers,
                       options=formats.sandbox_options(pb.MODEL_FORMAT_HF_CHECKPOINT))
    np.testing.assert_allclose(result.activations, expected, rtol=1e-6, atol=1e-6)  # float32 wire
    assert formats.stored_host_options(packed) == {formats.FORMAT_KEY: "hf"}


def test_warm_up_reads_every_allowed_architecture_and_onnx_and_cleans_up(tmp_path: Path) -> None:
    formats.warm_up(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _decoder(tmp_path: Path) -> tuple[Path, TriggerSet, str]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=100, max_position_embeddings=32,
        tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(tmp_path / "decoder")
    mask = np.ones((4, 6), dtype=np.int64)
    mask[1, 4:] = 0
    triggers = TriggerSet(inputs=np.arange(24).reshape(4, 6) + 3, attention_mask=mask)
    return tmp_path / "decoder", triggers, "model.layers.1.mlp.act_fn"


def test_a_bf16_decoder_reads_the_same_in_the_worker_under_the_operators_caps(
        tmp_path: Path) -> None:
    folder, triggers, layer = _decoder(tmp_path)
    packed = pack(folder, tmp_path / "decoder.safetensors")
    expected, pooling = capture(load_checkpoint(folder), layer, triggers)
    options = formats.sandbox_options(pb.MODEL_FORMAT_HF_CHECKPOINT)
    result = run_model(packed, layer=layer, pooling=pooling, triggers=triggers, options=options)
    np.testing.assert_allclose(result.activations, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ModelFileError, match="over the cap of 1,000"):
        run_model(packed, layer=layer, pooling=pooling, triggers=triggers, options=options,
                  limits=SandboxLimits(max_parameters=1000))


def test_one_child_reads_every_layer_of_a_decoder_from_one_build(tmp_path: Path) -> None:
    """A batch of runs at several layers, and one with a missing layer, is read from one
    build of the checkpoint (`formats.sandboxed_reader`): each run answers what it would
    alone, a run's missing layer is that run's failure only, and the identity is the
    model's fingerprint and architecture digest (zeros for the weights when the request
    skips the fingerprint, as a Verify does)."""
    from freemark.formats.pt2 import architecture_digest, fingerprint

    folder, triggers, layer = _decoder(tmp_path)
    packed = pack(folder, tmp_path / "decoder.safetensors")
    model = load_checkpoint(folder)
    layers = [layer, "model.layers.0.mlp.act_fn", "model.layers.9.mlp.act_fn", layer]
    _, pooling = capture(model, layer, triggers)
    identity, results = run_batch(
        packed, [TriggerRun(name, pooling, triggers, 0) for name in layers],
        options=formats.sandbox_options(pb.MODEL_FORMAT_HF_CHECKPOINT))
    assert identity.fingerprint == fingerprint(model)
    assert identity.architecture_digest == architecture_digest(model)
    for name, result in zip(layers, results):
        if name == "model.layers.9.mlp.act_fn":
            assert isinstance(result, InvalidInputError) and "layers.9" in str(result)
            continue
        expected, _ = capture(model, name, triggers)
        assert not isinstance(result, Exception)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    # A Verify does not use the fingerprint: it asks for none, and reads the same.
    unhashed, again = run_batch(packed, [TriggerRun(layer, pooling, triggers, 0)], options={
        **formats.sandbox_options(pb.MODEL_FORMAT_HF_CHECKPOINT), **SKIP_FINGERPRINT})
    assert unhashed.fingerprint == bytes(32)
    assert unhashed.architecture_digest == identity.architecture_digest
    np.testing.assert_array_equal(again[0], results[0])


def test_the_workers_memory_limit_grows_with_its_model_file(tmp_path: Path) -> None:
    """With a base far too small to run anything, only the share the file's size adds lets
    the same run through: the limit the child gets is the one `for_model` computes."""
    folder, triggers, layer = _decoder(tmp_path)
    packed = pack(folder, tmp_path / "decoder.safetensors")
    options = formats.sandbox_options(pb.MODEL_FORMAT_HF_CHECKPOINT)
    size = packed.stat().st_size
    roomy = SandboxLimits(memory_bytes=1 << 20, memory_per_model_byte=6 * GiB / size)
    result = run_model(packed, layer=layer, pooling=bundle_pb2.POOLING_TOKEN_MEAN,
                       triggers=triggers, options=options, limits=roomy)
    assert result.activations.shape == (4, 48)
    tight = SandboxLimits(memory_bytes=1 << 20, memory_per_model_byte=1.0)
    with pytest.raises(SandboxResourceError, match="memory"):
        run_model(packed, layer=layer, pooling=bundle_pb2.POOLING_TOKEN_MEAN,
                  triggers=triggers, options=options, limits=tight)


def test_uploads_read_into_the_stored_host_get_its_reader(tmp_path: Path) -> None:
    """Bare weights go into either kind of stored host with the host's own loader; a GGUF
    goes into a checkpoint host with the GGUF reader, and into a program not at all (the
    Verify handler refuses it, naming why)."""
    program, checkpoint = tmp_path / "host.pt2", tmp_path / "host.safetensors"
    program.write_bytes(b"PK\x03\x04rest")
    checkpoint.write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    weights, gguf = pb.MODEL_FORMAT_SAFETENSORS, pb.MODEL_FORMAT_GGUF
    assert set(formats.INTO_HOST) == {weights, gguf}
    assert formats.into_host_options(weights, program) == {}
    assert formats.into_host_options(weights, checkpoint) == {formats.FORMAT_KEY: "hf"}
    assert formats.into_host_options(gguf, checkpoint) == {formats.FORMAT_KEY: "gguf"}
    assert formats.into_host_options(gguf, program) is None
    assert formats.handles(formats.into_host_options(gguf, checkpoint) or {})
