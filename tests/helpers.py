"""Helpers shared by the tests: paths, experiments and their data made as the rules make them, the training command
as the train rule runs it, and the Snakemake command line."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from mvdit.tiny.assets import build_tiny_assets

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


BIN = ROOT / ".venv" / "bin"


def tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", name]


def snakemake(*args, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    cmd = [*tool("snakemake"), "-s", str(ROOT / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def job_counts(text: str) -> dict[str, int]:
    counts, on = {}, False
    for line in text.splitlines():
        if line.startswith("job ") and "count" in line:
            on, counts = True, {}
            continue
        if on:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif line.startswith("total"):
                on = False
    return counts


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


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


def mock_experiment(name: str, iterations: int, save_iter: int, mock_items: int = 16, **train) -> dict:
    """The tiny model trained from scratch on upstream-style mock data (9 frames at 32x48) by 2 processes in fp32."""
    data = {"source": "mock", "mock_items": mock_items, "num_frames": 9, "height": 32, "width": 48, "text_len": 8}
    base = {"init": "scratch", "iterations": iterations, "save_iter": save_iter, "nproc": 2, "lr": 1e-3}
    base |= {"warmup_steps": 3, "precision": "fp32", "activation_checkpointing": "none"}
    return {"name": name, "model": {"preset": "tiny"}, "data": data, "train": base | train}


def prepare_experiment(d: Path, exp: dict, *prepare_args) -> Path:
    """`exp` written to d/exp.yaml and its data made under d/data by prepare_data.py, as the rule does (extra
    arguments, e.g. --t5-dir, pass through). Returns d/exp.yaml."""
    (d / "exp.yaml").write_text(yaml.safe_dump(exp))
    cmd = [ROOT / "src/prepare_data.py", "--experiment", d / "exp.yaml", "--out-dir", d / "data", *prepare_args]
    r = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "exp.yaml"


def prepare_tiny_experiment(d: Path, name: str, **sections) -> Path:
    """Tiny stand-in checkpoints under d/checkpoints, an experiment of the tiny "release" model with the given
    sections (data, train, infer) as d/exp.yaml, and its data and T5 embeddings under d/data.
    Returns d/checkpoints."""
    ck = d / "checkpoints"
    build_tiny_assets(ck)
    exp = {"name": name, "checkpoint_dir": str(ck), "checkpoint_source": "tiny", "model": {"preset": "tiny"}}
    prepare_experiment(d, exp | sections, "--t5-dir", ck / "google-t5/t5-11b", "--cache-dir", d / "t5_cache")
    return ck


def tiny_forward(net, seed=0):
    """One no-grad forward of a tiny-preset network on 2 views of random latents and text (the runtime tests)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 4, 4, 6, generator=g)
    text = torch.randn(1, 16, 1024, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([0.1]), text, n_views=2)
