"""Decoder benchmark (issue 20): Register and Verify of a Llama-architecture decoder of over a
billion parameters, against their in-process floor, and the sandbox child's peak memory
against the weights' size.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/decoder.py --json out/bench_decoder.json
    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/decoder.py --quick
    ... bench/decoder.py --phases   # also print each server phase's seconds (`_phases`)

The model: `LlamaForCausalLM`, hidden 2048, 22 layers, MLP 5632, 32 query heads on 4
key/value heads, vocabulary 32,000, untied head (TinyLlama-1.1B's shape: 1,100 M parameters,
2.2 GB in bf16). Its weights are random (normal, std 0.02; norms 1): timing and memory depend
on the shapes, not the values, and no pretrained decoder of this size ships in a wheel of the
package index. It is generated in bf16 directly, one tensor at a time (never a float32 copy),
and written once with `save_pretrained` (bf16, 500 MB shards) under `.cache/bench-decoder/`
(or `$FREEMARK_BENCH_CACHE/bench-decoder/`, so that several clones share one copy of its
2.2 GB), keyed by a hash of the recipe; later runs reuse it. `--quick`: the same recipe with 2 layers
(about 170 M parameters), to check the script in a minute.

The key reads `model.layers.<middle>.mlp.act_fn` (5,632 units) on 16 triggers of 16 random
token ids (the model has no tokenizer; a real owner's come from `freemark triggers --text`),
with no alignment probes and no reference panel, so that a run takes minutes on two shared
cores; probes scale the forward pass, the same in the floor and the product.

Floors, in this process with one thread (as the sandbox runs). Verify's: reading the key's
bits, i.e. `load_checkpoint` of the directory (the same checks, memory-mapped bf16 weights),
the key layer's activations on the triggers (`read_layer`) and the plain verdict
(`judge_activations`). Register's: the same plus the host's fingerprint over every weight
(`pt2.fingerprint`), which a registration binds (the receipt names it, the database allows
one registration per fingerprint) and which the owner's own derive computes too; "x read
floor" is Register against the read alone, the definition of the first runs. Register and
Verify: a real key server in this process (`create_server` on port 0, a real sandbox,
SQLite), the owner's `KeyServiceClient` from the checkpoint directory (packed on the way,
hashed as it is sent, spooled and hashed by the server, read in the sandbox; Register also
scans the host for the prior-claim index and seals it at rest). Peak memory: the largest
VmHWM (`/proc/<pid>/status`) of a sandbox child, sampled every 20 ms while each call runs,
and the high-water mark of every reaped descendant (`getrusage(RUSAGE_CHILDREN)`) once the
server has stopped, both against the weights' bytes. The 1- and 15-minute load averages
are printed with the table: on a shared machine the ratios move with them.

"named" rows: the same two calls on a second server whose operator mirrors the model
(`--model-root`), the client naming the packed checkpoint under it (`ServerModel`) instead of
uploading it: the server copies it once into a sealed memory file while hashing it (the packed
file is written once beside the model, `<model>.packed/`, and reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from _phases import install as time_phases
from _table import print_table, write_json

from freemark.derive import derive_key
from freemark.extract import judge_activations
from freemark.formats.huggingface import load_checkpoint, pack
from freemark.formats.pt2 import fingerprint
from freemark.reading import read_layer
from freemark.rpc import KeyServiceClient, ServerModel
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.server import create_server
from freemark_keyserver.store import Principal

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FREEMARK_BENCH_CACHE", ROOT / ".cache")) / "bench-decoder"
RECIPE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
          "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
          "init_std": 0.02, "seed": 0}
TRIGGERS, TOKENS = 16, 16


def build(recipe: dict[str, Any]) -> Path:
    """The recipe's checkpoint directory, generated and saved once (bf16, one tensor at a time)."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    directory = CACHE / f"llama-{recipe['num_hidden_layers']}l-{key}"
    if (directory / "config.json").is_file():
        return directory
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in recipe.items() if k not in ("init_std", "seed", "model_type",
                                                            "architectures", "torch_dtype")}
    config = LlamaConfig(**fields, architectures=recipe["architectures"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(recipe["seed"])
    state = {}
    for name, param in model.named_parameters():
        tensor = torch.empty(param.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, recipe["init_std"], generator=generator)
        state[name] = tensor
    model.load_state_dict(state, assign=True, strict=False)
    del state
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial, max_shard_size="500MB")
    partial.rename(directory)
    return directory


def floors(directory: Path, bundle: KeyBundle) -> tuple[float, float]:
    """The in-process floor (seconds) of reading the key's bits from the checkpoint: load it
    (the same checks, memory-mapped bf16 weights), the key layer's activations on the
    triggers, the plain verdict; and, apart, the host's fingerprint over every weight, which
    a registration binds and the product computes in its sandbox (Register's floor adds it)."""
    start = time.perf_counter()
    model = load_checkpoint(directory)
    activations, _ = read_layer(model, bundle, probes=False)
    judge_activations(activations, bundle)
    floor_s = time.perf_counter() - start
    start = time.perf_counter()
    assert fingerprint(model) == bundle.host_fingerprint
    return floor_s, time.perf_counter() - start


def packed(directory: Path) -> Path:
    """The checkpoint packed into one `.safetensors` under its own model root, written once."""
    root = directory.with_name(directory.name + ".packed")
    single = root / "model.safetensors"
    if not single.is_file():
        root.mkdir(exist_ok=True)
        pack(directory, root / "partial.safetensors").rename(single)
    return single


def product(bundle: KeyBundle, model: Path | ServerModel, model_root: Path | None
            ) -> tuple[float, float, PeakSampler, PeakSampler, float]:
    """Register and Verify on a fresh key server (SQLite, its real sandbox) in this process:
    seconds each, the child peaks while each ran, and the verdict's p-value."""
    with tempfile.TemporaryDirectory(prefix="ttp-", dir=CACHE) as tmp:
        running = create_server(ServerConfig(data_dir=Path(tmp), listen="127.0.0.1:0",
                                             grace_seconds=5, verify_rate_principal=UNLIMITED,
                                             verify_rate_registration=UNLIMITED,
                                             register_rate_principal=UNLIMITED,
                                             model_root=model_root))
        token = new_token()
        running.ctx.store.add_principal(Principal("alice", "owner", hash_token(token), 0))
        client = KeyServiceClient(f"127.0.0.1:{running.port}", token=token, timeout=1800)
        before = descendants(os.getpid())  # the fork server (and its helpers): not children
        with PeakSampler(before) as register_peak:
            start = time.perf_counter()
            receipt = client.register(bundle, model)
            register_s = time.perf_counter() - start
        with PeakSampler(before) as verify_peak:
            start = time.perf_counter()
            verdict = client.verify(receipt.registration_id, model)
            verify_s = time.perf_counter() - start
        assert verdict.outcome == "match", verdict
        client.close()
        running.stop(grace=1)
    return register_s, verify_s, register_peak, verify_peak, verdict.p_value


def triggers(vocab: int) -> TriggerSet:
    ids = np.random.default_rng(1).integers(3, vocab, size=(TRIGGERS, TOKENS), dtype=np.int64)
    return TriggerSet(inputs=ids, attention_mask=np.ones_like(ids))


class PeakSampler:
    """The largest VmHWM (bytes) and CPU seconds (RLIMIT_CPU counts them) of any descendant of
    this process but `skip`, sampled while running."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.peak, self.cpu, self._stop = skip, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in descendants(os.getpid()) - self.skip:
                self.peak = max(self.peak, vm_hwm(pid))
                self.cpu = max(self.cpu, cpu_seconds(pid))


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/bench_decoder.json")
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 22")
    parser.add_argument("--phases", action="store_true",
                        help="print the key server's phases as they end (bench/_phases.py)")
    args = parser.parse_args()
    if args.phases:
        time_phases(lambda name, seconds: print(f"  phase {name}: {seconds:.2f} s", flush=True))
    torch.set_num_threads(1)
    recipe = dict(RECIPE, num_hidden_layers=2) if args.quick else RECIPE
    start = time.perf_counter()
    directory = build(recipe)
    build_s = time.perf_counter() - start
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    layer = f"model.layers.{recipe['num_hidden_layers'] // 2}.mlp.act_fn"
    start = time.perf_counter()
    model = load_checkpoint(directory)
    parameters = sum(p.numel() for p in model.parameters())
    bundle = derive_key(model, layer=layer, triggers=triggers(recipe["vocab_size"]),
                        owner="alice", probes=0)
    derive_s = time.perf_counter() - start
    del model
    floor_s, fingerprint_s = floors(directory, bundle)
    register_floor_s = floor_s + fingerprint_s
    print(f"{parameters:,} parameters, {weights / 1e9:.2f} GB; build {build_s:.0f} s, derive "
          f"{derive_s:.0f} s, floor {floor_s:.1f} s (+ fingerprint {fingerprint_s:.1f} s)",
          flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    print("uploaded: register, then verify", flush=True)
    register_s, verify_s, register_peak, verify_peak, p_value = product(bundle, directory, None)
    single = packed(directory)
    named = ServerModel(single.name, "hf")
    print("named: register, then verify", flush=True)
    named_register_s, named_verify_s, named_register_peak, named_verify_peak, _ = product(
        bundle, named, single.parent)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    load = os.getloadavg()
    rows = [[name, floor, seconds, seconds / floor, seconds / floor_s, peak.peak / 2**30,
             peak.peak / weights, peak.cpu]
            for name, floor, seconds, peak in (
                ("register", register_floor_s, register_s, register_peak),
                ("verify", floor_s, verify_s, verify_peak),
                ("register named", register_floor_s, named_register_s, named_register_peak),
                ("verify named", floor_s, named_verify_s, named_verify_peak))]
    print_table(f"Llama {parameters / 1e9:.2f} B parameters ({weights / 2**30:.2f} GiB bf16), "
                f"{layer}, {TRIGGERS} triggers x {TOKENS} tokens, no probes; seconds",
                ["call", "floor", "product", "x floor", "x read floor", "child peak GiB",
                 "x weights", "child CPU s"], rows)
    print(f"largest reaped descendant (RUSAGE_CHILDREN): {reaped / 2**30:.2f} GiB = "
          f"{reaped / weights:.2f} x weights; load average {load[0]:.1f} (1 min), "
          f"{load[2]:.1f} (15 min) on {os.cpu_count()} cores", flush=True)
    write_json(args.json, {"recipe": recipe, "parameters": parameters, "weights_bytes": weights,
                           "layer": layer, "triggers": TRIGGERS, "tokens": TOKENS, "probes": 0,
                           "build_s": build_s, "derive_s": derive_s, "floor_s": floor_s,
                           "fingerprint_s": fingerprint_s, "register_floor_s": register_floor_s,
                           "register_s": register_s, "verify_s": verify_s,
                           "named_register_s": named_register_s,
                           "named_verify_s": named_verify_s,
                           "named_register_child_peak_bytes": named_register_peak.peak,
                           "named_verify_child_peak_bytes": named_verify_peak.peak,
                           "register_child_peak_bytes": register_peak.peak,
                           "verify_child_peak_bytes": verify_peak.peak,
                           "register_child_cpu_s": register_peak.cpu,
                           "verify_child_cpu_s": verify_peak.cpu,
                           "reaped_peak_bytes": reaped, "p_value": p_value,
                           "load_average": load})


if __name__ == "__main__":
    main()
