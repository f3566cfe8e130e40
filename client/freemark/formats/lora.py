"""LoRA adapters as suspects: a PEFT adapter directory plus its base checkpoint, vetted like a
model, packed into one file, and merged into the base where the model is built.

A thief who fine-tunes a protected checkpoint with LoRA ships either the merged weights (a
checkpoint like any other: `freemark.formats.huggingface`) or the adapter alone, the
directory `PeftModel.save_pretrained` writes: `adapter_config.json` beside
`adapter_model.safetensors`, whose tensors are named after the base's modules
(`base_model.model.<module>.lora_A.weight`, `... .lora_B.weight`, and the whole of each
`modules_to_save` module). The model in use is the base with the adapter merged, so that is
what is judged.

The adapter config is vetted before anything is built (`check_adapter_config`): `peft_type`
LORA, an allow-listed `task_type`, `r` and `lora_alpha` capped, `target_modules` a list of
names each of which names at least one linear module of the base (a string, which peft reads
as a regular expression, is refused), `use_rslora` and GPT-2's `fan_in_fan_out` handled,
`modules_to_save` handled, and every other feature (DoRA, layer replication, rank and alpha
patterns, bias training, trainable tokens, initialisations that change the base such as
PiSSA or LoftQ, ...) refused unless it is off. The config's `base_model_name_or_path`,
`revision` and `auto_mapping` (which base class, from which module) are never followed:
freemark merges into the base the caller gives. On the owner's machine they are dropped when
the directory is read (never followed, never sent); in an upload they are refused.

On the wire an adapter and its base are one packed `.safetensors` file: the base's tensors
under their own names, the adapter's under `ADAPTER_PREFIX` followed by PEFT's name, and one
metadata entry, `METADATA_KEY`, whose JSON value holds the base's `config.json` (`config`)
and the vetted adapter config (`adapter_config`). Its tensors must be exactly those the two
configs imply. The merge, one formula for every target, in float32 then cast to the weight's
dtype as peft does: W += s · B·A (transposed for a GPT-2 `Conv1D`, whose weight is stored
(in, out)), s = lora_alpha / r, or lora_alpha / √r with `use_rslora`; each `modules_to_save`
module's tensors replace the base's. The merge is written here rather than taken from peft
because peft's loading path reads the adapter's files and may follow
`base_model_name_or_path` to the hub, and its config parser keeps going past keys it does
not know; its result is the same (tests compare it with peft's `merge_and_unload`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats import huggingface as hf
from freemark.formats.packing import Packed
from freemark.scheme.triggers import TriggerSet

__all__ = ["ADAPTER_PREFIX", "METADATA_KEY", "Adapter", "check_adapter_config", "is_format",
           "load_pair", "load_untrusted", "merge", "open_untrusted", "pack", "packed_pair", "packing",
           "read_adapter_config"]

METADATA_KEY = "freemark.hf_lora"
ADAPTER_PREFIX = "freemark.lora/"  # never a prefix of a module's tensor name (no '/' there)
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_ADAPTER = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names

MAX_RANK = 1024
MAX_ALPHA = 65536.0
MAX_NAMES = 256  # entries of target_modules or modules_to_save
MAX_NAME_CHARS = 256
MAX_METADATA_BYTES = 2 * hf.MAX_CONFIG_BYTES
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
TASK_TYPES = (None, "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM")
INIT_WEIGHTS = (True, False, "gaussian")  # the initialisations that leave the base as it is
# Where an adapter says its base lives (a path, a hub id or a URL, a revision) or which code
# builds it (auto_mapping: a class and the module peft's AutoPeftModel would import). Never
# followed.
LOCATION_KEYS = ("auto_mapping", "base_model_name_or_path", "revision")
# Keys read and checked below; every other key must be off (None, False, "", [] or {}).
_HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "use_rslora",
            "fan_in_fan_out", "modules_to_save", "bias", "init_lora_weights", "lora_dropout",
            "inference_mode", "peft_version", "megatron_core", "qalora_group_size",
            "ensure_weight_tying"}
# What a person needs to hear about the features most often switched on.
_FEATURES = {
    "use_dora": "DoRA (use_dora) rescales each weight's columns; merge it with "
                "merge_and_unload() and send the merged checkpoint",
    "layer_replication": "layer replication changes the base's architecture",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "trained LoRA biases (lora_bias) are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "layers_to_transform": "layers_to_transform is not supported; list the modules",
    "exclude_modules": "exclude_modules is not supported; list the modules",
}
_OFF: tuple[Any, ...] = (None, False, "", [], {})


_refuse = ModelFileError.refused  # the one wording (freemark.errors)


@dataclass(frozen=True)
class Adapter:
    """A vetted adapter config resolved against its base: what to merge and which tensors
    (PEFT's names) with which shapes the adapter must hold, no more and no fewer."""

    scale: float
    targets: tuple[str, ...]  # module paths of the base that receive W += scale · B·A
    transposed: frozenset[str]  # the targets stored (in, out): GPT-2's Conv1D
    replaced: tuple[str, ...]  # modules_to_save: module paths whose tensors are replaced
    expected: Mapping[str, tuple[int, ...]]


def _conv1d() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    conv1d: type[nn.Module] = Conv1D
    return conv1d


def _names(values: Mapping[str, Any], key: str, source: str | Path) -> list[str]:
    value = values.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        raise _refuse(source, f"{key} is a string, which peft reads as a regular expression; "
                      "freemark needs the list of module names (peft saves one when it was "
                      "given a list or 'all-linear')")
    if (not isinstance(value, list) or len(value) > MAX_NAMES
            or not all(isinstance(n, str) and len(n) <= MAX_NAME_CHARS and NAME.fullmatch(n)
                       for n in value)):
        raise _refuse(source, f"{key} must be a list of at most {MAX_NAMES} module names "
                      "(letters, digits, '_' and '.')")
    return sorted(set(value))


def _number(values: Mapping[str, Any], key: str, source: str | Path, cap: float) -> float:
    value = values.get(key)
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not 0 < value <= cap):
        raise _refuse(source, f"{key} must be a number in (0, {cap:g}], got {value!r}")
    return float(value)


def _check_plain_keys(values: Mapping[str, Any], source: str | Path) -> None:
    """Everything but the merge's own parameters: a plain LoRA and nothing else."""
    for key in LOCATION_KEYS:
        if values.get(key) is not None:
            raise _refuse(source, f"the adapter config names where its base lives or which code "
                          f"builds it ({key}); freemark never follows it: the base is the "
                          "checkpoint sent with it")
    if values.get("peft_type") != "LORA":
        raise _refuse(source, f"peft_type {values.get('peft_type')!r} is not supported; only "
                      "LORA adapters are")
    if values.get("task_type") not in TASK_TYPES:
        raise _refuse(source, f"task_type {values.get('task_type')!r} is not supported; one of "
                      f"{', '.join(str(t) for t in TASK_TYPES)}")
    if values.get("bias", "none") != "none":
        raise _refuse(source, f"bias {values.get('bias')!r}: adapters that train biases are not "
                      "supported (bias must be 'none')")
    if values.get("init_lora_weights", True) not in INIT_WEIGHTS:
        raise _refuse(source, f"init_lora_weights {values.get('init_lora_weights')!r} changes the "
                      "base weights (PiSSA, OLoRA, LoftQ, ...); convert the adapter to a plain "
                      "LoRA with save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    if values.get("megatron_core", "megatron.core") not in (None, "megatron.core"):
        raise _refuse(source, "megatron_core names a module to import; it must be unset")
    for key in ("use_rslora", "fan_in_fan_out", "inference_mode", "ensure_weight_tying"):
        if not isinstance(values.get(key, False), bool):
            raise _refuse(source, f"{key} must be true or false")
    dropout = values.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise _refuse(source, "lora_dropout must be a number in [0, 1]")
    for key in ("peft_version",):
        if not isinstance(values.get(key, ""), str) or len(values.get(key, "")) > 64:
            raise _refuse(source, f"{key} must be a short string")
    for key, value in sorted(values.items()):
        if key in _HANDLED or key in LOCATION_KEYS or any(value == off and type(value) is type(off)
                                                          for off in _OFF):
            continue
        raise _refuse(source, _FEATURES.get(key, f"adapter config key {key!r} is set "
                                            f"({str(value)[:40]!r}) and freemark does not "
                                            "know what it does; only plain LoRA is supported"))


def _matches(names: list[str], key: str, *, exact_suffix: bool) -> bool:
    """peft's matching rules: a target name is a module's whole path or its last parts after a
    '.'; a modules_to_save name is any suffix of the path (`exact_suffix` False)."""
    if exact_suffix:
        return any(key == n or key.endswith("." + n) for n in names)
    return any(key.endswith(n) for n in names)


def check_adapter_config(values: Any, model: nn.Module, source: str | Path) -> Adapter:
    """The merge an adapter config (parsed `adapter_config.json`) asks of `model` (its base,
    built from the base's checked config), or ModelFileError, before any tensor is read."""
    if not isinstance(values, dict):
        raise _refuse(source, f"{ADAPTER_CONFIG_NAME} is not a JSON object")
    _check_plain_keys(values, source)
    rank = _number(values, "r", source, MAX_RANK)
    if rank != int(rank):
        raise _refuse(source, f"r must be an integer, got {values['r']!r}")
    alpha = _number(values, "lora_alpha", source, MAX_ALPHA)
    scale = alpha / math.sqrt(rank) if values.get("use_rslora") else alpha / rank
    targets, saved = _names(values, "target_modules", source), _names(values, "modules_to_save",
                                                                      source)
    if not targets:
        raise _refuse(source, "target_modules names no module")
    modules = dict(model.named_modules())
    found: dict[str, list[str]] = {t: [] for t in targets}
    replaced = [key for key in modules if key and _matches(saved, key, exact_suffix=False)]
    for outer in replaced:
        if any(other.startswith(outer + ".") for other in replaced):
            raise _refuse(source, f"modules_to_save matches {outer!r} and modules inside it")
    for key in replaced:
        inside = {id(p) for p in modules[key].parameters()}
        if any(id(p) in inside for name, p in model.named_parameters(remove_duplicate=False)
               if not name.startswith(key + ".")):
            raise _refuse(source, f"modules_to_save names {key}, whose weight is tied to another "
                          "module's; peft unties it and freemark does not: merge the adapter "
                          "with merge_and_unload() and send the merged checkpoint")
    expected: dict[str, tuple[int, ...]] = {}
    for key in replaced:
        for name, tensor in modules[key].state_dict().items():
            expected[f"{PEFT_PREFIX}{key}.{name}"] = tuple(tensor.shape)
    chosen, transposed = [], set()
    conv1d = _conv1d()
    for key, module in modules.items():
        if not key or not _matches(targets, key, exact_suffix=True):
            continue
        if key in replaced or any(key.startswith(r + ".") for r in replaced):
            continue  # peft leaves the modules it saves whole out of the LoRA targets
        for t in targets:
            if key == t or key.endswith("." + t):
                found[t].append(key)
        if isinstance(module, nn.Linear):
            n_out, n_in = module.weight.shape
        elif isinstance(module, conv1d):
            # GPT-2's Conv1D stores its weight (in, out): peft's fan_in_fan_out
            n_in, n_out = tuple(module.state_dict()["weight"].shape)
            transposed.add(key)
        else:
            raise _refuse(source, f"target module {key} is a {type(module).__name__}; freemark "
                          "merges LoRA into linear layers only")
        if rank > min(n_in, n_out):
            raise _refuse(source, f"r={int(rank)} is over {key}'s smaller side "
                          f"({min(n_in, n_out)}): that is no low-rank adapter")
        expected[f"{PEFT_PREFIX}{key}.lora_A.weight"] = (int(rank), int(n_in))
        expected[f"{PEFT_PREFIX}{key}.lora_B.weight"] = (int(n_out), int(rank))
        chosen.append(key)
    absent = [t for t, keys in found.items() if not keys]
    if absent:
        raise _refuse(source, f"target_modules {absent[:5]} name no module of the base model")
    return Adapter(scale=scale, targets=tuple(chosen), transposed=frozenset(transposed),
                   replaced=tuple(replaced), expected=expected)


def merge(model: nn.Module, adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Merge an adapter's tensors (PEFT's names, checked against `adapter.expected`) into
    `model` in place: modules_to_save replace the base's tensors, then W += s · B·A."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in adapter.replaced:
            prefix = f"{PEFT_PREFIX}{key}."
            modules[key].load_state_dict({name[len(prefix):]: value for name, value
                                          in tensors.items() if name.startswith(prefix)},
                                         strict=True)
        for key in adapter.targets:
            weight = modules[key].weight
            a = tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"].to(torch.float32)
            b = tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"].to(torch.float32)
            delta = adapter.scale * (b @ a)
            if key in adapter.transposed:
                delta = delta.T
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))
    return model.eval()


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """An adapter directory's `adapter_config.json`, parsed (size-capped), with the keys that
    say where its base lives dropped unread: the base is the checkpoint given with it."""
    values = hf.read_json_object(Path(directory) / ADAPTER_CONFIG_NAME, directory)
    return {key: value for key, value in values.items() if key not in LOCATION_KEYS}


def _adapter_weights(directory: Path) -> Path:
    path = directory / ADAPTER_WEIGHTS_NAME
    if path.is_file():
        return path
    if (directory / PICKLED_ADAPTER).exists():
        raise _refuse(directory, f"{PICKLED_ADAPTER} is a pickle, and freemark never unpickles; "
                      "re-save the adapter with save_pretrained (safetensors is the default)")
    raise _refuse(directory, f"no {ADAPTER_WEIGHTS_NAME}")


def _base(values: Any, source: str | Path, max_parameters: int = hf.MAX_PARAMETERS
          ) -> nn.Module:
    """The base's architecture from its config, checked, parameters not yet in place."""
    return hf.build_model(hf.check_config(values, source, max_parameters=max_parameters))


def load_pair(base: str | Path, adapter: str | Path) -> nn.Module:
    """A base checkpoint directory with an adapter directory merged into it, in this process
    (the owner's own files), after the same checks the key server runs."""
    base, adapter = Path(base), Path(adapter)
    if not hf.is_checkpoint_dir(base):
        raise InvalidInputError(f"{base}: the base of an adapter must be a checkpoint directory "
                                "(config.json and model.safetensors)")
    model = _base(hf.read_config(base), base)
    hf.check_tensor_files(hf.shards(base), hf.expected_shapes(model), base)
    plan = check_adapter_config(read_adapter_config(adapter), model, adapter)
    weights = _adapter_weights(adapter)
    hf.check_tensor_files([weights], plan.expected, adapter)
    hf.assign_weights(model, hf.read_tensors(hf.shards(base)), base)
    return merge(model, plan, hf.read_tensors([weights]))


def packing(base: str | Path, adapter: str | Path) -> Packed:
    """A base checkpoint directory and an adapter directory as the one packed `.safetensors`
    that stands for them on the wire, its bytes produced as they are read
    (`formats.packing`); fully checked first, so what is uploaded is what the server accepts."""
    base, adapter = Path(base), Path(adapter)
    if not hf.is_checkpoint_dir(base):
        raise InvalidInputError(f"{base}: the base of an adapter must be a checkpoint directory")
    config, adapter_config = hf.read_config(base), read_adapter_config(adapter)
    model = _base(config, base)
    shards = hf.shards(base)
    hf.check_tensor_files(shards, hf.expected_shapes(model), base)
    plan = check_adapter_config(adapter_config, model, adapter)
    weights = _adapter_weights(adapter)
    hf.check_tensor_files([weights], plan.expected, adapter)
    tensors = hf.read_tensors(shards)
    tensors.update({ADAPTER_PREFIX + name: t for name, t in hf.read_tensors([weights]).items()})
    # One metadata entry, as huggingface.packing has: with two, safetensors' writer orders
    # them by a hash map, so the header's bytes (and the SHA-256 verdicts sign) would vary.
    text = json.dumps({"adapter_config": adapter_config, "config": config}, sort_keys=True)
    return Packed(tensors, {METADATA_KEY: text})


def pack(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write a base checkpoint directory and an adapter directory as one packed `.safetensors`
    file (mode 0600): `packing`'s bytes."""
    return packing(base, adapter).write(Path(out))


@contextlib.contextmanager
def packed_pair(base: str | Path, adapter: str | Path) -> Iterator[Path]:
    """The one file that stands for a base and its adapter on the wire: a private temporary
    packed `.safetensors`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="freemark-lora-") as folder:
        yield pack(base, adapter, Path(folder) / f"{Path(adapter).resolve().name}.safetensors")


def _packed_configs(path: Path) -> tuple[Any, Any]:
    values = hf.metadata_json(
        path, METADATA_KEY, MAX_METADATA_BYTES, "the packed configs are",
        missing=f"no {METADATA_KEY!r} metadata entry: not a packed adapter and base")
    if not isinstance(values, dict) or set(values) != {"config", "adapter_config"}:
        raise _refuse(path, "the packed configs must be an object with 'config' and "
                      "'adapter_config'")
    return values["config"], values["adapter_config"]


def load_packed(path: str | Path, *, max_parameters: int = hf.MAX_PARAMETERS) -> nn.Module:
    """A packed adapter and base as one merged module: both configs vetted and the file's
    tensors checked against them (headers only) before a weight is read."""
    path = Path(path)
    config, adapter_config = _packed_configs(path)
    model = _base(config, path, max_parameters)
    plan = check_adapter_config(adapter_config, model, path)
    hf.check_tensor_files([path], {**hf.expected_shapes(model),
                                   **{ADAPTER_PREFIX + k: v for k, v in plan.expected.items()}},
                          path)
    tensors = hf.read_tensors([path])
    adapter = {name[len(ADAPTER_PREFIX):]: tensors.pop(name) for name in list(tensors)
               if name.startswith(ADAPTER_PREFIX)}
    hf.assign_weights(model, tensors, path)
    return merge(model, plan, adapter)


def is_format(path: Path) -> bool:
    """Whether `path` is a packed adapter and base, or an adapter directory (the table's
    detection hook: an adapter directory alone is recognised to say what it lacks)."""
    if path.is_dir():
        return (path / ADAPTER_CONFIG_NAME).is_file() and not hf.is_checkpoint_dir(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with hf.open_safetensors(path, path) as handle:
            return METADATA_KEY in (handle.metadata() or {})
    except ModelFileError:
        return False


def _alone(path: Path) -> InvalidInputError:
    return InvalidInputError(f"{path} is a LoRA adapter; give its base too: --model BASE_DIR "
                             "--adapter ADAPTER_DIR")


def load(path: str | Path, *, weights: str | Path | None = None) -> nn.Module:
    """A packed adapter and base, merged, in this process (`freemark.formats.local`)."""
    path = Path(path)
    if path.is_dir():
        raise _alone(path)
    if weights is not None:
        raise InvalidInputError("--weights does not apply to an adapter and its base")
    return load_packed(path)


@contextlib.contextmanager
def packed(path: str | Path) -> Iterator[Path]:
    """A packed adapter and base is its own upload; an adapter directory alone is refused."""
    if Path(path).is_dir():
        raise _alone(Path(path))
    yield Path(path)


def open_untrusted(path: str | Path, *, layer: str | None, pooling: int, width: int = 0,
                   max_parameters: int = hf.MAX_PARAMETERS, **_options: Any
                   ) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """In the key server's sandbox child: vet, build and merge an uploaded packed adapter and
    base (the base's parameter cap `max_parameters`, as for a checkpoint), and return its
    identity and run as `huggingface.open_untrusted` does."""
    return hf.model_run(load_untrusted(path, max_parameters=max_parameters), layer, pooling,
                        width)


def load_untrusted(path: str | Path, *, max_parameters: int = hf.MAX_PARAMETERS,
                   **_options: Any) -> nn.Module:
    """`open_untrusted`'s merged model, built once (`huggingface.load_untrusted`)."""
    return load_packed(path, max_parameters=max_parameters)


def warm_up(folder: Path) -> None:
    """Import the transformers modules the merge needs (Conv1D) before a fork server's
    children drop privileges; the model classes are warmed by `huggingface.warm_up`."""
    del folder
    _conv1d()
