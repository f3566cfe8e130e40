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
  registered; and the options of an upload read into it (`into_host_options`: bare weights
  into either, a GGUF only into a checkpoint);
- the child's dispatch (`handles`, `sandboxed_model`, by the row's `name`) to the
  `open_untrusted` of the format's own module (rows with `sandbox_reader`: today
  `freemark.formats.huggingface`, `freemark.formats.lora` (an adapter and its base, merged
  here, in the child), `freemark.formats.onnx` and `freemark.formats.gguf`, with their
  allow-listed architectures, adapter configs, operators or tensor types, caps before anything is built, nothing unpickled), and their
  `warm_up` in the fork server.

The server never opens an upload itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from freemark.formats.onnx import MAX_TENSOR_NAME
from freemark.formats.table import FORMATS, ModelFormat, by_name, by_wire
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.sandbox.protocol import FINGERPRINT_KEY

FORMAT_KEY = "format"
TENSOR_KEY = "onnx_tensor"
PARAMETERS_KEY = "max_parameters"  # the operator's cap (`SandboxLimits.max_parameters`)
_ZIP_MAGIC = b"PK\x03\x04"
_HF = by_name("hf")
_ONNX = by_name("onnx")
_GGUF = by_name("gguf")
# Uploads read into the registered host (its stored file is the run's model): bare weights
# and GGUF suspects.
INTO_HOST = (by_name("safetensors").wire, _GGUF.wire)
__all__ = ["FORMAT_KEY", "INTO_HOST", "MAX_TENSOR_NAME", "PARAMETERS_KEY", "TENSOR_KEY",
           "handles", "into_host_options", "sandbox_options", "sandboxed_activations",
           "sandboxed_model", "sandboxed_reader", "stored_host_options", "warm_up"]


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


def into_host_options(upload_format: int, host: Path) -> dict[str, str] | None:
    """The sandbox options of an upload read into the stored `host` (the run's model, the
    upload its `weights`): bare `.safetensors` weights go into the host's own loader, a GGUF
    into its reader, which needs a Hugging Face checkpoint host (None for any other host)."""
    options = stored_host_options(host)
    if upload_format != _GGUF.wire:
        return options
    return {FORMAT_KEY: _GGUF.name} if options.get(FORMAT_KEY) == _HF.name else None


def handles(header: dict[str, Any]) -> bool:
    """Whether a worker request is for a format this module reads (not a `.pt2` program)."""
    return header.get(FORMAT_KEY) in _READERS


def sandboxed_model(header: dict[str, Any]) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """Inside the sandbox: open an upload of a format with its own reader for one set (its
    layer; a scan, ``layer`` None, reads every tensor's: `protocol.TriggerRun`), and return
    its identity (fingerprint ‖ architecture digest) and its run, a function from the set's
    triggers to the activation matrix (a scan: the list of them). Reading touches no
    trigger, so its failures are the file's; the run's are the run's (`worker`)."""
    return _READERS[header[FORMAT_KEY]].opener().open_untrusted(
        header["model"], weights=header.get("weights"), layer=header["layer"],
        pooling=header["pooling"], tensor=header.get(TENSOR_KEY),
        width=int(header.get("width", 0)), **_cap(header))


def sandboxed_reader(header: dict[str, Any]
                     ) -> tuple[bytes, Callable[[dict[str, Any]], Callable[[TriggerSet], Any]]]:
    """Inside the sandbox: open an upload of a format with its own reader once for a whole
    conversation, and return its identity and, per set spec, that set's run
    (`sandboxed_model`'s, with the spec's layer).

    A module-backed reader (`load_untrusted`: checkpoints, adapters, GGUF) builds the model
    once and fingerprints it once, and every set reads its layer from that one module, as a
    `.pt2` program is loaded once for every set: a Register of a 1.1 B-parameter decoder
    otherwise built and fingerprinted it three times (its identity, its triggers, its claim
    signature), a third of the child's time; and, as for a program, the request's
    `SKIP_FINGERPRINT` (a Verify, which does not use it) leaves the weights unhashed. ONNX,
    whose reader builds a session for the tensors it reads, opens per set."""
    opener = _READERS[header[FORMAT_KEY]].opener()
    if not hasattr(opener, "load_untrusted"):
        identity, _ = sandboxed_model({**header, **header["sets"][0]})
        return identity, lambda spec: sandboxed_model({**header, **spec})[1]
    from freemark.formats.huggingface import layer_run, model_identity

    model = opener.load_untrusted(header["model"], weights=header.get("weights"),
                                  **_cap(header))
    hashed = bool(header.get(FINGERPRINT_KEY, True))  # Verify's SKIP_FINGERPRINT: not needed
    return model_identity(model, weights=hashed), lambda spec: layer_run(
        model, spec["layer"], spec["pooling"], int(spec.get("width", 0)))


def _cap(header: dict[str, Any]) -> dict[str, int]:
    """The parameter cap the parent sent (every run carries it; absent: the reader's default)."""
    return {} if PARAMETERS_KEY not in header else {PARAMETERS_KEY: int(header[PARAMETERS_KEY])}


def sandboxed_activations(header: dict[str, Any], triggers: TriggerSet) -> tuple[Any, bytes]:
    """`sandboxed_model` and its run on `triggers`: (activations, identity)."""
    identity, run = sandboxed_model(header)
    return run(triggers), identity


# The formats the child reads through their own module, by the table row's `name`; any other
# is a `.pt2` program (`worker._load`).
_READERS: dict[str, ModelFormat] = {row.name: row for row in FORMATS if row.sandbox_reader}


def warm_up(home: str) -> None:
    """Run every sandbox reader's warm-up once (`warm_up` of each table row's module).

    For a sandbox that forks its workers from a warm parent: a child that dropped to another
    user may not read the interpreter's library, so every module these formats import lazily
    (transformers' model modules, huggingface_hub, onnx, onnxruntime) must be imported by the
    parent, and running the loaders is the one sure way. `home` is a writable scratch folder.
    """
    folder = Path(home) / "warm-formats"
    folder.mkdir()
    for row in _READERS.values():
        row.opener().warm_up(folder)
    folder.rmdir()
