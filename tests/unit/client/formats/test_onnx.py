"""ONNX suspects: the key tensor is found from torch.onnx.export's names and reads what the
torch module reads; custom domains, external data, operators off the allow-list, local
functions and garbage are refused before a session exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from freemark.errors import ModelFileError
from freemark.formats.onnx import MAX_ONNX_BYTES, OnnxModel, layer_tensor, load_onnx
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2
from freemark_lab.models import DigitsCNN

onnx = pytest.importorskip("onnx")
from onnx import helper

LAYER = "bert.encoder.layer.1.intermediate"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        vocab_size=120, max_position_embeddings=64, num_labels=3)).eval()
    path = tmp_path_factory.mktemp("onnx") / "bert.onnx"
    axes = {0: "batch", 1: "tokens"}
    ids = torch.randint(3, 100, (2, 7))
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return model, path


def _tokens() -> TriggerSet:
    rng = np.random.default_rng(1)
    mask = np.ones((5, 9), dtype=np.int64)
    mask[1:, 5:] = 0
    return TriggerSet(inputs=rng.integers(3, 100, size=(5, 9)), attention_mask=mask)


def test_the_key_tensor_is_found_and_reads_like_the_module(bert: tuple[torch.nn.Module, Path]
                                                           ) -> None:
    model, path = bert
    suspect = OnnxModel.open(path, LAYER)
    assert suspect.tensor.startswith("/bert/encoder/layer.1/intermediate/")
    triggers = _tokens()
    expected, pooling = capture(model, LAYER, triggers)
    assert pooling == bundle_pb2.POOLING_TOKEN_MEAN
    got = suspect.capture(triggers.inputs, triggers.attention_mask, pooling, batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert suspect.fingerprint() == OnnxModel.open(path, LAYER).fingerprint()


def test_an_image_model_reads_its_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    path = tmp_path / "digits.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    expected, pooling = capture(model, "act", TriggerSet(inputs=x))
    got = OnnxModel.open(path, "act").capture(x, None, pooling)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_scan_reads_the_key_tensor_whatever_the_nodes_are_called(
        bert: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """Issue 18, item 3: with every node renamed, the scan still reads the key layer's tensor
    (by its values), names each tensor it read, keeps only tensors of the key's width pooled
    like it, and lists the same tensors whatever the inputs hold."""
    model, path = bert
    triggers = _tokens()
    expected, _ = capture(model, LAYER, triggers)

    def renamed(graph: object) -> None:
        for number, node in enumerate(graph.graph.node):  # type: ignore[attr-defined]
            node.name = f"n{number}"
    found = load_onnx(_edited(path, tmp_path / "renamed.onnx", renamed))
    scanned = OnnxModel(found, "", "renamed.onnx").scan(
        triggers.inputs, triggers.attention_mask, width=48)
    assert scanned and all(m.shape == (5, 48) for _, m in scanned)
    assert any(np.allclose(m, expected, atol=1e-4) for _, m in scanned)
    names = [name for name, _ in scanned]
    assert len(set(names)) == len(names) and set(names) <= {o for n in found.graph.node
                                                             for o in n.output}
    zeros = OnnxModel(found, "", "renamed.onnx").scan(
        np.zeros_like(triggers.inputs), triggers.attention_mask, width=48)
    assert [name for name, _ in zeros] == names  # which tensors: shapes, never values
    narrow = next(o for n in found.graph.node for o in n.output if o not in names
                  and n.op_type == "Add")  # a float tensor that is not a candidate
    asked = OnnxModel(found, narrow, "renamed.onnx").scan(
        triggers.inputs, triggers.attention_mask, width=48)
    assert [name for name, _ in asked] == sorted({*names, narrow}, key=[
        o for n in found.graph.node for o in n.output].index)  # read too, in graph order


def test_unknown_layers_and_tensors_are_refused_clearly(bert: tuple[torch.nn.Module, Path]) -> None:
    _, path = bert
    with pytest.raises(ModelFileError, match="no node is named after layer 'head'.*--onnx-tensor"):
        OnnxModel.open(path, "head")
    model = load_onnx(path)
    inner = next(o for n in model.graph.node for o in n.output
                 if o.startswith("/bert/encoder/layer.1/intermediate/dense/"))
    model.graph.node.append(helper.make_node("Identity", [inner], ["peek"], name="/peek/Identity"))
    with pytest.raises(ModelFileError, match="cannot tell which tensor.*--onnx-tensor"):
        layer_tensor(model, LAYER)  # two tensors now leave the layer's scope
    with pytest.raises(ModelFileError, match="no node of the graph outputs a tensor named 'x'"):
        OnnxModel.open(path, LAYER, tensor="x")


def _edited(path: Path, out: Path, edit: object) -> Path:
    model = onnx.load(str(path))
    edit(model)  # type: ignore[operator]
    onnx.save(model, str(out))
    return out


def _custom_node(model: object) -> None:
    model.graph.node.append(helper.make_node("Steal", [model.graph.output[0].name], ["x"],  # type: ignore[attr-defined]
                                             domain="com.evil"))
    model.opset_import.append(helper.make_opsetid("com.evil", 1))  # type: ignore[attr-defined]


def _contrib_node(model: object) -> None:
    model.graph.node.append(helper.make_node("FusedGemm", [model.graph.output[0].name], ["x"],  # type: ignore[attr-defined]
                                             domain="com.microsoft"))


def _random_op(model: object) -> None:
    model.graph.node.append(helper.make_node("RandomNormal", [], ["noise"], shape=[2]))  # type: ignore[attr-defined]


def _control_flow(model: object) -> None:
    branch = helper.make_graph([], "b", [], [])
    model.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch,  # type: ignore[attr-defined]
                                             else_branch=branch))


def _function(model: object) -> None:
    model.functions.append(helper.make_function("local", "f", ["a"], ["b"], [  # type: ignore[attr-defined]
        helper.make_node("Identity", ["a"], ["b"])], [helper.make_opsetid("", 17)]))


@pytest.mark.parametrize(("edit", "words"), [
    (_custom_node, "domain 'com.evil'"),
    (_contrib_node, "domain 'com.microsoft'"),
    (_random_op, "'RandomNormal'"),
    (_control_flow, "'If'"),
    (_function, "model-local functions"),
])
def test_unsafe_graphs_are_refused(bert: tuple[torch.nn.Module, Path], tmp_path: Path,
                                   edit: object, words: str) -> None:
    _, path = bert
    with pytest.raises(ModelFileError, match=words):
        load_onnx(_edited(path, tmp_path / "bad.onnx", edit))


def test_external_data_is_refused(bert: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = bert
    model = onnx.load(str(path))
    out = tmp_path / "external.onnx"
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    with pytest.raises(ModelFileError, match="external data"):
        load_onnx(out)


def test_garbage_pickles_and_oversized_files_are_refused(bert: tuple[torch.nn.Module, Path],
                                                         tmp_path: Path) -> None:
    _, path = bert
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        load_onnx(garbage)
    pickled = tmp_path / "pickled.onnx"
    torch.save({"a": torch.zeros(2)}, pickled)
    with pytest.raises(ModelFileError, match="zip or pickle"):
        load_onnx(pickled)
    with pytest.raises(ModelFileError, match="over the ONNX cap"):
        load_onnx(path, max_bytes=100)
    assert MAX_ONNX_BYTES < 2**31


# --- issue 18: no index or shape computed from the inputs' values ---------------------------


def _graph(nodes: list[object], initializers: list[object] | None = None) -> object:
    """A one-input graph x (batch, 4) float -> y, opset 17."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _index_from_x() -> list[object]:
    """An int64 index computed from the input's values: x * 1000, cast."""
    return [helper.make_node("Constant", [], ["k"], name="/k",
                             value=helper.make_tensor("kv", onnx.TensorProto.FLOAT, [], [1000.0])),
            helper.make_node("Mul", ["x", "k"], ["scaled"], name="/scale/Mul"),
            helper.make_node("Cast", ["scaled"], ["index"], name="/scale/Cast",
                             to=onnx.TensorProto.INT64)]


@pytest.mark.parametrize(("node", "extra", "words"), [
    (helper.make_node("Reshape", ["x", "index"], ["y"], name="/r/Reshape"), [], "Reshape"),
    (helper.make_node("Expand", ["x", "index"], ["y"], name="/e/Expand"), [], "Expand"),
    (helper.make_node("Slice", ["x", "start", "index"], ["y"], name="/s/Slice"),
     [helper.make_tensor("start", onnx.TensorProto.INT64, [1], [0])], "Slice"),
])
def test_shapes_and_bounds_computed_from_the_inputs_are_refused(
        tmp_path: Path, node: object, extra: list[object], words: str) -> None:
    """The ONNX form of issue 18's trick: a shape or bound taken from the trigger values
    fails, or costs differently, on some values only; refused before a session exists."""
    path = tmp_path / "bad.onnx"
    onnx.save(_graph([*_index_from_x(), node], extra), str(path))
    with pytest.raises(ModelFileError, match=rf"\({words}\) takes its operand \d+ \('index'\) "
                       "from the graph inputs' values"):
        load_onnx(path)


def test_a_shape_computed_from_sizes_passes(tmp_path: Path) -> None:
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="/r/Shape"),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="/r/Reshape")]
    path = tmp_path / "ok.onnx"
    onnx.save(_graph(nodes), str(path))
    load_onnx(path)


def test_a_gather_index_computed_from_the_inputs_is_clamped(tmp_path: Path) -> None:
    """Issue 18's ONNX trick (trigger values packed into a `Gather` index, which
    onnxruntime's out-of-range error names): the index is clamped into the table's range,
    so no value fails, and in-range indices read what they read before; the weights'
    fingerprint and family are the file's."""
    table = helper.make_tensor("table", onnx.TensorProto.FLOAT, [3, 2], [0, 1, 2, 3, 4, 5])
    nodes = [*_index_from_x(), helper.make_node("Gather", ["table", "index"], ["picked"],
                                                name="/act/Gather", axis=0),
             helper.make_node("Identity", ["picked"], ["y"], name="/out/Identity")]
    path = tmp_path / "gather.onnx"
    onnx.save(_graph(nodes, [table]), str(path))
    plain = OnnxModel(onnx.load(str(path)), "y", str(path))
    model = OnnxModel.open(path, "out", tensor="picked")
    assert model.fingerprint() == plain.fingerprint()
    assert model.architecture_digest() == plain.architecture_digest()
    session = model.prepared()._session()
    far = np.array([[123456.789, -99.0, 0.0, 0.0015]], dtype=np.float32)
    (picked,) = session.run(["picked"], {"x": far})
    assert picked.tolist() == [[[4, 5], [0, 1], [0, 1], [2, 3]]]  # clamped to [-3, 2]
    import onnxruntime as ort

    raw = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="123456"):  # unclamped, the error names the value
        raw.run(["y"], {"x": far})
