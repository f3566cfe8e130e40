"""Deriving an output key: secret queries by gradient descent on the inputs, never the weights.

Each query starts as one of the owner's own images and moves inside an L∞ ball of radius ε
(default 0.3 in [0, 1] pixel units, scaled to the data's pixel range), always on the
256-level grid an image API takes (a straight-through estimator lets the gradient pass the
rounding, so what is optimised is exactly what is stored). It is pushed so that

- the host and every surrogate (the owner's own thefts, `surrogates`) answer the bit's
  target class t_b as their top-1 label, by a logit margin of at least `margin`;
- the panel members of the query's fold rank t_b below the second target class o by at
  least `panel_margin`.

Signed-gradient steps (PGD) run on every candidate of every set at once, each model once per
step over the whole batch (a panel member only on the fold it shapes); a candidate leaves
the batch as soon as every constraint holds on its rounded pixels, and the best iterate of
each is kept (the host's margin first, its hinge weighted `HOST_WEIGHT`, then fewest
violations). `overprovision` times as many candidates as queries are derived, and each set
keeps the best `n_queries`: the host must answer t_b (the key server checks every query),
then fewest violated constraints, then where the shaping panel is furthest from t_b.
Selection reads only the panel half that shaped a fold, so the other half stays held out.

Ranking items are natural images of the owner, never perturbed: the host's top
`RANK_DEPTH` classes in order, kept where the surrogates reproduce that order and the
shaping panel half does not.

The panel is split into two folds alternately within each architecture (`architecture`:
the weights' names and shapes, so a narrower model of one family counts as another), so both
halves hold both architectures.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from freemark.blackbox.key import OutputKey
from freemark.blackbox.surrogates import DEFAULT_RECIPES, Recipe, evaluating, make_surrogates
from freemark.errors import DerivationError, InvalidInputError
from freemark.formats.pt2 import fingerprint, state_dict_of
from freemark.scheme.watermark import MIN_BITS, new_nonce, watermark_bits
from freemark.verdict.outputs import RANK_DEPTH, ranking_successes

__all__ = ["MIN_ARCHITECTURES", "MIN_REFERENCES", "QuerySettings", "architecture",
           "check_panel", "derive_output_key", "panel_folds"]

Model = nn.Module | torch.export.ExportedProgram

MIN_REFERENCES = 8
MIN_ARCHITECTURES = 2
CHUNK = 512
HOST_WEIGHT = 4.0  # the host's hinge counts this much more: every kept query needs it


@dataclass(frozen=True)
class QuerySettings:
    """The derivation's parameters, recorded in the key."""

    eps: float = 0.3  # L∞ radius in [0, 1] pixel units
    steps: int = 60
    step_size: float = 0.03  # per signed-gradient step, [0, 1] pixel units
    margin: float = 2.0  # host and surrogates: logit[t_b] − max other logit
    panel_margin: float = 3.0  # shaping panel: logit[o] − logit[t_b]
    overprovision: float = 2.0  # candidates per kept query
    ranking_pool: int = 4  # natural candidates per kept ranking item
    levels: int = 256  # the pixel grid
    seed: int = 0


def _module(model: Model) -> nn.Module:
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + CHUNK]))
                          for i in range(0, len(x), CHUNK)]).numpy().astype(np.float32)


def architecture(model: Model) -> bytes:
    """SHA-256 over the sorted weight names and shapes."""
    shapes = sorted((name, tuple(t.shape)) for name, t in state_dict_of(model).items())
    return hashlib.sha256(repr(shapes).encode()).digest()


def panel_folds(panel: Sequence[Model]) -> np.ndarray:
    """Fold 0 or 1 for each member, alternating within each architecture."""
    seen: dict[bytes, int] = {}
    folds = []
    for member in panel:
        digest = architecture(member)
        folds.append(seen.get(digest, 0) % 2)
        seen[digest] = seen.get(digest, 0) + 1
    return np.array(folds, dtype=np.int64)


def check_panel(panel: Sequence[Model]) -> None:
    """Refuse a panel that cannot calibrate an output key, saying why."""
    if len(panel) < MIN_REFERENCES:
        raise InvalidInputError(
            f"an output key needs at least {MIN_REFERENCES} reference models, got {len(panel)}: "
            f"half the panel shapes each fold of queries and the other half is the held-out "
            f"null, so fewer leaves the null's fit to a handful of counts")
    architectures = {architecture(m) for m in panel}
    if len(architectures) < MIN_ARCHITECTURES:
        raise InvalidInputError(
            f"the {len(panel)} reference models share one architecture; give at least "
            f"{MIN_ARCHITECTURES}: queries shaped against one architecture transfer to another "
            f"unmeasured, and the null would never see it")


class _Grid:
    """The input range and its levels: what an image API takes. Pixels in [0, 1] or [0, 255]
    keep that range; inputs outside both (a program that takes normalised tensors) keep the
    owner's data's own range, with the same number of levels across it, so a query never
    leaves the domain the host was given."""

    def __init__(self, x: np.ndarray, levels: int) -> None:
        low, high = float(x.min()), float(x.max())
        if low >= 0.0 and high <= 255.0:
            self.low, self.high = 0.0, (255.0 if high > 1.5 else 1.0)
        else:
            self.low, self.high = low, high
        self.levels = levels

    @property
    def span(self) -> float:
        return self.high - self.low

    def round(self, x: torch.Tensor) -> torch.Tensor:
        steps = (self.levels - 1) / self.span
        return torch.round((x - self.low) * steps) / steps + self.low


def _violations(logits: torch.Tensor, t: torch.Tensor, o: torch.Tensor, *, positive: bool,
                margin: float) -> torch.Tensor:
    """Hinge per candidate: a positive model's top-1 margin for t, or a negative model's
    preference of o over t, short of `margin`."""
    rows = torch.arange(len(t))
    if positive:
        rest = logits.clone()
        rest[rows, t] = -math.inf
        return torch.relu(margin - (logits[rows, t] - rest.max(dim=1).values))
    return torch.relu(logits[rows, t] - logits[rows, o] + margin)


def _pgd(x0: np.ndarray, t: np.ndarray, o: np.ndarray, folds: np.ndarray,
         positives: Sequence[nn.Module], panel: Sequence[nn.Module], member_folds: np.ndarray,
         settings: QuerySettings, grid: _Grid, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rounded candidates, a sort key per candidate: violated constraints, less a fraction
    for the shaping panel's margin)."""
    # Gradients flow to the inputs only; the callers' models get their flags back.
    flags = [(p, p.requires_grad) for m in (*positives, *panel) for p in m.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        return _descend(x0, t, o, folds, positives, panel, member_folds, settings, grid,
                        progress)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _descend(x0: np.ndarray, t: np.ndarray, o: np.ndarray, folds: np.ndarray,
             positives: Sequence[nn.Module], panel: Sequence[nn.Module],
             member_folds: np.ndarray, settings: QuerySettings, grid: _Grid,
             progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The signed-gradient loop of `_pgd`, then the rounded result and its violations."""
    base = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))
    delta = torch.zeros_like(base)
    tt, oo, ff = torch.from_numpy(t), torch.from_numpy(o), torch.from_numpy(folds)
    eps, step = settings.eps * grid.span, settings.step_size * grid.span
    active = torch.arange(len(base))
    # The best iterate of each candidate (the host's constraint first, then fewest
    # violations): signed steps on a sum of hinges can trade the host away for a panel term.
    best = delta.clone()
    best_score = torch.full((len(base),), math.inf)
    for _ in tqdm(range(settings.steps), desc="deriving queries", disable=not progress,
                  leave=False):
        if not len(active):
            break
        still = []
        for chunk in torch.split(active, CHUNK):
            d = delta[chunk].clone().requires_grad_(True)
            xa = torch.clamp(base[chunk] + d, grid.low, grid.high)
            xq = xa + (grid.round(xa) - xa).detach()
            hinges = [_violations(m(xq), tt[chunk], oo[chunk], positive=True,
                                  margin=settings.margin) for m in positives]
            loss = HOST_WEIGHT * hinges[0] + sum(hinges[1:], torch.zeros(len(chunk)))
            violations = sum(((h > 0).float() for h in hinges[1:]), torch.zeros(len(chunk)))
            for member, fold in zip(panel, member_folds, strict=True):
                # A member runs only on the fold it shapes: half the panel's cost.
                mine = torch.nonzero(ff[chunk] == int(fold)).squeeze(1)
                if len(mine):
                    hinge = _violations(member(xq[mine]), tt[chunk][mine], oo[chunk][mine],
                                        positive=False, margin=settings.panel_margin)
                    loss = loss.index_add(0, mine, hinge)
                    violations = violations.index_add(0, mine, (hinge > 0).float())
            (grad,) = torch.autograd.grad(loss.sum(), d)
            score = (violations + 100.0 * (hinges[0] > 0).float()).detach()
            better = score < best_score[chunk]
            best[chunk[better]] = d.detach()[better]
            best_score[chunk[better]] = score[better]
            open_ = loss.detach() > 0
            moved = torch.clamp(d.detach() - step * grad.sign(), -eps, eps)
            delta[chunk[open_]] = moved[open_]
            still.append(chunk[open_])
        active = torch.cat(still)
    delta = best
    final = grid.round(torch.clamp(base + delta, grid.low, grid.high)).numpy()
    bad = np.zeros(len(final), dtype=np.float64)
    for model in positives:
        bad += np.argmax(_logits(model, final), axis=1) != t
    rows = np.arange(len(final))
    gap = np.full(len(final), np.inf)  # the shaping panel's least preference of o over t
    for member, fold in zip(panel, member_folds, strict=True):
        logits = _logits(member, final)
        mine = folds == fold
        bad += mine & (logits[rows, t] >= logits[rows, o])
        gap = np.where(mine, np.minimum(gap, logits[rows, o] - logits[rows, t]), gap)
    # Fewest violations first; among equals, where the shaping panel is furthest from t_b
    # (what transfers least to the held-out half).
    return final, bad - np.tanh(gap / 10.0) / 2.0


def _select(order_key: np.ndarray, eligible: np.ndarray, per_set: np.ndarray, n_sets: int,
            n_keep: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Indices of the kept candidates: per set, the eligible ones with the lowest key."""
    kept = []
    for s in range(n_sets):
        pool = np.flatnonzero((per_set == s) & eligible)
        if len(pool) < n_keep:
            raise DerivationError(
                f"set {s}: only {len(pool)} {what} qualify for {n_keep} (raise --eps or the "
                f"steps, or give more owner data)")
        pool = pool[rng.permutation(len(pool))]
        kept.append(np.sort(pool[np.argsort(order_key[pool], kind="stable")[:n_keep]]))
    return np.concatenate(kept)


def derive_output_key(host: Model, x: np.ndarray, y: np.ndarray | None,
                      references: Sequence[Model], *, owner: str, n_queries: int = 256,
                      n_sets: int = 4, settings: QuerySettings = QuerySettings(),
                      recipes: Sequence[Recipe] = DEFAULT_RECIPES,
                      surrogates: Sequence[nn.Module] | None = None,
                      progress: bool = False) -> OutputKey:
    """An output key for `host` from the owner's images `x` (the host's input domain and
    dtype; labels `y` for the fine-tune surrogate) and the reference panel.

    `surrogates` replaces the recipes' thefts where the owner made his own. The host is
    read, never changed: its fingerprint is checked before and after.
    """
    check_panel(references)
    if n_queries < 8 or n_sets < 1 or n_queries * n_sets < MIN_BITS:
        raise InvalidInputError(f"an output key needs at least 8 queries per set, one set, and "
                                f"{MIN_BITS} queries in all (one watermark bit each); got "
                                f"{n_queries} × {n_sets}")
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidInputError(f"owner data of dtype {x.dtype}: derivation needs the float "
                                f"inputs the host program takes")
    started = time.perf_counter()
    before = fingerprint(host)
    model = evaluating(_module(host))
    panel = [evaluating(_module(r)) for r in references]
    member_folds = panel_folds(references)
    grid = _Grid(x, settings.levels)
    rng = np.random.default_rng(settings.seed)
    host_logits = _logits(model, x)
    n_classes = host_logits.shape[1]
    if n_classes < RANK_DEPTH:
        raise InvalidInputError(f"an output key needs a host of at least {RANK_DEPTH} classes")
    labels = host_logits.argmax(axis=1) if y is None else np.asarray(y)
    n_candidates = math.ceil(n_queries * settings.overprovision)
    n_natural = n_queries * settings.ranking_pool
    needed = n_sets * (n_candidates + n_natural)
    if len(x) < needed:
        raise InvalidInputError(f"{len(x)} owner images; {n_sets} sets of {n_queries} queries "
                                f"need {needed} (fewer sets or queries, or more data)")
    made = list(surrogates) if surrogates is not None else make_surrogates(
        model, x, labels, recipes=recipes, progress=progress)
    positives = [model, *made]
    order = rng.permutation(len(x))
    sources = order[:n_sets * n_candidates]
    naturals = order[n_sets * n_candidates:needed]
    cand_set = np.repeat(np.arange(n_sets), n_candidates)
    cand_fold = np.tile(np.arange(n_candidates) % 2, n_sets)
    # Two target classes, both other than the image's own label, in random order.
    shift = np.stack([rng.choice(np.arange(1, n_classes), size=2, replace=False)
                      for _ in sources])
    pair = (labels[sources][:, None] + shift) % n_classes
    nonce = new_nonce()
    # A candidate's target is pair[:, 0]; the kept query's bit then decides the order its
    # two classes are stored in, so that classes[bit] is that target (`OutputKey.targets`).
    final, bad = _pgd(x[sources], pair[:, 0], pair[:, 1], cand_fold, positives, panel,
                      member_folds, settings, grid, progress)
    host_ok = _logits(model, final).argmax(axis=1) == pair[:, 0]
    kept = _select(bad, host_ok, cand_set, n_sets, n_queries, rng, "queries")
    bits = watermark_bits(owner, nonce, len(kept)).astype(np.int64)
    target, other = pair[kept, 0], pair[kept, 1]
    classes = np.where(bits[:, None] == 1, np.stack([other, target], 1),
                       np.stack([target, other], 1))

    # Ranking items: natural images, the host's top classes in order.
    nat = x[naturals]
    nat_set = np.repeat(np.arange(n_sets), n_natural)
    nat_fold = np.tile(np.arange(n_natural) % 2, n_sets)
    host_nat = _logits(model, nat)
    orders = np.argsort(-host_nat, axis=1, kind="stable")[:, :RANK_DEPTH]
    ranking_bad = np.zeros(len(nat), dtype=np.int64)
    for surrogate in made:
        ranking_bad += ~ranking_successes(_logits(surrogate, nat), orders)
    panel_nat = [_logits(member, nat) for member in panel]
    for logits, fold in zip(panel_nat, member_folds, strict=True):
        ranking_bad += 2 * ((nat_fold == fold) & ranking_successes(logits, orders))
    chosen = _select(ranking_bad, ranking_successes(host_nat, orders), nat_set, n_sets,
                     n_queries, rng, "natural images")

    queries = final[kept].astype(x.dtype)
    ranking_inputs = nat[chosen].astype(x.dtype)
    if fingerprint(host) != before:
        raise DerivationError("the host's weights changed during derivation")
    elapsed = time.perf_counter() - started
    parameters = {**asdict(settings), "pixel_low": grid.low, "pixel_high": grid.high,
                  "queries_per_set": n_queries, "sets": n_sets,
                  "surrogates": ([r.as_dict() for r in recipes] if surrogates is None
                                 else f"{len(made)} given by the owner"),
                  "seconds": round(elapsed, 1),
                  "seconds_per_256_queries": round(elapsed * 256 / (n_queries * n_sets), 1)}
    return OutputKey(
        owner=owner, nonce=nonce, n_classes=n_classes, queries=queries, classes=classes,
        folds=cand_fold[kept], set_ids=cand_set[kept], ranking_inputs=ranking_inputs,
        ranking_orders=orders[chosen], ranking_folds=nat_fold[chosen],
        ranking_set_ids=nat_set[chosen], host_fingerprint=before,
        panel_fingerprints=np.stack([np.frombuffer(fingerprint(r), dtype=np.uint8)
                                     for r in references]),
        panel_folds=member_folds,
        panel_query_scores=np.stack([_logits(m, queries) for m in panel]),
        panel_ranking_scores=np.stack([_logits(m, ranking_inputs) for m in panel]),
        parameters=parameters)
