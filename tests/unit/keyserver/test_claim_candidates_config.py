"""The operator's bound on Register's full prior-claim checks: `freemark-keyserver serve
--claim-candidates N` (2 by default) into `ServerConfig.claim_candidates`; none at all would
let the claim index clear every copy, so 0 stops the server at start (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest

from freemark_keyserver.cli import _config, build_parser
from freemark_keyserver.config import DEFAULT_CLAIM_CANDIDATES, ServerConfig


def test_serve_takes_the_claim_candidates_it_is_told_and_two_by_default(tmp_path: Path
                                                                         ) -> None:
    parser = build_parser()
    plain = _config(parser.parse_args(["serve", "--data-dir", str(tmp_path)]))
    assert plain.claim_candidates == DEFAULT_CLAIM_CANDIDATES == 2
    told = _config(parser.parse_args(["serve", "--data-dir", str(tmp_path),
                                      "--claim-candidates", "9"]))
    assert told.claim_candidates == 9
    with pytest.raises(ValueError, match="at least one candidate"):
        ServerConfig(data_dir=tmp_path, claim_candidates=0)
