"""The README's recipes: each user flow is one YAML edit and the usual snakemake command. A dry run of each asserts
exactly the jobs it plans; the flows that run on CPU run for real on the tiny model (marked slow)."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mvdit.assets.checkpoint import load_file

from .helpers import ROOT, job_counts, merged, snakemake, train_command

SETS = sorted(p.stem for p in (ROOT / "prompts").glob("*.yaml"))
DIT = "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"


def plan(tmp_path: Path, exp: dict, *extra: str) -> dict[str, int]:
    cfg = tmp_path / f"{exp['name']}.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    r = snakemake("-n", "--configfile", str(cfg), "--directory", str(tmp_path), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout)
    counts.pop("total", None)
    return counts


def shipped(experiment: str, **changes) -> dict:
    return merged(yaml.safe_load((ROOT / "experiments" / f"{experiment}.yaml").read_text()), changes)


def inference_only(downloads: int, n_sets: int = len(SETS)) -> dict[str, int]:
    return {"download": downloads, "infer": n_sets, "report": 1, "all": 1}


def post_training(downloads: int, n_sets: int = len(SETS), evaluate: bool = False) -> dict[str, int]:
    jobs = {"download": downloads, "prepare_data": 1, "train": 1, "copy_ema": 1, "infer": n_sets, "report": 1}
    return jobs | {"all": 1} | ({"evaluate": 1} if evaluate else {})


# ----------------------------------------------------------------------------------------------- dry runs


def test_recipe_demo_plans_the_whole_pipeline(tmp_path):
    assert plan(tmp_path, shipped("tiny_demo")) == post_training(3, evaluate=True)


@pytest.mark.parametrize("name", ["video2world_multiview_7b_example", "video2world_multiview_7b_lora"])
def test_recipe_7b_post_training_plans_train_and_export(tmp_path, name):
    assert plan(tmp_path, shipped(name)) == post_training(3)  # mock data: no held-out clips to evaluate


def test_recipe_inference_on_the_release_never_trains(tmp_path):
    assert plan(tmp_path, shipped("video2world_multiview_7b_release")) == inference_only(3)


def test_recipe_inference_on_a_brought_checkpoint_downloads_only_tokenizer_and_t5(tmp_path):
    exp = shipped("video2world_multiview_7b_posttrained_upstream")
    brought = tmp_path / exp["infer"]["checkpoint"]
    brought.parent.mkdir(parents=True)
    brought.write_bytes(b"the user's file")
    assert plan(tmp_path, exp) == inference_only(2)


def test_recipe_inference_on_a_missing_checkpoint_is_one_line(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump(shipped("video2world_multiview_7b_posttrained_upstream")))
    r = snakemake("-n", "--configfile", str(cfg), "--directory", str(tmp_path))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
    assert f"{cfg}: infer.checkpoint: checkpoints/{DIT}_post-trained/model.pt does not exist" in lines[0]


def test_recipe_inference_with_an_adapter_passes_it_to_every_infer_job(tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    exp = shipped("video2world_multiview_7b_release", infer={"adapter": "lora.safetensors"})
    assert plan(tmp_path, exp) == inference_only(3)
    cfg = tmp_path / f"{exp['name']}.yaml"
    r = snakemake("-n", "-p", "--configfile", str(cfg), "--directory", str(tmp_path))
    cmds = [ln for ln in r.stdout.splitlines() if "infer.py" in ln]
    assert len(cmds) == len(SETS) and all("--adapter lora.safetensors" in c for c in cmds)


def test_recipe_export_an_iteration_and_upstreams_layout(tmp_path):
    exp = shipped("video2world_multiview_7b_example", export={"iteration": 1000, "upstream_layout": True})
    assert plan(tmp_path, exp) == post_training(3) | {"upstream_layout": 1}


def test_recipe_continued_training_starts_from_another_experiments_result(tmp_path):
    other = tmp_path / "results/video2world_multiview_7b_example/post-trained/model.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    exp = shipped(
        "video2world_multiview_7b_example", name="continued", train={"init": str(other.relative_to(tmp_path))}
    )
    assert plan(tmp_path, exp) == post_training(2)  # no release download: training starts from the other result


def upstream_checkout(d: Path) -> Path:
    """Upstream's assets/diffusion/ layout with both clips its batch file names (the second a stand-in copy)."""
    clips = d / "upstream/assets/diffusion"
    clips.mkdir(parents=True)
    for name in ("video2world_multiview_input1.mp4", "video2world_multiview_input2.mp4"):
        shutil.copyfile(ROOT / "assets/video2world_multiview_input1.mp4", clips / name)
    return d / "upstream"


def test_recipe_prompt_sets_from_anywhere(tmp_path):
    entries = ["snowy_road", "assets/video2world_multiview.jsonl", str(ROOT / "prompts/synthetic_*.yaml")]
    exp = shipped("video2world_multiview_7b_release", infer={"prompt_sets": entries})
    exp["infer"]["visual_root"] = str(upstream_checkout(tmp_path))
    n_jsonl = len((ROOT / "assets/video2world_multiview.jsonl").read_text().splitlines())
    assert plan(tmp_path, exp) == inference_only(3, n_sets=1 + n_jsonl + 2)


def test_upstreams_batch_file_names_the_clip_this_repository_lacks(tmp_path):
    """Shipped as upstream ships it: its first clip resolves in the repository, its second is upstream's only."""
    exp = shipped("video2world_multiview_7b_release", infer={"prompt_sets": ["assets/video2world_multiview.jsonl"]})
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    r = snakemake("-n", "--configfile", str(cfg), "--directory", str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Missing input files for rule infer" in out
    missing = out.split("Missing input files")[1]
    assert "assets/diffusion/video2world_multiview_input2.mp4" in missing and "input1.mp4" not in missing


def test_experiments_side_by_side_plan_disjoint_outputs(tmp_path):
    """Two experiments with the same checkpoint_dir share only the downloads (written once, by whichever runs first)."""
    outputs = {}
    for name in ("video2world_multiview_7b_example", "video2world_multiview_7b_lora"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(shipped(name)))
        r = snakemake("-n", "--summary", "--configfile", str(cfg), "--directory", str(tmp_path))
        assert r.returncode == 0, r.stderr[-2000:]
        files = {ln.split("\t")[0] for ln in r.stdout.splitlines() if "\t" in ln} - {"output_file"}
        outputs[name] = {f for f in files if not f.startswith("checkpoints/")}
        assert all(f.startswith(f"results/{name}/") for f in outputs[name]), sorted(outputs[name])[:5]
    a, b = outputs.values()
    assert a and b and not a & b


# ----------------------------------------------------------------------------------------------- real runs (CPU)

TINY = {
    "checkpoint_dir": "checkpoints/tiny",
    "checkpoint_source": "tiny",
    "model": {"preset": "tiny"},
    "data": {"num_clips": 3, "held_out": 1, "num_frames": 9, "height": 32, "width": 48, "text_len": 8, "fps": 10},
    "train": {"iterations": 6, "save_iter": 3, "nproc": 1, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32"},
    "infer": {"steps": 2, "precision": "fp32", "eval_clips": 1, "eval_samples": 1, "prompt_sets": ["synthetic_stills"]},
}
TINY["train"] |= {"activation_checkpointing": "none"}


def run(workdir: Path, name: str, **changes) -> tuple[Path, object]:
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(merged(TINY, {"name": name} | changes)))
    r = snakemake("--cores", "2", "--configfile", str(cfg), "--directory", str(workdir), timeout=900)
    return cfg, r


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny experiment trained for real (6 iterations, saves at 3 and 6), exporting the regular weights of
    iteration 3 and publishing them in upstream's layout."""
    work = tmp_path_factory.mktemp("recipes")
    _, r = run(work, "first", export={"iteration": 3, "weights": "reg", "upstream_layout": True})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_export_copies_the_named_iteration_and_publishes_upstreams_layout(trained):
    res = trained / "results/first"
    post = res / "post-trained/model.pt"
    assert sha256(post) == sha256(res / "train/checkpoints/iter_000000003_reg_model.pt")
    assert json.loads((res / "post-trained/config.json").read_text())["iteration"] == 3
    upstream = trained / f"checkpoints/tiny/{DIT}_post-trained/model.pt"
    assert sha256(upstream) == sha256(post)
    assert json.loads((res / "post-trained/upstream_layout.json").read_text())["published"] == str(
        upstream.relative_to(trained)
    )
    assert (res / "report/eval.json").exists() and (res / "report/loss.png").exists()


@pytest.mark.slow
def test_a_missing_iteration_lists_the_saved_ones(trained):
    work = trained
    shutil.copytree(work / "results/first/train", work / "results/gone/train")
    (work / "results/gone/train/checkpoints/iter_000000003_reg_model.pt").unlink()
    _, r = run(work, "gone", export={"iteration": 3, "weights": "reg"})
    log = (work / "results/gone/logs/copy_ema.log").read_text().strip().splitlines()
    assert r.returncode != 0 and len(log) == 1, log
    assert log[0] == (  # names the file the user edits, not the resolved copy in results/gone
        f"copy_ema.py: {work / 'gone.yaml'}: export.iteration: iteration 3 has no reg weights in"
        " results/gone/train/checkpoints (saved: 6); set export.iteration to one of them or last"
    )


@pytest.mark.slow
def test_another_experiment_refuses_to_replace_the_published_file_unless_told(trained):
    work = trained
    upstream = work / f"checkpoints/tiny/{DIT}_post-trained/model.pt"
    before = sha256(upstream)
    shutil.copytree(work / "results/first/train", work / "results/second/train")  # skip its training
    _, r = run(work, "second", export={"upstream_layout": True}, infer={"prompt_sets": ["synthetic_stills"]})
    log = (work / "results/second/logs/upstream_layout.log").read_text().strip()
    assert r.returncode != 0 and "\n" not in log and sha256(upstream) == before
    assert "refusing to replace" in log and "written by experiment 'first'" in log
    assert "set export.replace_upstream: true" in log
    _, r = run(work, "second", export={"upstream_layout": True, "replace_upstream": True})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sha256(upstream) == sha256(work / "results/second/post-trained/model.pt") != before


@pytest.mark.slow
def test_inference_only_on_a_brought_checkpoint_never_writes_it(trained):
    work = trained
    brought = work / "mine/model.pt"
    brought.parent.mkdir()
    shutil.copyfile(work / "results/first/post-trained/model.pt", brought)
    before = sha256(brought)
    _, r = run(work, "bring", infer={"checkpoint": "mine/model.pt"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sha256(brought) == before
    res = work / "results/bring"
    assert not (res / "train").exists() and not (res / "data").exists() and not (res / "post-trained").exists()
    meta = json.loads((res / "infer/synthetic_stills/synthetic_stills.json").read_text())
    assert meta["checkpoint"] == "mine/model.pt" and meta["checkpoint_sha256"] == before
    assert "train" not in json.loads((res / "report/metrics.json").read_text())


@pytest.mark.slow
def test_upstreams_jsonl_and_a_front_only_set_run_with_the_experiments_defaults(tmp_path):
    root = upstream_checkout(tmp_path)
    front_only = tmp_path / "front_only.yaml"
    front_only.write_text(
        yaml.safe_dump({"input": str(ROOT / "assets/synthetic_highway.mp4"), "prompts": {"front": "A road."}})
    )
    entries = ["assets/video2world_multiview.jsonl", str(front_only)]
    _, r = run(
        tmp_path,
        "sets",
        infer={
            "checkpoint": "release",
            "prompt_sets": entries,
            "visual_root": str(root),
            "num_input_frames": 9,
            "seed": 5,
        },
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "results/sets/infer"
    for name in ("video2world_multiview_0", "video2world_multiview_1"):
        meta = json.loads((out / name / f"{name}.json").read_text())
        assert meta["settings"]["num_input_frames"] == 9 and meta["settings"]["seed"] == 5
        assert meta["default_prompts"] == [] and meta["input"].startswith(str(root))
    meta = json.loads((out / "front_only/front_only.json").read_text())
    assert meta["default_prompts"] == ["left", "right", "back", "back_left", "back_right"]
    assert meta["prompts"]["left"].startswith("The video is captured from a camera mounted on a car.")


@pytest.mark.slow
def test_continued_training_starts_from_the_other_result_strictly(trained):
    work = trained
    start = "results/first/post-trained/model.pt"
    _, r = run(work, "continued", train={"init": start, "iterations": 3, "save_iter": 3, "lr": 5e-4})
    assert r.returncode == 0, r.stderr[-3000:]
    log = (work / "results/continued/logs/train.log").read_text()
    assert f"from {start}" in log and "(0 re-initialised)" in log
    # the evaluation compares the continued model with the one it started from
    ev = json.loads((work / "results/continued/report/eval.json").read_text())
    assert ev["baseline"] == start
    first = load_file(work / start)
    cont = load_file(work / "results/continued/post-trained/model.pt")
    assert first.keys() == cont.keys() and any(not torch.equal(first[k], cont[k]) for k in first)
    # resume stays exact: stop after iteration 2 (of its own 3), rerun, and land on the same weights bit for bit
    res = work / "results/continued"
    tok = work / "checkpoints/tiny/Cosmos-Tokenize1-CV8x8x8-720p"
    cmd = train_command(1, res / "experiment.yaml", res / "data", work / "again", tok, "--save-iter", "1")
    for extra in (["--iterations", "2"], []):
        r = subprocess.run([*cmd, *extra], cwd=work, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "iter_000000002 at iteration 2" in r.stderr
    again = load_file(work / "again/checkpoints/iter_000000003_ema_model.pt")
    ref = load_file(res / "train/checkpoints/iter_000000003_ema_model.pt")
    assert all(torch.equal(again[k], ref[k]) for k in ref)
