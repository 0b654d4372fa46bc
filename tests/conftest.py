"""Shared fixtures: paths to the bundled reference data, CPU determinism."""

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_defaults():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA
