"""Shared test setup: deterministic, two-thread torch (the CI machine has 2 cores)."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
