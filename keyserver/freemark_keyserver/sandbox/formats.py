"""What the sandbox adds to the library's format table (`freemark.formats.table`).

Which formats exist, which may be registered or judged, and the suffix an upload is spooled
under are the table's rows; the server reads them there (`by_wire`, `.host`, `.suspect`,
`.suffix`, `names`). This module keeps what only the sandbox needs:

- the options the child receives (`sandbox_options`, carried in the worker's request header):
  the row's `name` for a format with its own loader here, and for ONNX the tensor the caller
  named; nothing for a `.pt2` program, the worker's default (bare `.safetensors` weights ride
  with the stored host program they belong to);
- a stored host's format, told from its first bytes (`stored_host_options`): a program is a
  zip archive, a packed checkpoint a safetensors file; the host was vetted when it was
  registered;
- the child's dispatch (`handles`, `sandboxed_model`, by the row's `name`) to the
  library's safe loaders (`freemark.formats.huggingface`, `freemark.formats.onnx`:
  allow-listed architectures or operators, caps before anything is built, nothing
  unpickled), and their warm-up in the fork server (`warm_up`).

The server never opens an upload itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from freemark.formats.table import by_name, by_wire
from freemark.scheme.triggers import TriggerSet

FORMAT_KEY = "format"
TENSOR_KEY = "onnx_tensor"
MAX_TENSOR_NAME = 1024
_ZIP_MAGIC = b"PK\x03\x04"
_HF = by_name("hf")
_ONNX = by_name("onnx")


def sandbox_options(upload_format: int, onnx_tensor: str = "") -> dict[str, str]:
    """What the worker must know about an upload beyond its path: its format (and for ONNX
    the tensor the caller named). Empty for a program, the worker's default."""
    row = by_wire(upload_format)
    if row is None or row.name not in _READERS:
        return {}
    if row is _ONNX:
        return {FORMAT_KEY: row.name, TENSOR_KEY: onnx_tensor}
    return {FORMAT_KEY: row.name}


def stored_host_options(path: Path) -> dict[str, str]:
    """The sandbox options of a registered host, from its first bytes."""
    with path.open("rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    return {} if head == _ZIP_MAGIC else {FORMAT_KEY: _HF.name}


def handles(header: dict[str, Any]) -> bool:
    """Whether a worker request is for a format this module reads (not a `.pt2` program)."""
    return header.get(FORMAT_KEY) in _READERS


def sandboxed_model(header: dict[str, Any]) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """Inside the sandbox: read a Hugging Face checkpoint or an ONNX model for one set (its
    layer), and return its identity (fingerprint ‖ architecture digest) and its run, a function
    from the set's triggers to the activation matrix. Reading touches no trigger, so its
    failures are the file's; the run's are the run's (`worker`)."""
    return _READERS[header[FORMAT_KEY]](header)


def sandboxed_activations(header: dict[str, Any], triggers: TriggerSet) -> tuple[Any, bytes]:
    """`sandboxed_model` and its run on `triggers`: (activations, identity)."""
    identity, run = sandboxed_model(header)
    return run(triggers), identity


def _onnx_model(header: dict[str, Any]) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    from freemark.formats.onnx import OnnxModel

    onnx_model = OnnxModel.open(header["model"], header["layer"],
                                tensor=header.get(TENSOR_KEY) or None).prepared()
    return (onnx_model.fingerprint() + onnx_model.architecture_digest(),
            lambda triggers: onnx_model.capture(triggers.inputs, triggers.attention_mask,
                                                header["pooling"]))


def _checkpoint_model(header: dict[str, Any]) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    from freemark.formats.huggingface import apply_checkpoint_weights, load_checkpoint
    from freemark.formats.pt2 import architecture_digest, fingerprint
    from freemark.scheme.activations import capture, resolve_layer

    model = (apply_checkpoint_weights(header["model"], header["weights"]) if header.get("weights")
             else load_checkpoint(header["model"]))
    resolve_layer(model, header["layer"])
    return (fingerprint(model) + architecture_digest(model),
            lambda triggers: capture(model, header["layer"], triggers,
                                     pooling=header["pooling"])[0])


# The formats the child reads here, by the table row's `name`; any other is a `.pt2` program
# (`worker._load`).
_READERS: dict[str, Callable[[dict[str, Any]], tuple[bytes, Callable[[TriggerSet], Any]]]] = {
    _HF.name: _checkpoint_model,
    _ONNX.name: _onnx_model,
}


def warm_up(home: str) -> None:
    """Read a tiny checkpoint of every allow-listed architecture and a tiny ONNX graph once.

    For a sandbox that forks its workers from a warm parent: a child that dropped to another
    user may not read the interpreter's library, so every module these formats import lazily
    (transformers' model modules, huggingface_hub, onnx, onnxruntime) must be imported by the
    parent, and running the loaders is the one sure way. `home` is a writable scratch folder.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from freemark.formats.huggingface import ARCHITECTURES, pack
    from freemark.formats.onnx import OnnxModel
    from freemark.v1 import bundle_pb2

    transformers = __import__("transformers")
    tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 8, "vocab_size": 16, "max_position_embeddings": 8,
            "dim": 8, "n_layers": 1, "n_heads": 2, "hidden_dim": 8}
    triggers = TriggerSet(inputs=np.ones((1, 4), dtype=np.int64),
                          attention_mask=np.ones((1, 4), dtype=np.int64))
    folder = Path(home) / "warm-formats"
    for config_class, classes in ARCHITECTURES.values():
        for name in classes:
            model = getattr(transformers, name)(getattr(transformers, config_class)(**tiny))
            model.save_pretrained(folder)
            packed = pack(folder, folder / "packed.safetensors")
            layer = next(n for n, _ in model.named_modules() if n.endswith("layer.0"))
            sandboxed_activations({FORMAT_KEY: _HF.name, "model": str(packed), "weights": None,
                                   "layer": layer, "pooling": bundle_pb2.POOLING_TOKEN_MEAN},
                                  triggers)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(folder / "warm.onnx"))
    OnnxModel.open(folder / "warm.onnx", "act").capture(
        np.zeros((1, 2), dtype=np.float32), None, bundle_pb2.POOLING_NONE)
    OnnxModel.open(folder / "warm.onnx", "act").fingerprint()
    for path in sorted(folder.iterdir(), reverse=True):
        path.unlink()
    folder.rmdir()
