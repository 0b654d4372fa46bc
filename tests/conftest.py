"""Shared fixtures: the bundled reference data, CPU determinism, one intra-op thread. Shared helper functions are in
tests/helpers.py."""

from pathlib import Path

import pytest
import torch

from .helpers import DATA


@pytest.fixture(autouse=True)
def _cpu_defaults():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny-model ops are far slower with several intra-op threads (10x on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data_dir() -> Path:
    return DATA
