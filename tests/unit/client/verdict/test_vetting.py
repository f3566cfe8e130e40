"""Which panel members lean toward the host (issue 18, item 7): the rule on its own, with
statistics of the digits CNN's size (128 host units, 256 bits). The figures of honest members
are of the kind measured on independently trained digits CNNs (aligned: 5 to 9 host units,
plain: 129 to 144 bits); a fine-tuned copy of the host carries most units and decodes
nearly every bit. The end-to-end case over a real key server is
tests/integration/test_panel_poisoning.py."""

from __future__ import annotations

import pytest

from freemark.verdict.decision import DEFAULT_ALPHA
from freemark.verdict.vetting import core, leaning

UNITS, BITS = 128, 256


def _leaning(values: list[int], n: int = UNITS) -> list[int]:
    return [lean.member for lean in leaning(values, n, alpha=DEFAULT_ALPHA, test="aligned")]


def test_an_honest_panel_has_no_member_leaning_toward_the_host() -> None:
    assert _leaning([6, 5, 6, 5, 9]) == []
    assert _leaning([0, 0, 0, 3, 12]) == []  # a member sharing a few units is no copy
    assert _leaning([129, 140, 144, 133, 150], BITS) == []


def test_a_fine_tuned_copy_leans_toward_the_host() -> None:
    assert _leaning([6, 5, 6, 5, 118]) == [4]
    assert _leaning([129, 140, 256, 133, 144], BITS) == [2]
    [lean] = leaning([6, 5, 6, 5, 118], UNITS, alpha=DEFAULT_ALPHA, test="aligned")
    assert (lean.statistic, lean.n, lean.core_worst) == (118, UNITS, 6)
    assert lean.log10_p_value <= -9
    assert "118 of 128 host units" in lean.describe() and "at most 6" in lean.describe()


def test_a_second_copy_does_not_mask_the_first() -> None:
    """The lower half is the null: two copies in five members cannot vouch for each other
    (against the rest of the panel, each would)."""
    assert _leaning([6, 118, 5, 121, 6]) == [1, 3]
    assert _leaning([5, 120]) == [1]  # two members: the lower one is the null


@pytest.mark.parametrize(("values", "expected"), [
    ([4], [4]), ([9, 1], [1]), ([3, 1, 2], [1, 2]), ([4, 3, 2, 1], [1, 2]),
    ([5, 1, 4, 2, 3], [1, 2, 3]),
])
def test_the_lower_half_is_the_members_at_or_below_the_median(values: list[int],
                                                             expected: list[int]) -> None:
    assert core(values) == expected


def test_a_panel_of_one_has_no_null_to_judge_against() -> None:
    assert _leaning([120]) == []
