"""Key derivation: grow a secret key A from a random anchor so that sign(A z) = b on the host.

docs/design.md §1.1. We minimise, by full-batch gradient descent,

    L(A) = Σ_j Σ_c relu(m' − s_j (A z_c)_j)²  +  λ ‖A − A₀‖²  (+ η Σ_j Σ_n (A z_n)_j²)

where s_j = 2b_j − 1, z_c are the host's normalised activation vectors (the host and
any perturbed copies), z_n optional negative (unrelated) models, and m' = m·(1 + slack)
so the minimiser clears the requested margin m. Staying near the random anchor A₀ is
what makes the key behave like a random projection on any model but the host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from freemark.errors import DerivationError

DEFAULT_MARGIN = 1.0
DEFAULT_LAMBDA = 1e-3
DEFAULT_STEPS = 500
MARGIN_SLACK = 0.05
RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class DerivationSettings:
    """Hyper-parameters of the optimiser; defaults are justified in docs/scheme.md."""

    margin: float = DEFAULT_MARGIN
    lam: float = DEFAULT_LAMBDA
    steps: int = DEFAULT_STEPS
    negative_weight: float = 1.0


def anchor(anchor_seed: bytes, n_bits: int, units: int) -> np.ndarray:
    """The random anchor A₀ (standard normal rows), reproducible from its 32-byte seed."""
    seed = int.from_bytes(hashlib.sha256(b"freemark/v1/anchor" + anchor_seed).digest()[:8], "big")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_bits, units, generator=generator, dtype=torch.float64).numpy()


def signs(bits: np.ndarray) -> np.ndarray:
    """s_j = 2b_j − 1 as float64."""
    return 2.0 * np.asarray(bits, dtype=np.float64) - 1.0


def closed_form_key(anchor_matrix: np.ndarray, z: np.ndarray, bits: np.ndarray,
                    *, margin: float = DEFAULT_MARGIN, lam: float = DEFAULT_LAMBDA) -> np.ndarray:
    """Exact minimiser of L for one host and no extra terms (the test oracle and fast path).

    Rows already past m' keep their anchor; the others move along z by t = (m' − s a₀·z)/(1 + λ).
    """
    s = signs(bits)
    target = margin * (1.0 + MARGIN_SLACK)
    current = s * (anchor_matrix @ z)
    shift = np.where(current >= target, 0.0, (target - current) / (1.0 + lam))
    return anchor_matrix + np.outer(s * shift, z)


def margins(key: np.ndarray, z: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Per-bit margins (2b_j − 1)(A z)_j."""
    return signs(bits) * (key @ z)


def descend(anchor_matrix: np.ndarray, hosts: np.ndarray, bits: np.ndarray, *,
            settings: DerivationSettings = DerivationSettings(),
            negatives: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Gradient descent on L; `hosts` is (copies, units) of normalised host vectors.

    The step size 1/(2(C + λ + η·Nn)) is below 1/Lipschitz of ∇L for unit vectors, so plain
    gradient descent is stable with no tuning. Stops once every bit of every copy clears m
    and the gradient is negligible; raises DerivationError if it never does.
    """
    s = torch.from_numpy(signs(bits))
    a0 = torch.from_numpy(anchor_matrix)
    zs = torch.from_numpy(np.atleast_2d(hosts)).T  # (units, copies)
    zn = None if negatives is None or len(negatives) == 0 else torch.from_numpy(np.atleast_2d(negatives)).T
    target = settings.margin * (1.0 + MARGIN_SLACK)
    eta = settings.negative_weight
    curvature = zs.shape[1] + settings.lam + (eta * zn.shape[1] if zn is not None else 0.0)
    step = 1.0 / (2.0 * curvature)
    key = a0.clone()
    previous = float("inf")
    bar = tqdm(total=settings.steps, desc="deriving key", unit="step", disable=not progress, leave=False)
    try:
        for _ in range(settings.steps):
            projected = s[:, None] * (key @ zs)
            slack = torch.clamp(target - projected, min=0.0)
            loss = float((slack**2).sum() + settings.lam * ((key - a0) ** 2).sum())
            grad = -2.0 * (s[:, None] * slack) @ zs.T + 2.0 * settings.lam * (key - a0)
            if zn is not None:
                negative = key @ zn
                loss += float(eta * (negative**2).sum())
                grad = grad + 2.0 * eta * negative @ zn.T
            done = bool((projected >= settings.margin).all())
            if done and previous - loss <= RELATIVE_TOLERANCE * max(previous, 1e-300):
                break  # every bit clears m and the objective has stopped moving
            previous = loss
            key = key - step * grad
            bar.update(1)
    finally:
        bar.close()
    final = (s[:, None] * (key @ zs)).min()
    if float(final) < settings.margin:
        raise DerivationError(
            f"after {settings.steps} steps the smallest margin is {float(final):.3g} < "
            f"{settings.margin}: raise --steps or lower the margin"
        )
    return key.numpy()
