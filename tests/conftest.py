"""Shared test setup: deterministic, single-thread torch (2 shared cores: more threads oversubscribe)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
