"""Shared fixtures: paths to the bundled reference data, CPU determinism."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from mvdit.tiny import build_tiny_assets

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_defaults():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA


def tiny_inference_setup(d: Path, name: str, steps: int) -> Path:
    """Tiny stand-in checkpoints under d/checkpoints and d/exp.yaml: fp32 inference of the tiny "release" model on
    9 frames at 32x48. Returns d."""
    build_tiny_assets(d / "checkpoints")
    exp = {
        "name": name,
        "checkpoint_dir": str(d / "checkpoints"),
        "checkpoint_source": "tiny",
        "model": {"preset": "tiny"},
        "data": {"num_frames": 9, "height": 32, "width": 48, "text_len": 8},
        "infer": {"steps": steps, "precision": "fp32", "checkpoint": "release"},
    }
    (d / "exp.yaml").write_text(yaml.safe_dump(exp))
    return d


def train_command(nproc: int, experiment: Path, data_dir: Path, out: Path, tokenizer: Path, *extra) -> list[str]:
    """src/launch.py running src/train.py on `nproc` processes, as the train rule does."""
    cmd = [sys.executable, ROOT / "src/launch.py", "--nproc", str(nproc), "--", ROOT / "src/train.py"]
    cmd += ["--experiment", experiment, "--data-manifest", data_dir / "manifest.json", "--out-dir", out]
    return [str(c) for c in [*cmd, "--tokenizer-dir", tokenizer, *extra]]
