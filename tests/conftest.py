"""Shared test configuration: one torch thread per worker, float64 references."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed-seed CPU generator; tests draw randomness only from explicit generators."""
    return torch.Generator().manual_seed(0)
