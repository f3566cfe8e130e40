"""Ambiguity: the thief derives and registers his own key on the stolen copy.

Anyone can derive a valid key for any model (derivation never touches the weights), so a
key on its own proves nothing about who made a model. What decides is registration
order in the TTP's append-only log (docs/design.md §1.2): the owner registered the host before
releasing it; the thief can only register after stealing it. This module simulates that
log locally (the real TTP is built elsewhere) with injected time stamps and shows:

- the owner's key decodes from the thief's copy;
- the thief's naive key (derived on his copy) also decodes from the owner's original, since
  the two models are near-identical: the evidence is symmetric, so it cannot decide alone;
- a thief who derives with the original as a negative reference can make his key miss
  the original, but the owner's earlier key still decodes his copy;
- the TTP refuses the thief's registration because an earlier key already decodes his
  copy, and a dispute is settled for the earliest registration whose key decodes the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import torch
from torch import nn

from freemark.derive import derive_key
from freemark.errors import FreemarkError, InvalidInputError
from freemark.extract import extract
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.keygen import DerivationSettings
from freemark.scheme.triggers import TriggerSet
from freemark.verdict.decision import DEFAULT_ALPHA, Verdict

Model = nn.Module | torch.export.ExportedProgram
OWNER_REGISTERED = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
THEFT_DELAY = timedelta(days=30)


class PriorClaimError(FreemarkError):
    """An earlier registration's key already decodes the model being registered."""


@dataclass(frozen=True)
class Registration:
    """One entry of the simulated log: who registered which key, when."""

    at: datetime
    claimant: str
    bundle: KeyBundle


def decodes(model: Model, bundle: KeyBundle, alpha: float) -> Verdict | None:
    """The verdict of `bundle` on `model`, or None when its key layer has another shape."""
    try:
        return extract(model, bundle, alpha=alpha)
    except InvalidInputError:
        return None


@dataclass
class LocalRegistry:
    """Append-only registrations in time order; priority goes to the earliest matching key."""

    alpha: float = DEFAULT_ALPHA
    entries: list[Registration] = field(default_factory=list)

    def register(self, claimant: str, model: Model, bundle: KeyBundle, *, at: datetime,
                 check_prior: bool = True) -> Registration:
        """Append a registration; raise PriorClaimError if an earlier key decodes `model`.

        `check_prior=False` models a careless TTP (or a second TTP) that accepted the
        thief's registration, to show the dispute is still settled by order.
        """
        if self.entries and at < self.entries[-1].at:
            raise ValueError("the log is append-only: a registration cannot predate the last one")
        if check_prior:
            for earlier in self.entries:
                verdict = decodes(model, earlier.bundle, self.alpha)
                if earlier.claimant != claimant and verdict is not None and verdict.is_match:
                    raise PriorClaimError(
                        f"refused: the key registered by {earlier.claimant} at "
                        f"{earlier.at.isoformat()} already decodes this model "
                        f"(calibrated p {verdict.p_value:.1e})")
        entry = Registration(at=at, claimant=claimant, bundle=bundle)
        self.entries.append(entry)
        return entry

    def claims(self, model: Model) -> list[Registration]:
        """Every registration whose key decodes `model`, earliest first."""
        found = []
        for entry in self.entries:
            verdict = decodes(model, entry.bundle, self.alpha)
            if verdict is not None and verdict.is_match:
                found.append(entry)
        return sorted(found, key=lambda e: e.at)


@dataclass(frozen=True)
class CrossCheck:
    """One key applied to one model."""

    key: str
    model: str
    verdict: Verdict | None


@dataclass(frozen=True)
class OverwriteResult:
    """The key × model matrix, the thief's registration attempt and the dispute's outcome."""

    checks: tuple[CrossCheck, ...]
    attacker_registration: str
    owner_of_copy: str
    owner_of_original: str
    notes: tuple[str, ...]


def overwrite(host: nn.Module, stolen: nn.Module, owner_bundle: KeyBundle, *,
              attacker_triggers: TriggerSet, alpha: float = DEFAULT_ALPHA,
              attacker: str = "mallory@thief.example", attacker_steps: int = 5000,
              attacker_margin: float = 0.5,
              registered_at: datetime = OWNER_REGISTERED) -> OverwriteResult:
    """Play the ambiguity attack on `stolen` (a copy of `host`) and settle it by registration order.

    The thief's second key is derived with the original as a negative reference, a lower
    margin and `attacker_steps` of descent (ten times the default): he tries hard to make
    his key decode his copy but miss the original.
    """
    notes: list[str] = []
    keys: dict[str, KeyBundle] = {"owner": owner_bundle}
    keys["thief (naive)"] = derive_key(stolen, layer=owner_bundle.layer, triggers=attacker_triggers,
                                       owner=attacker, n_bits=owner_bundle.n_bits)
    try:
        keys["thief (avoids original)"] = derive_key(
            stolen, layer=owner_bundle.layer, triggers=attacker_triggers, owner=attacker,
            n_bits=owner_bundle.n_bits, references=[host],
            settings=DerivationSettings(margin=attacker_margin, steps=attacker_steps))
    except FreemarkError as exc:
        notes.append(f"the thief could not derive a key that avoids the original: {exc}")
    models: dict[str, nn.Module] = {"original": host, "thief's copy": stolen}
    checks = tuple(CrossCheck(key=k, model=m, verdict=decodes(model, bundle, alpha))
                   for k, bundle in keys.items() for m, model in models.items())

    registry = LocalRegistry(alpha=alpha)
    registry.register(owner_bundle.owner, host, owner_bundle, at=registered_at)
    thief_key = keys.get("thief (avoids original)", keys["thief (naive)"])
    stolen_at = registered_at + THEFT_DELAY
    try:
        registry.register(attacker, stolen, thief_key, at=stolen_at)
        attempt = "accepted (no earlier key decodes the copy)"
    except PriorClaimError as exc:
        attempt = str(exc)
        registry.register(attacker, stolen, thief_key, at=stolen_at, check_prior=False)
        notes.append("the thief's registration was then forced through (check_prior=False) "
                     "to show that a dispute is settled by order even where a TTP accepted it")
    return OverwriteResult(
        checks=checks, attacker_registration=attempt,
        owner_of_copy=_first_claimant(registry.claims(stolen)),
        owner_of_original=_first_claimant(registry.claims(host)), notes=tuple(notes),
    )


def _first_claimant(claims: Sequence[Registration]) -> str:
    if not claims:
        return "nobody (no registered key decodes it)"
    first = claims[0]
    return f"{first.claimant} (registered {first.at.isoformat()}, {len(claims)} matching key(s))"
