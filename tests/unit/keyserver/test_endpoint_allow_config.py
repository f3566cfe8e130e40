"""The operator's allow-list for VerifyEndpoint: `freemark-keyserver serve --endpoint-allow`
(repeatable, none by default) into `ServerConfig.endpoint_policy`; a bad entry stops the
server at start, not at the first dispute."""

from __future__ import annotations

from pathlib import Path

import pytest

from freemark.errors import InvalidInputError
from freemark_keyserver.cli import _config, build_parser


def test_serve_allow_lists_nothing_by_default_and_what_it_is_told(tmp_path: Path) -> None:
    parser = build_parser()
    plain = _config(parser.parse_args(["serve", "--data-dir", str(tmp_path)]))
    assert plain.endpoint_policy.allow == ()
    told = _config(parser.parse_args(["serve", "--data-dir", str(tmp_path), "--endpoint-allow",
                                      "10.0.0.0/8", "--endpoint-allow", "models.example"]))
    assert told.endpoint_policy.allow == ("10.0.0.0/8", "models.example")
    with pytest.raises(InvalidInputError):
        _config(parser.parse_args(["serve", "--data-dir", str(tmp_path), "--endpoint-allow",
                                   "not a host!"]))
