"""Shared test setup: deterministic, single-thread torch (2 shared cores: more threads
oversubscribe), and a root logger put back after every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """`freemark-keyserver`'s `main` installs a stderr handler on the root logger, bound to
    the stream of the test that ran it; later tests must not log into that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
