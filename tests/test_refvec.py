"""Numerics against the upstream reference vectors (fp32, CPU), and the `python -m mvdit.refvec` checker itself."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mvdit.refvec import check_file, main

from .conftest import DATA

VECTORS = sorted(p.name for p in DATA.glob("*.safetensors"))


@pytest.mark.parametrize("name", VECTORS)
def test_public_vector_matches(name):
    rows = check_file(DATA / name)
    t = load_file(str(DATA / name))
    outputs = [k for k in t if not k.startswith(("input.", "net.", "logvar.")) and ".rand." not in k]
    checked = {r.name for r in rows}
    assert set(outputs) <= checked, f"outputs not computed: {sorted(set(outputs) - checked)[:5]}"
    bad = [(r.name, r.max_abs) for r in rows if not r.ok]
    assert not bad


def rewrite(src, dst, change_tensors=None, change_meta=None):
    meta = safe_open(str(src), "pt").metadata()
    t = load_file(str(src))
    if change_tensors:
        change_tensors(t)
    if change_meta:
        change_meta(meta)
    save_file(t, str(dst), metadata=meta)
    return dst


def test_checker_fails_on_a_perturbed_output(tmp_path, capsys):
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def bump(t):
        t["euler4.step2.x0"][0, 0, 3, 0, 0] += 1e-3

    bad = rewrite(DATA / "sample_v6_s0_fixed.safetensors", tmp_path / "sample_bad.safetensors", bump)
    assert main([str(bad)]) == 1
    assert "FAIL euler4.step2.x0" in capsys.readouterr().out
    good = DATA / "net_fwd_v6_s0.safetensors"
    assert main([str(good)]) == 0


def test_compat_flag_is_read_from_metadata(tmp_path):
    """A fixed file relabelled as head must fail: the switch really changes the computation."""
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def relabel(meta):
        meta["compat"] = "head"

    f = rewrite(DATA / "denoise_v6_s0_fixed.safetensors", tmp_path / "d.safetensors", change_meta=relabel)
    bad = {r.name for r in check_file(f) if not r.ok}
    assert bad == {"infer.model_output", "infer.x0"}


def test_missing_weights_file_is_a_clear_error(tmp_path, capsys):
    shutil.copy(DATA / "denoise_v6_s0.safetensors", tmp_path)
    assert main([str(tmp_path / "denoise_v6_s0.safetensors")]) == 1
    assert "pass --weights FILE" in capsys.readouterr().err
    assert (
        main([str(tmp_path / "denoise_v6_s0.safetensors"), "--weights", str(DATA / "net_fwd_v6_s0.safetensors")]) == 0
    )


def test_train_loss_replays_without_derivable_or_inert_tensors(tmp_path):
    """Hidden train_loss files may omit sigma (derive it from the stored uniform) and inert random inputs."""
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def drop(t):
        # case 0 has n = 0 (augmentation inert), case 2 conditions every frame (epsilon inert); a file that leaves
        # out those inputs leaves out the intermediates made from them too
        inert = ("case0.rand.aug_noise", "case0.aug_latent_scaled", "case2.rand.epsilon", "case2.xt")
        for k in ("case0.sigma", "case0.aug_sigma", "case0.xt", *inert):
            t.pop(k)

    f = rewrite(DATA / "train_loss_v6_s0.safetensors", tmp_path / "tl.safetensors", drop)
    rows = check_file(f)
    assert all(r.ok for r in rows), [r.name for r in rows if not r.ok]
    assert {"case0.loss", "case2.loss", "case1.grad.norm_all"} <= {r.name for r in rows}


def test_train_loss_case_conditioning_every_frame_trains_only_logvar():
    t = load_file(str(DATA / "train_loss_v6_s0.safetensors"))
    meta = json.loads(safe_open(str(DATA / "train_loss_v6_s0.safetensors"), "pt").metadata()["cases"])
    assert meta[2]["n_cond"] == 2
    assert float(t["case2.loss"]) == pytest.approx(float(t["case2.logvar"]), abs=1e-6)
    rows = {r.name: r for r in check_file(DATA / "train_loss_v6_s0.safetensors")}
    assert rows["case2.grad.norm_net"].ok and rows["case2.mse_loss"].max_abs == 0.0
    assert torch.isfinite(t["case2.loss"])
