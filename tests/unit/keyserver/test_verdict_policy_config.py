"""The operator's verdict policy as `freemark-keyserver serve` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from freemark.records.types import VerdictPolicy
from freemark_keyserver import cli
from freemark_keyserver.config import ServerConfig, default_policy
from freemark_keyserver.handlers.vetting import reach_alpha


def _config(tmp_path: Path, *flags: str) -> ServerConfig:
    args = cli.build_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])
    return cli._config(args)


def test_the_default_policy_is_coarse_with_the_documented_range(tmp_path: Path) -> None:
    policy = _config(tmp_path).verdict_policy
    assert (policy.alpha_min, policy.alpha_max, policy.arbiter_disclosure) == (
        1e-12, 1e-6, "coarse")
    assert policy == default_policy() == ServerConfig(data_dir=tmp_path).verdict_policy


def test_the_flags_set_the_policy_and_its_id_follows(tmp_path: Path) -> None:
    policy = _config(tmp_path, "--alpha-min", "1e-15", "--alpha-max", "1e-9",
                     "--arbiter-disclosure", "full").verdict_policy
    assert (policy.alpha_min, policy.alpha_max, policy.arbiter_disclosure) == (
        1e-15, 1e-9, "full")
    assert policy.id == policy.expected_id != default_policy().id


@pytest.mark.parametrize("flags", [("--alpha-min", "1e-6", "--alpha-max", "1e-9"),
                                   ("--alpha-max", "1"), ("--alpha-min", "0")])
def test_an_impossible_range_refuses_to_start(tmp_path: Path, flags: tuple[str, ...],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--data-dir", str(tmp_path), *flags]) == 2
    assert "alpha_min <= alpha_max" in capsys.readouterr().err


def test_panel_reach_refuses_by_default_and_warns_when_asked(tmp_path: Path) -> None:
    """Issue 18, item 7: what Register does with a panel that cannot reach alpha."""
    assert _config(tmp_path).panel_reach == "refuse" == ServerConfig(data_dir=tmp_path).panel_reach
    assert _config(tmp_path, "--panel-reach", "warn").panel_reach == "warn"
    with pytest.raises(ValueError, match="panel reach"):
        ServerConfig(data_dir=tmp_path, panel_reach="ignore")


@pytest.mark.parametrize(("alpha_min", "alpha_max", "checked"), [
    (1e-12, 1e-6, 1e-9), (1e-15, 1e-10, 1e-10), (1e-8, 1e-6, 1e-8)])
def test_the_panel_is_checked_at_the_alpha_a_verify_signs_by_default(
        alpha_min: float, alpha_max: float, checked: float) -> None:
    policy = VerdictPolicy.make(alpha_min=alpha_min, alpha_max=alpha_max,
                                arbiter_disclosure="coarse")
    assert reach_alpha(policy) == checked
