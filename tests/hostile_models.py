"""Builders for hostile model files, made fresh from a real `.pt2` in a test's tmp_path.

Each builder mirrors an attack on whoever loads the file: the pickle payloads run code when
unpickled (what `torch.export.load` does as a fallback), the `.so` entry is native code for
AOTInductor, the file-reading graph leaks any file the loader can read into the activations.
Nothing here is committed as a binary: tests build what they need, and the key server's
integration tests reuse the same builders. See tests/assets/README.md.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from freemark.formats.pt2 import load_program

SAMPLE_INPUTS_ENTRY = "data/sample_inputs/model.pt"
WEIGHTS_CONFIG_ENTRY = "data/weights/model_weights_config.json"
AOTINDUCTOR_ENTRY = "data/aotinductor/model/x.so"
GRAPH_ENTRY = "models/model.json"


class _CreateFile:
    """Unpickles into a call that creates `path`: the canary a test looks for."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def pickle_payload(canary: Path) -> bytes:
    """A `torch.save` file whose unpickling creates `canary` (harmless unless unpickled)."""
    buffer = io.BytesIO()
    torch.save((_CreateFile(canary),), buffer)
    return buffer.getvalue()


def rewrite_archive(
    src: Path, dst: Path, edit: Callable[[str, bytes], bytes], extra: dict[str, bytes] | None = None
) -> Path:
    """Copy the `.pt2` zip `src` to `dst`, passing every entry through `edit(name, data)`.

    Names given to `edit` and keys of `extra` are relative to the archive's top-level folder
    (torch prefixes every entry with one, named after the file it first saved to).
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename.removeprefix(prefix), zin.read(info)))
        for name, data in (extra or {}).items():
            zout.writestr(prefix + name, data)
    return dst


def pickled_sample_inputs(src: Path, dst: Path, canary: Path) -> Path:
    """`src` with its sample inputs replaced by a payload: what plain torch.export.load runs."""
    return rewrite_archive(
        src, dst, lambda name, data: pickle_payload(canary) if name == SAMPLE_INPUTS_ENTRY else data
    )


def pickled_weights(src: Path, dst: Path, canary: Path) -> Path:
    """`src` with every weight marked "use_pickle": true and stored as a payload."""
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/" + WEIGHTS_CONFIG_ENTRY))
        config = json.loads(archive.read(name))
    weight_files = {f"data/weights/{meta['path_name']}" for meta in config["config"].values()}
    for meta in config["config"].values():
        meta["use_pickle"] = True

    def edit(name: str, data: bytes) -> bytes:
        if name == WEIGHTS_CONFIG_ENTRY:
            return json.dumps(config).encode()
        return pickle_payload(canary) if name in weight_files else data

    return rewrite_archive(src, dst, edit)


def with_native_code(src: Path, dst: Path) -> Path:
    """`src` plus an AOTInductor shared-object entry (a loader that honours it runs native code)."""
    return rewrite_archive(
        src, dst, lambda _name, data: data, {AOTINDUCTOR_ENTRY: b"\x7fELF" + bytes(60)}
    )


def truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of `src`'s bytes: a torn upload."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def random_bytes(dst: Path, size: int = 4096, seed: int = 0) -> Path:
    """`size` seeded random bytes under a model's name."""
    dst.write_bytes(random.Random(seed).randbytes(size))
    return dst


def reading_file(src: Path, dst: Path, secret: Path, after: str) -> Path:
    """`src` whose graph adds `aten.from_file(secret)` to the output of node `after`.

    torch's deserializer and verifier accept this program; run unvetted it leaks the first
    bytes of `secret` into the activations of the layer that owns `after`. `secret` must hold
    at least as many float32 values as that node has units.
    """
    program = load_program(src)
    graph = program.graph
    target = next(node for node in graph.nodes if node.name == after)
    value = target.meta["val"]
    units = int(value.shape[-1])
    with graph.inserting_after(target):
        leak = graph.call_function(
            torch.ops.aten.from_file.default,
            (str(secret),),
            {"shared": False, "size": units, "dtype": torch.float32},
        )
    with graph.inserting_after(leak):
        mixed = graph.call_function(torch.ops.aten.add.Tensor, (target, leak))
    target.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    for node, val in ((leak, _fake_vector(value, units)), (mixed, value)):
        node.meta.update({k: v for k, v in target.meta.items() if k != "val"})  # same module
        node.meta["val"] = val
    program.graph_module.recompile()
    torch.export.save(program, str(dst))
    return dst


def oversized_graph(src: Path, dst: Path, nodes: int, *, deflate: bool = True) -> Path:
    """`src` whose graph JSON repeats its first node until it has `nodes` nodes.

    Deflated, a graph of many thousands of nodes fits in a few megabytes; deserializing it costs
    minutes of CPU and gigabytes, so a loader must count before it deserializes. The copies are
    never run (the file is refused first); each gets its own output name.
    """
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/" + GRAPH_ENTRY))
        program = json.loads(archive.read(name))
    graph = program["graph_module"]["graph"]
    real = [json.dumps(node) for node in graph["nodes"]]
    output = f'"{graph["nodes"][0]["outputs"][0]["as_tensor"]["name"]}"'
    copies = [real[0].replace(output, f"{output[:-1]}_copy{i}\"") for i in range(nodes - len(real))]
    graph["nodes"] = ["NODES"]
    data = json.dumps(program).replace('["NODES"]', "[" + ",".join(real + copies) + "]").encode()
    compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression, compresslevel=1) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename == name else zin.read(info))
    return dst


def branching_on_inputs(dst: Path) -> Path:
    """A digits CNN that runs a slow branch only when its inputs' mean passes 0.5 (`torch.cond`).

    Run on another owner's triggers in Register's prior-claim check, its time or a CPU-limit
    failure would tell the uploader one bit of those triggers per call (issue 11).
    """
    from freemark.formats.pt2 import save_program
    from freemark_lab.models import DigitsCNN

    class Branching(DigitsCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def slow(t: torch.Tensor) -> torch.Tensor:
                for _ in range(8):
                    t = torch.tanh(t @ t.transpose(-1, -2) @ t)
                return t

            flag = x.mean(dim=(0, 1, 2, 3)) > 0.5
            return super().forward(torch.cond(flag, slow, lambda t: t.clone(), (x,)))

    save_program(Branching(), (torch.zeros(2, 1, 8, 8),), dst, dynamic_batch=False)
    return dst


def _fake_vector(like: torch.Tensor, units: int) -> torch.Tensor:
    with like.fake_mode:  # type: ignore[attr-defined]
        return torch.empty(units, dtype=torch.float32)


# --- issue 18: models that read other owners' triggers out of a failure ----------------------

PACKED_PIXELS = 15  # pixels packed into one index, 17 levels each (0..16): base 17
PACKED_FIRST = 2  # the first packed pixel (flattened): the digits' outer pixels are mostly 0


def packed_indices(inputs: np.ndarray) -> list[int]:
    """The index `packing_gather` computes for each input: what its out-of-range error names."""

    flat = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1)
    levels = np.round(flat[:, PACKED_FIRST:PACKED_FIRST + PACKED_PIXELS] * 16).astype(np.int64)
    return [int(v) for v in (levels * 17 ** np.arange(PACKED_PIXELS, dtype=np.int64)).sum(1)]


def _chain(flat: torch.Tensor, rounds: int) -> torch.Tensor:
    """`rounds` of a 512-wide tanh layer over a (batch, 64) tensor: the expensive part."""
    wide = torch.tanh(flat @ torch.full((64, CHAIN_WIDTH), 0.01))
    for _ in range(rounds):
        wide = torch.tanh(wide @ torch.full((CHAIN_WIDTH, CHAIN_WIDTH), 0.001))
    return wide.sum(dim=1, keepdim=True)


CHAIN_WIDTH = 512


def _packing_module(state: dict[str, torch.Tensor] | None, onnx: bool, chain: int
                    ) -> torch.nn.Module:
    from freemark_lab.models import DigitsCNN

    class Packing(DigitsCNN):
        """Packs 15 input pixels into one index into a one-element table: any input with a
        non-zero packed pixel fails, and the error names the index, i.e. the pixels. With
        `chain`, the failure comes before an expensive chain (a fail-fast timing probe).
        No weight of its own: its weight names, its architecture family, are DigitsCNN's,
        so Register runs it on every earlier digits key."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            powers = torch.tensor([17 ** i for i in range(PACKED_PIXELS)], dtype=torch.int64)
            pixels = x.flatten(1)[:, PACKED_FIRST:PACKED_FIRST + PACKED_PIXELS]
            index = (torch.round(pixels * 16).to(torch.int64) * powers).sum(dim=1)
            table = torch.full((1, 1), 0.0)
            if onnx:  # Gather
                picked = torch.index_select(table, 0, index)
            else:  # aten.gather
                picked = torch.gather(table.expand(x.shape[0], 1), 1, index.unsqueeze(1))
            y = x + picked.reshape(-1, 1, 1, 1) * 0
            if chain:
                y = y + _chain(y.flatten(1), chain).reshape(-1, 1, 1, 1) * 0
            return super().forward(y)

    module = Packing()
    if state is not None:
        module.load_state_dict(state)
    return module.eval()


def packing_gather(dst: Path, state: dict[str, torch.Tensor] | None = None, *,
                   chain: int = 0) -> Path:
    """A `.pt2` digits CNN (with `state`'s weights) whose graph gathers at an index packed from
    15 input pixels: run on triggers, torch's out-of-range error names the index, and the
    pixels with it (issue 18: 87 of 87 pixels read back in 6 Verify calls)."""
    from freemark.formats.pt2 import save_program

    save_program(_packing_module(state, False, chain), (torch.zeros(2, 1, 8, 8),), dst)
    return dst


def packing_gather_onnx(dst: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The same trick as ONNX: a `Gather` whose indices are packed from the input pixels."""
    module = _packing_module(state, True, 0)
    torch.onnx.export(module, (torch.zeros(2, 1, 8, 8),), str(dst), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return dst


def nan_on_bright(dst: Path, threshold: float, *, chain: int = 0, seed: int = 0) -> Path:
    """A `.pt2` digits CNN whose output is NaN for any input with a pixel above `threshold`
    (a square root of a negative number), then `chain` rounds of a wide tanh layer: a
    failure (non-finite activations) that depends on the input's values and that vetting
    admits, placed before an expensive chain, as a fail-fast probe would be. No weight of
    its own (DigitsCNN's family); `seed` picks its random DigitsCNN weights."""
    from freemark.formats.pt2 import save_program
    from freemark_lab.models import DigitsCNN

    class NanOnBright(DigitsCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = torch.sqrt(x.amax(dim=(1, 2, 3), keepdim=True) * -1.0 + threshold)
            y = x + bright * 0
            if chain:
                y = y + _chain(y.flatten(1), chain).reshape(-1, 1, 1, 1) * 0
            return super().forward(y)

    torch.manual_seed(seed)
    save_program(NanOnBright().eval(), (torch.zeros(2, 1, 8, 8),), dst)
    return dst


def renamed_with_decoy(src: Path, dst: Path, *, layer: str, under: str
                       ) -> tuple[Path, dict[str, str]]:
    """A thief's ONNX file (issue 18, item 3): the export `src` with every node and tensor
    renamed, so nothing is named after the key layer any more, and one more graph output, a
    ReLU node named like `layer`'s module (`/act/Relu`) over the tensor `under`, so a reader
    that trusts node names reads the decoy. Returns the file and each new tensor name's
    original."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    renamed: dict[str, str] = {}
    for number, node in enumerate(graph.node):
        node.name = f"node{number}"
        for position, name in enumerate(node.output):
            if name:
                renamed[name] = node.output[position] = f"t{len(renamed)}"
    for node in graph.node:
        for position, name in enumerate(node.input):
            node.input[position] = renamed.get(name, name)
    for output in graph.output:
        output.name = renamed.get(output.name, output.name)
    del graph.value_info[:]
    scope = "/" + layer.replace(".", "/")
    graph.node.append(helper.make_node("Relu", [renamed[under]], ["decoy"], name=f"{scope}/Relu"))
    graph.output.append(helper.make_tensor_value_info("decoy", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
    return dst, {new: old for old, new in renamed.items()}
