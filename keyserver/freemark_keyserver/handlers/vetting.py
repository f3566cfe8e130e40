"""Vetting the reference panel a registration seals: no member leaning toward the host, and
a panel that can serve its owner (issue 18, item 7).

The panel is fixed at Register and calibrates every later verdict of the registration, at
the worst member's rate. One operator member that is a fine-tuned copy of the host (added
to the family before the owner registered) made the owner's stolen copy `inconclusive` at
p = 1, and nobody was told. So, before sealing:

1. Members that lean toward the host (`freemark.panel.leaning_members`: the panel's lower
   half would call them a copy at the alpha checked) do not join. The owner's own reference
   refuses the call (INVALID_MODEL, naming it: he can replace it); the operator's member is
   left out, named in the receipt with the reason, and logged for the operator.
2. The panel that is left must give a copy of the host a match at that alpha
   (`freemark.extract.panel_reach`: the host relabelled where the aligned test runs). If it
   cannot, Register is refused (PANEL_TOO_WEAK) or, where the operator chose `warn`, the
   registration goes ahead with the reason signed into the receipt's `panel_warning`.

The alpha is the one a Verify signs when none is asked for (the scheme default, kept inside
the policy's range). The receipt lists every member considered, with its source (the
owner's, or the operator's with its id), so the owner and a court can see who chose the
panel; `freemark.audit.receipt` checks that the sealed ones are the panel the receipt signs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from freemark.extract import panel_reach
from freemark.panel import Reference, leaning_members
from freemark.records.types import PanelMemberEntry, VerdictPolicy
from freemark.scheme.bundle import KeyBundle
from freemark.verdict.decision import DEFAULT_ALPHA
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.panels import Candidate, Reading

__all__ = ["SealedPanel", "reach_alpha", "vet_panel"]

log = logging.getLogger("freemark_keyserver")


@dataclass(frozen=True)
class SealedPanel:
    """What Register seals and signs: the members kept, every member's entry, any warning."""

    references: list[Reference]
    entries: tuple[PanelMemberEntry, ...]
    warning: str


def reach_alpha(policy: VerdictPolicy) -> float:
    """The alpha a panel must serve: what a Verify signs by default, inside the policy."""
    return min(max(DEFAULT_ALPHA, policy.alpha_min), policy.alpha_max)


def vet_panel(candidates: Sequence[Candidate], bundle: KeyBundle, host: Reading, *,
              policy: VerdictPolicy, mode: str, skipped: Sequence[PanelMemberEntry] = ()
              ) -> SealedPanel:
    """Drop (or refuse) members leaning toward the host, then check the rest's reach; `mode`
    is the operator's `--panel-reach` ("refuse" or "warn"). `skipped` are the entries of
    operator members already left out (unreadable for this key, or the host itself): the
    receipt names them too."""
    alpha = reach_alpha(policy)
    leans = {lean.member: lean for lean in
             leaning_members([c.reference for c in candidates], bundle, alpha=alpha)}
    for index, lean in leans.items():
        if candidates[index].source == "owner":
            raise ServiceError(ErrorCode.INVALID_MODEL, (
                f"{candidates[index].what} {lean.describe()}: it looks derived from the host "
                "(a fine-tuned copy?); a panel needs models trained independently of it"))
        log.warning("panel member %s left out of a registration: %s",
                    candidates[index].member_id, lean.describe())
    entries = tuple(PanelMemberEntry(
        fingerprint=c.reference.fingerprint, source=c.source, member_id=c.member_id,
        left_out=leans[i].describe() if i in leans else "") for i, c in enumerate(candidates))
    entries += tuple(skipped)
    kept = [c for i, c in enumerate(candidates) if i not in leans]
    warning = _too_weak(kept, bundle, host, alpha) if kept else ""
    if warning and mode == "refuse":
        raise ServiceError(ErrorCode.PANEL_TOO_WEAK, warning + (
            ": add independent references of your own (five recommended), or ask the "
            "operator to review the panel members named; nothing was registered"))
    return SealedPanel([c.reference for c in kept], entries, warning)


def _too_weak(kept: Sequence[Candidate], bundle: KeyBundle, host: Reading, alpha: float
              ) -> str:
    """Why `kept` cannot give a copy of the host a match at `alpha`, or "" when it can."""
    verdict = panel_reach(bundle, host.triggers, host.probes, [c.reference for c in kept],
                          alpha=alpha)
    if verdict.is_match:
        return ""
    copy = ("a relabelled copy of the host" if len(verdict.tests) > 1
            else "the host itself (a panel this small runs no aligned test)")
    owners = sum(1 for c in kept if c.source == "owner")
    operators = [c.member_id for c in kept if c.source == "operator"]
    named = f": {', '.join(operators)}" if operators else ""
    return (f"with this reference panel {copy} would get at best p = {verdict.p_value:.1e} "
            f"({verdict.outcome}), not a match at alpha {alpha:g}; its {len(kept)} members are "
            f"{owners} of yours and {len(operators)} of the operator's{named}")
