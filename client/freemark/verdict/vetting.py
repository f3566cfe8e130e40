"""Which reference panel members lean toward the host: the panel-poisoning check, torch-free.

Both tests bound a suspect's p-value at the *worst* panel member's rate
(`freemark.verdict.decision.panel_bound`, `freemark.verdict.aligned`): that is what keeps
them valid on a layer where unrelated models agree with the host more than chance would.
It is also what one member derived from the host (a fine-tuned copy) exploits: its rate is
a copy's, so no copy can beat it and every verdict of the registration is `inconclusive`
(issue 18, item 7).

A member leans toward the host when the lower half of the panel would call it a copy: its
statistic against the host (bits of the watermark it decodes; host units it carries after
alignment) has p ≤ alpha under the verdict's own bound, fitted to the members at or below
the panel's median (`core`). The lower half is what makes the rule robust: a leaning member
cannot hide itself by raising the null it is judged against, and neither can a second one,
as long as fewer than half of the members lean. The statistic and the bound are the
verdict's (`panel_bound`), so "leans" means exactly "would be a match against the rest",
and the threshold is the alpha the panel must serve, not a tuned constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from freemark.verdict.decision import panel_bound

__all__ = ["Lean", "core", "leaning"]


@dataclass(frozen=True)
class Lean:
    """A member whose statistic the panel's lower half would call a copy's."""

    member: int  # its index in the panel given to `leaning`
    test: str  # the statistic: "plain" (bits decoded) or "aligned" (host units carried)
    statistic: int
    n: int  # out of: bits, or live host units
    core_worst: int  # the largest statistic among the panel's lower half
    log10_p_value: float  # under the lower half (`panel_bound`)

    def describe(self) -> str:
        """One line for a refusal, a receipt and the operator's log."""
        what = "watermark bits decoded" if self.test == "plain" else "host units carried"
        return (f"leans toward the host: {self.statistic} of {self.n} {what}, where the "
                f"panel's lower half has at most {self.core_worst} (p = "
                f"{10.0 ** self.log10_p_value:.1e} that an independent model gets as many)")


def core(values: Sequence[int]) -> list[int]:
    """The panel's lower half: the members at or below its (lower) median."""
    ordered = sorted(values)
    return ordered[: (len(ordered) - 1) // 2 + 1]


def leaning(values: Sequence[int], n: int, *, alpha: float, test: str) -> list[Lean]:
    """The members whose statistic (`values`, one per member, out of `n`) the panel's lower
    half would call a copy at `alpha`. A panel of one has no lower half to judge against:
    nothing leans (the reach check still sees it)."""
    if len(values) < 2:
        return []
    lower = core(values)
    worst = max(lower)
    found = []
    for member, value in enumerate(values):
        if value <= worst:
            continue
        log10_p = panel_bound(int(value), n, lower)
        if log10_p <= math.log10(alpha):
            found.append(Lean(member=member, test=test, statistic=int(value), n=n,
                              core_worst=int(worst), log10_p_value=log10_p))
    return found

