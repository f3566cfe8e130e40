"""Model files: safe loading of untrusted `.pt2` programs and `.safetensors` weights, and fingerprints.

`torch.export.load` is not safe on untrusted files: for the sample inputs it falls back to
`torch.load(weights_only=False)` (arbitrary code), and pickled weights, custom objects and
AOTInductor packages all unpickle or load native code. `load_program` reads the archive
itself, refuses every entry that would need any of those, loads sample inputs with
`weights_only=True` only, and hands torch's deserializer nothing it could unpickle.

Deserializing is the expensive step (torch rebuilds every node with fake tensors and symbolic
shapes: about 1 ms of CPU a node, so the 20,000-node cap bounds it near 20 s; measured with
`tests/hostile_models.oversized_graph`), so the archive is measured first from
its zip directory, before anything is inflated: every member stored or deflated, at most
`MAX_COMPRESSION_RATIO` : 1, at most `MAX_UNPACKED_BYTES` in all, the graph's JSON at most
`MAX_GRAPH_JSON_BYTES` (read through a bounded inflate, so a lying header cannot make it
longer), and at most `MAX_GRAPH_NODES` nodes in that JSON, counted before the deserializer
sees it.
The regression asset for the fallback lives in tests/unit/client/formats/test_pt2.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freemark.errors import ModelFileError

_ARCHIVE_FORMAT = "pt2"
_ARCHIVE_VERSION = "0"
_MODEL_NAME = "model"
# Caps on an untrusted archive, checked before anything is inflated or deserialized (module doc).
# The largest model the allow-list was derived from has about 1,000 nodes (MiniLM: 302); a
# node takes 1-2 kB of JSON; torch writes members stored (ratio 1).
MAX_GRAPH_NODES = 20_000
MAX_GRAPH_JSON_BYTES = 64 * 1024**2
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_COMPRESSION_RATIO = 100
_GRAPH_ENTRY = f"models/{_MODEL_NAME}.json"
_ALLOWED_PREFIXES = (
    "archive_format", "archive_version", "byteorder", ".data/", "models/model.json",
    "data/weights/", "data/constants/", "data/sample_inputs/model.pt", "extra/",
)


_refuse = ModelFileError.refused  # the one wording (freemark.errors)


def _check_payload_config(path: str | Path, config: dict[str, Any], kind: str) -> None:
    """Refuse pickled tensors and custom/opaque objects: loading them unpickles."""
    for name, meta in config.get("config", {}).items():
        if meta.get("use_pickle"):
            raise _refuse(path, f"{kind} {name!r} is stored pickled; only raw tensors are accepted")
        if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise _refuse(path, f"{kind} {name!r} is a custom object; only tensors are accepted")


def _measure_archive(path: str | Path) -> tuple[dict[str, Any], set[str]]:
    """The program's graph as parsed JSON and the archive's entry names (less torch's top-level
    folder), once the archive's sizes and node count are in bounds.

    Reads only the zip directory and the graph entry (through a bounded inflate); raises
    ModelFileError before torch's reader or deserializer touches a file over the caps.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = [m.filename for m in members]
            if len(set(names)) != len(names):
                raise _refuse(path, "the archive names one entry twice")
            unpacked = 0
            for member in members:
                if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise _refuse(path, f"entry {member.filename!r} uses an unsupported compression")
                if member.file_size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1):
                    raise _refuse(path, f"entry {member.filename!r} inflates more than "
                                        f"{MAX_COMPRESSION_RATIO}:1")
                unpacked += member.file_size
            if unpacked > MAX_UNPACKED_BYTES:
                raise _refuse(path, f"it unpacks to {unpacked} bytes, more than {MAX_UNPACKED_BYTES}")
            graph = [m for m in members if m.filename.split("/", 1)[-1] == _GRAPH_ENTRY]
            if len(graph) != 1:
                raise _refuse(path, "expected exactly one program named 'model'")
            with archive.open(graph[0]) as entry:
                raw = entry.read(MAX_GRAPH_JSON_BYTES + 1)
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ModelFileError(f"{path}: not a torch.export .pt2 program ({_first_line(exc)})") from exc
    if len(raw) > MAX_GRAPH_JSON_BYTES:
        raise _refuse(path, f"its graph is larger than {MAX_GRAPH_JSON_BYTES} bytes")
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, f"its graph is not JSON ({_first_line(exc)})") from exc
    nodes = _count_nodes(parsed)
    if nodes > MAX_GRAPH_NODES:
        raise _refuse(path, f"its graph has {nodes} nodes, more than {MAX_GRAPH_NODES}")
    return parsed, {name.split("/", 1)[-1] for name in names}


def _count_nodes(value: Any) -> int:
    """Nodes of every graph in a serialized program (subgraphs included), without recursion."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            nodes = item.get("nodes")
            if isinstance(nodes, list):
                count += len(nodes)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _open_archive(path: str | Path) -> Any:
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        return PT2ArchiveReader(str(path))
    except (RuntimeError, AssertionError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a torch.export .pt2 program ({str(exc).splitlines()[0]})") from exc


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load a `.pt2` written by `torch.export.save`, without unpickling anything.

    Raises ModelFileError for a file that is not a program, or that needs pickle,
    custom objects or compiled code to load.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import _package as package

    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such model file")
    graph, measured = _measure_archive(path)
    reader = _open_archive(path)
    try:
        names = reader.get_file_names()
        if set(names) != measured:  # torch's zip reader must see the archive we measured
            raise _refuse(path, "its zip directory reads differently to torch")
        if reader.read_string("archive_version") != _ARCHIVE_VERSION:
            raise _refuse(path, "unsupported .pt2 archive version")
        for name in names:
            if name.startswith("data/aotinductor/"):
                raise _refuse(path, "it contains AOTInductor compiled code; export without compiling")
            if not name.startswith(_ALLOWED_PREFIXES):
                raise _refuse(path, f"unexpected archive entry {name!r}")
        if names.count(_GRAPH_ENTRY) != 1 or any(
            n.startswith("models/") and n != _GRAPH_ENTRY for n in names
        ):
            raise _refuse(path, "expected exactly one program named 'model'")
        for config_name, kind in (
            (f"data/weights/{_MODEL_NAME}_weights_config.json", "weight"),
            (f"data/constants/{_MODEL_NAME}_constants_config.json", "constant"),
        ):
            if config_name not in names:
                raise _refuse(path, f"missing {config_name} (legacy pickled format?)")
            _check_payload_config(path, json.loads(reader.read_string(config_name)), kind)
        sample_inputs = _load_sample_inputs(path, reader, names)
        program = _dict_to_dataclass(schema.ExportedProgram, graph)
        state_dict = package._load_state_dict(reader, _MODEL_NAME)
        constants = package._load_constants(reader, _MODEL_NAME)
        return ExportedProgramDeserializer().deserialize(
            program, state_dict, constants, sample_inputs  # type: ignore[arg-type]
        )
    except ModelFileError:
        raise
    except Exception as exc:  # torch raises many types on malformed archives
        raise ModelFileError(
            f"{path}: not a loadable torch.export program ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from exc


def _load_sample_inputs(path: str | Path, reader: Any, names: list[str]) -> tuple[Any, ...] | dict[str, Any]:
    entry = f"data/sample_inputs/{_MODEL_NAME}.pt"
    if entry not in names:
        return {}
    raw = reader.read_bytes(entry)
    if not raw:
        return {}
    try:
        loaded = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise _refuse(path, "its sample inputs need unpickling arbitrary objects") from exc
    if not isinstance(loaded, (tuple, dict)):
        raise _refuse(path, "its sample inputs are not a tuple")
    return loaded


def is_format(path: Path) -> bool:
    """Whether `path` names a program (the table's detection hook): by its suffix."""
    return path.suffix.lower() == ".pt2" and not path.is_dir()


def load(path: str | Path, *, weights: str | Path | None = None) -> torch.export.ExportedProgram | nn.Module:
    """A program loaded safely in this process; `weights` (`.safetensors`) replace its own."""
    program = load_program(path)
    return apply_weights(program, weights) if weights else program


def save_program(model: nn.Module, example_inputs: tuple[Any, ...], path: str | Path, *,
                 dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """Export `model` (eval mode) with a dynamic batch dimension and save it as `.pt2`."""
    was_training = model.training
    model.eval()
    try:
        shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=65536)
            shapes = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in example_inputs)
        program = torch.export.export(model, example_inputs, dynamic_shapes=shapes)
    finally:
        model.train(was_training)
    torch.export.save(program, str(path))
    return program


def state_dict_of(model: nn.Module | torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, under the same names for a module and its program.

    A tensor tied under two names (a language model's output projection and its input
    embedding) is one weight: it is kept once, under the first name, as save_pretrained
    stores it, so it is checked, fingerprinted and compared once."""
    if isinstance(model, torch.export.ExportedProgram):
        return dict(model.state_dict)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


def fingerprint(model: nn.Module | torch.export.ExportedProgram) -> bytes:
    """SHA-256 over the canonical weights: sorted names, dtype, shape and little-endian bytes.

    Equal for a module, its exported program and a reloaded copy; any changed weight changes it.
    """
    digest = hashlib.sha256(b"freemark/v1/weights")
    for name, tensor in sorted(state_dict_of(model).items()):
        data = tensor.detach().to("cpu").contiguous()
        header = json.dumps([name, str(data.dtype), list(data.shape)]).encode()
        digest.update(len(header).to_bytes(4, "big") + header)
        raw = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
        digest.update(raw.numpy().data)  # hashed where it lies: no copy of the weights
    return digest.digest()


def apply_weights(program: torch.export.ExportedProgram, path: str | Path) -> nn.Module:
    """The program's architecture with weights from a `.safetensors` file (names must match)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable .safetensors file ({exc})") from exc
    module = torch.export.unflatten(program)
    expected = state_dict_of(program)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"{path}: weights do not fit the registered architecture "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    module.load_state_dict(weights, strict=False)
    return module


def shape_digest(model: nn.Module | torch.export.ExportedProgram) -> bytes:
    """SHA-256 over the sorted weight names and shapes: one architecture exactly (a
    quarter-width variant of a network has the same names, another digest). What an output
    key's panel counts architectures by; `architecture_digest` is the coarser family."""
    shapes = [[name, list(tensor.shape)] for name, tensor in sorted(state_dict_of(model).items())]
    return hashlib.sha256(b"freemark/v1/architecture" + json.dumps(shapes).encode()).digest()


def architecture_digest(model: nn.Module | torch.export.ExportedProgram) -> bytes:
    """SHA-256 over the sorted names of every weight: equal for one architecture family.

    The TTP uses it to find earlier registrations a new host could be a copy of. Shapes
    and dtypes are left out on purpose: a copy padded with dummy units, pruned to fewer,
    or stored in fp16 has other shapes or dtypes but the same weight names, and must
    still be compared with the registration it was copied from.
    """
    names = sorted(state_dict_of(model))
    return hashlib.sha256(b"freemark/v1/architecture-family" + json.dumps(names).encode()).digest()
