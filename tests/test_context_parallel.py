"""Context-parallel inference: processes that share one sample's tokens compute what one process computes.

Two (or three) gloo processes on the CPU run the tiny network, the sampler and the whole infer.py, and are compared
with one process: network outputs to float rounding, sampled latents and the written videos exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from mvdit.constants import CAMERAS
from mvdit.data.prompts import JSONL_KEYS
from mvdit.data.video_io import read_video
from mvdit.inference.generate import generate
from mvdit.model.config import get_preset
from mvdit.model.network import Attention, MultiviewDiT, ViewRuns
from mvdit.runtime import context_parallel
from mvdit.runtime.compile import compile_blocks
from mvdit.runtime.context_parallel import shard_bounds

from .helpers import prepare_tiny_experiment, tiny_inference_setup

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DIT = "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"

# (views, latent frames per view, latent h, latent w): 5 views x 3 frames x 1x3 patches = 45 tokens, so two
# processes hold 23 + 22 (uneven) and the split falls inside a view; 6 views x 2 x 2x3 = 72 splits on view edges.
CASES = {"uneven_mid_view": (5, 3, 2, 6), "even_on_view_edges": (6, 2, 4, 6)}


def test_shard_bounds_cover_the_sequence_in_order():
    for n in (1, 7, 45, 76320):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_view_runs_split_a_slice_at_view_edges():
    assert shard_bounds(45, 1, 2) == (23, 45)  # tokens 23..44 of 5 views of 9
    assert ViewRuns.of(5, 45, 23, 45).runs == ((0, 4, 2), (4, 13, 3), (13, 22, 4))
    assert ViewRuns.of(6, 72, 0, 36).runs == ((0, 12, 0), (12, 24, 1), (24, 36, 2))
    assert ViewRuns.of(6, 72).whole and not ViewRuns.of(6, 72, 0, 36).whole and not ViewRuns.of(2, 9, 1, 9).whole


def tiny_net(seed: int = 0) -> MultiviewDiT:
    net = MultiviewDiT(get_preset("tiny"))
    net.init_weights(torch.Generator().manual_seed(seed))
    return net.eval()


def inputs(views: int, t: int, h: int, w: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    cfg = get_preset("tiny")
    return {
        "x": torch.randn(batch, 16, views * t, h, w, generator=g),
        "timesteps": torch.full((batch,), 0.3),
        "crossattn_emb": torch.randn(batch, views * 8, cfg.crossattn_emb_channels, generator=g),
        "condition_video_input_mask": (torch.rand(batch, 1, views * t, h, w, generator=g) > 0.5).float(),
        "fps": torch.full((batch,), 10.0),
        "frame_repeat": torch.rand(batch, views, generator=g),
        "n_views": views,
        "view_indices": torch.arange(views),
    }


def _worker(rank: int, world: int, init: str, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        net = tiny_net()
        context_parallel.enable(net, mode=mode)
        results = {}
        with torch.no_grad():
            for name, shape in CASES.items():
                results[name] = net(**inputs(*shape))
                results[name + "_batch2"] = net(**inputs(*shape, batch=2))
            gt = 0.5 * torch.randn(1, 16, 5 * 3, 2, 6, generator=torch.Generator().manual_seed(2))
            text = torch.randn(1, 5 * 8, 1024, generator=torch.Generator().manual_seed(3))
            results["sample"] = generate(net, gt, text, list(CAMERAS[:5]), 1, steps=3, guidance=3.0, progress=False)
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, mode", [(2, "ulysses"), (2, "allgather"), (3, "allgather"), (4, "auto")])
def test_context_parallel_forward_and_sampling_match_one_process(tmp_path, world, mode):
    """The tiny model has 4 heads: ulysses for 2 and 4 processes (auto picks it for 4), allgather for 3."""
    args = (world, f"file://{tmp_path}/store", str(tmp_path), mode)
    mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
    torch.set_num_threads(1)
    net = tiny_net()
    got = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    with torch.no_grad():
        for name, shape in CASES.items():
            for suffix, batch in (("", 1), ("_batch2", 2)):
                ref = net(**inputs(*shape, batch=batch))
                for r in range(world):  # every rank ends with the whole output
                    torch.testing.assert_close(got[r][name + suffix], ref, rtol=1e-5, atol=1e-5)
                    assert torch.equal(got[r][name + suffix], got[0][name + suffix])  # and the same one
        gt = 0.5 * torch.randn(1, 16, 5 * 3, 2, 6, generator=torch.Generator().manual_seed(2))
        text = torch.randn(1, 5 * 8, 1024, generator=torch.Generator().manual_seed(3))
        ref = generate(net, gt, text, list(CAMERAS[:5]), 1, steps=3, guidance=3.0, progress=False)
    for r in range(world):
        torch.testing.assert_close(got[r]["sample"], ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[r]["sample"], got[0]["sample"])


def _compiled_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        net = tiny_net()
        context_parallel.enable(net, mode="ulysses")
        compile_blocks(net)  # dynamo traces the functional collectives inside each block
        with torch.no_grad():
            out = net(**inputs(*CASES["even_on_view_edges"]))
        save_file({"out": out.contiguous()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_with_context_parallelism_match_one_process(tmp_path):
    mp.start_processes(
        _compiled_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, start_method="spawn"
    )
    with torch.no_grad():
        ref = tiny_net()(**inputs(*CASES["even_on_view_edges"]))
    for r in range(2):  # inductor fuses differently from eager: float rounding only
        torch.testing.assert_close(load_file(tmp_path / f"rank{r}.safetensors")["out"], ref, rtol=1e-4, atol=1e-4)


def test_ulysses_refuses_a_process_count_that_does_not_divide_the_heads():
    net = tiny_net()
    with pytest.raises(ValueError, match="3 processes to divide 4 heads"):
        context_parallel.install(net, context_parallel.ContextParallel(group=None, rank=0, world=3, mode="ulysses"))
    assert all(type(m).attention_fn is m.attention_fn for m in net.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError, match="mode must be one of"):
        context_parallel.ContextParallel.of(None, mode="ring")


def test_a_disabled_model_is_the_plain_model():
    net = tiny_net()
    with torch.no_grad():
        ref = net(**inputs(*CASES["uneven_mid_view"]))
        assert context_parallel.install(net, context_parallel.ContextParallel(group=None, rank=0, world=1)) is None
        assert torch.equal(net(**inputs(*CASES["uneven_mid_view"])), ref)  # world 1: nothing is split
        sharding = context_parallel.install(net, context_parallel.ContextParallel(group=None, rank=0, world=2))
        assert isinstance(net.blocks["block0"].blocks[0].block.attn.attention_fn, context_parallel.ShardedAttention)
        context_parallel.disable(net)
        assert sharding is not None and not net._forward_pre_hooks and not net.final_layer._forward_hooks
        assert all(type(m).attention_fn is m.attention_fn for m in net.modules() if isinstance(m, Attention))
        assert torch.equal(net(**inputs(*CASES["uneven_mid_view"])), ref)
    assert "context_parallel" not in "".join(net.state_dict())


# ---------------------------------------------------------------------------------------------- infer.py end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_inference_setup(tmp_path_factory.mktemp("cp"), "cp", steps=3)


def infer_cmd(tiny: Path, out: str, nproc: int) -> list[str]:
    ck = tiny / "checkpoints"
    args = ["--experiment", tiny / "exp.yaml", "--prompt-set", ROOT / "prompts/synthetic_highway.yaml"]
    args += ["--checkpoint", ck / DIT / "model.pt", "--out-dir", tiny / out, "--project-root", ROOT]
    args += ["--tokenizer-dir", ck / "Cosmos-Tokenize1-CV8x8x8-720p", "--t5-dir", ck / "google-t5/t5-11b"]
    args += ["--cache-dir", tiny / "t5_cache", "--device", "cpu"]
    prog = [SRC / "infer.py", *args]
    cmd = [sys.executable, *prog] if nproc == 1 else [sys.executable, SRC / "launch.py", "--nproc", nproc, "--", *prog]
    return [str(c) for c in cmd]


def test_infer_with_two_processes_writes_the_same_videos_as_one(tiny):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    one = subprocess.run(infer_cmd(tiny, "one", 1), capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(infer_cmd(tiny, "two", 2), capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    for cam in CAMERAS:
        a, b = read_video(tiny / "one" / f"{cam}.mp4")[0], read_video(tiny / "two" / f"{cam}.mp4")[0]
        assert a.shape == b.shape and a.shape[0] == 9
        assert np.array_equal(a, b), f"{cam}: max difference {np.abs(a.astype(int) - b.astype(int)).max()}"
    m1 = json.loads((tiny / "one/synthetic_highway.json").read_text())
    m2 = json.loads((tiny / "two/synthetic_highway.json").read_text())
    assert m1["context_parallel"] == 1 and m2["context_parallel"] == 2
    assert m1["latent_sha256"] == m2["latent_sha256"]
    # only the main process writes: one set of files, no per-rank leftovers
    assert sorted(p.name for p in (tiny / "two").iterdir()) == sorted(p.name for p in (tiny / "one").iterdir())


def test_a_bad_input_stops_every_process_with_the_one_line_error(tiny):
    cmd = infer_cmd(tiny, "bad", 2)
    cmd[cmd.index("--checkpoint") + 1] = str(tiny / "missing/model.pt")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("infer.py")]
    assert lines and all(
        "missing/model.pt does not exist: run the train and copy_ema rules first" in ln for ln in lines
    )
    assert any(ln.startswith("infer.py: ") for ln in lines)  # the main process, untagged
    assert not (tiny / "bad").exists()


def test_fp8_where_it_cannot_run_stops_before_any_model_loads(tiny, tmp_path):
    exp = yaml.safe_load((tiny / "exp.yaml").read_text())
    exp["infer"]["precision"] = "fp8"
    (tmp_path / "fp8.yaml").write_text(yaml.safe_dump(exp))
    cmd = infer_cmd(tiny, "fp8", 1)
    cmd[cmd.index("--experiment") + 1] = str(tmp_path / "fp8.yaml")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("infer.py")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"infer.py: {tmp_path / 'fp8.yaml'}: infer.precision: fp8 ")
    assert lines[0].endswith("set infer.precision: bf16") and "t5" not in r.stderr.lower()
    assert not (tiny / "fp8").exists()


def processes_naming(text: str) -> list[int]:
    """PIDs of the live processes whose command line contains `text`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_text() and "zombie" not in (d / "status").read_text():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("failing", [1, 0])
def test_one_failing_process_gives_its_one_line_error_and_torchrun_stops_the_rest(tiny, tmp_path, failing):
    """Two prompt sets (upstream's JSONL) on 2 processes; one process alone runs out of memory while sampling the
    second set. It prints the one-line error (tagged [rank 1] unless it is the main process), no process prints a
    traceback, the other one stops too (exit 1, bounded time, no process left), and the first set's outputs stay."""
    d = yaml.safe_load((ROOT / "prompts/synthetic_highway.yaml").read_text())
    rec = {"visual_input": str(ROOT / d["input"]), "num_input_frames": 1}
    rec |= {key: d["prompts"][cam] for cam, key in JSONL_KEYS.items()}
    sets = tmp_path / "two_sets.jsonl"
    sets.write_text(json.dumps(rec) + "\n" + json.dumps(rec | {"seed": 7}) + "\n")
    out = f"one_fails_{failing}"
    cmd = infer_cmd(tiny, out, 2)
    cmd[cmd.index("--prompt-set") + 1] = str(sets)
    env = os.environ | {"MVDIT_DEBUG_OOM": f"{failing}:two_sets_1"}  # fault injection (src/infer.py)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    tag = "" if failing == 0 else f" [rank {failing}]"
    said = [re.search(r"infer\.py( \[rank \d+\])?: .*", ln) for ln in r.stderr.splitlines()]
    lines = [m.group(0) for m in said if m]
    assert [ln for ln in lines if "out of GPU memory" in ln] == [
        f"infer.py{tag}: out of GPU memory (CUDA out of memory (injected on rank {failing})); "
        "set infer.offload_text_encoder and infer.offload_tokenizer, use bf16, or fewer data.cameras"
    ], r.stderr[-3000:]
    assert 'infer.py", line' not in r.stderr, r.stderr[-5000:]  # no traceback from any process (torchrun has its own)
    assert not processes_naming(str(tiny / out)), "a process of the failed run is still alive"
    print(f"failed run ended after {took:.1f} s")
    done = tiny / out
    assert (done / "two_sets_0.json").exists() and (done / "two_sets_0_grid.mp4").exists()  # the first set is kept
    assert not list(done.glob("two_sets_1*"))


# ---------------------------------------------------------------------------------------------- evaluate.py end to end


def test_evaluate_with_two_processes_scores_the_same_as_one(tmp_path):
    ck = prepare_tiny_experiment(
        tmp_path,
        "cp_eval",
        data={"num_clips": 2, "held_out": 1, "num_frames": 17, "height": 32, "width": 48, "text_len": 8},
        infer={"steps": 2, "precision": "fp32", "eval_clips": 1, "eval_samples": 2},
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    release = ck / DIT / "model.pt"

    def evaluate(nproc: int, tokenizer: Path, out: str) -> subprocess.CompletedProcess:
        prog = [SRC / "evaluate.py", "--experiment", tmp_path / "exp.yaml", "--data-manifest"]
        prog += [tmp_path / "data/manifest.json", "--trained", release, "--baseline", release, "--device", "cpu"]
        prog += ["--tokenizer-dir", tokenizer, "--out", tmp_path / out]
        launch = [] if nproc == 1 else [SRC / "launch.py", "--nproc", nproc, "--"]
        cmd = [sys.executable, *map(str, [*launch, *prog])]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    scores = {}
    for nproc in (1, 2):
        r = evaluate(nproc, ck / "Cosmos-Tokenize1-CV8x8x8-720p", f"eval{nproc}.json")
        assert r.returncode == 0, r.stderr[-3000:]
        scores[nproc] = json.loads((tmp_path / f"eval{nproc}.json").read_text())
    one, two = scores[1], scores[2]
    assert one["context_parallel"] == 1 and two["context_parallel"] == 2
    assert one["clips"] == 1 and all(np.isfinite(v) for v in one["psnr_db"].values())
    assert one["psnr_db_per_clip"] == two["psnr_db_per_clip"]
    assert one["single_sample_metrics"] == two["single_sample_metrics"]
    # a broken tokenizer is a one-line error, not a traceback
    r = evaluate(1, tmp_path, "bad.json")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("evaluate.py: ")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(tmp_path) in lines[0] and not (tmp_path / "bad.json").exists()
