"""The server settings a billion-parameter checkpoint needs (issue 20): the upload cap follows
the parameter cap, so a checkpoint the sandbox would accept is never refused at the door for
its size, and the sandbox's CPU limit is the operator's."""

from __future__ import annotations

from pathlib import Path

import pytest

from freemark.formats.huggingface import MAX_PARAMETERS
from freemark_keyserver import cli
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.sandbox.limits import GiB


def _config(tmp_path: Path, *flags: str) -> ServerConfig:
    args = cli.build_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])
    return cli._config(args)


def test_the_default_upload_cap_holds_the_largest_bf16_checkpoint_the_parameter_cap_admits(
        tmp_path: Path) -> None:
    """Regression: the fixed 2 GiB cap refused a 1.1 B-parameter bf16 decoder (2.2 GB)."""
    config = _config(tmp_path)
    assert config.max_upload_bytes == ServerConfig(data_dir=tmp_path).max_upload_bytes == 4 * GiB
    assert config.max_upload_bytes >= 2 * MAX_PARAMETERS > 2 * 1_100_000_000 > 2 * GiB


def test_raising_max_parameters_raises_the_upload_cap_unless_it_is_set(tmp_path: Path) -> None:
    assert _config(tmp_path, "--max-parameters", "8000000000").max_upload_bytes == 15 * GiB
    assert _config(tmp_path, "--max-parameters", "8000000000",
                   "--max-upload-bytes", "1000").max_upload_bytes == 1000


def test_the_sandbox_cpu_limit_is_an_operator_setting_and_the_deadline_follows_it(
        tmp_path: Path) -> None:
    """A 1.1 B decoder's forward pass costs about 16 ms of CPU a token on one core here: a
    Register with the default 1,024 probes of 32 tokens needs minutes, past the default 120 s."""
    default = _config(tmp_path).sandbox
    assert (default.cpu_seconds, default.wall_seconds) == (120, 180.0)
    raised = _config(tmp_path, "--sandbox-cpu-seconds", "1200").sandbox
    assert (raised.cpu_seconds, raised.wall_seconds) == (1200, 1800.0)


def test_the_spool_memory_budget_and_model_root_are_operator_settings(tmp_path: Path) -> None:
    """Issue 20: a 2.2 GB decoder fits the default memory budget (uploads in sealed memfds);
    `--model-root` must name a directory, and is off unless given."""
    default = _config(tmp_path)
    assert default.spool_memory_bytes == 4 * GiB and default.model_root is None
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    named = _config(tmp_path, "--spool-memory-bytes", "0", "--model-root", str(mirror))
    assert (named.spool_memory_bytes, named.model_root) == (0, mirror)
    with pytest.raises(ValueError, match="is not a directory"):
        _config(tmp_path, "--model-root", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="memory budget"):
        _config(tmp_path, "--spool-memory-bytes", "-1")
