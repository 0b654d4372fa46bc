"""Numerics against the upstream reference vectors (fp32, CPU), and the `python -m mvdit.refvec` checker itself.

The tight checks hold every stored tensor to its own bound in tests/data/refvec_bounds.json: 4x the error measured on
the public vectors (python -m mvdit.refvec tests/data/*.safetensors --record-bounds tests/data/refvec_bounds.json),
at least 1e-6 x max|ref|. The CLI's default stays the vectors' README rule, allclose(1e-4, 1e-4).
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mvdit.model import sampler
from mvdit.refvec.check import check_file, compare, load_bounds, main, output_keys, run_file

from .helpers import DATA

VECTORS = sorted(p.name for p in DATA.glob("*.safetensors"))
BOUNDS_FILE = DATA / "refvec_bounds.json"
BOUNDS = load_bounds(BOUNDS_FILE)


@pytest.mark.parametrize("name", VECTORS)
def test_public_vector_matches_within_its_tight_bounds(name):
    """Every stored output is computed, passes the README's rule, and stays within its own measured bound."""
    mine, ref = run_file(DATA / name)
    outputs = output_keys(load_file(str(DATA / name)))
    rows = compare(mine, ref)
    assert set(outputs) <= {r.name for r in rows if r.max_abs == r.max_abs}, "outputs not computed"
    assert not [(r.name, r.max_abs) for r in rows if not r.ok]
    assert name in BOUNDS, f"{name} has no bounds: rerun --record-bounds"
    assert set(outputs) <= set(BOUNDS[name]), "a stored output without a bound"
    assert not [(r.name, r.max_abs, r.rule) for r in compare(mine, ref, BOUNDS[name]) if not r.ok]


def test_bounds_are_at_most_4x_the_measured_errors():
    """The table cannot be loosened by hand: each bound is 4x its measured error, or 1e-6 of the tensor's max
    (rounded to 3 digits)."""
    rec = json.loads(BOUNDS_FILE.read_text())
    assert rec["headroom"] == 4.0 and rec["floor_rel"] == 1e-6
    for f, rows in rec["files"].items():
        for k, v in rows.items():
            assert v["bound"] <= 1.01 * max(4 * v["measured"], 1e-6 * v["max_ref"]), (f, k)
    # the measured errors the README quotes, per vector kind
    worst = {f: max(v["measured"] for v in rows.values()) for f, rows in rec["files"].items()}
    assert worst["net_fwd_v6_s0.safetensors"] < 2.5e-6
    assert worst["denoise_v6_s0.safetensors"] < 2.1e-5 and worst["denoise_v6_s0_fixed.safetensors"] < 2.1e-5
    assert worst["sample_v6_s0.safetensors"] < 6.2e-5 and worst["sample_v6_s0_fixed.safetensors"] < 6.2e-5
    assert worst["train_loss_v6_s0.safetensors"] < 5e-6
    assert rec["files"]["sample_v6_s0.safetensors"]["euler35.output"]["measured"] < 5e-6


@pytest.mark.parametrize("name", ["sample_v6_s0_fixed.safetensors", "sample_v6_s0_lean.safetensors"])
def test_initial_noise_scale_80_fails_on_the_tensors_that_store_it(name, monkeypatch, tmp_path):
    """The Euler path starts from z sqrt(80^2 + 1): a sampler that used 80 must fail on the stored scale and on the
    first state (x_in of step 0; the lean layout stores x_next of step 0), not only downstream."""
    monkeypatch.setattr(sampler, "init_noise_sigma", lambda sigma_max=80.0: sigma_max)
    rows = {r.name: r for r in check_file(DATA / name, bounds=BOUNDS[name])}
    first = "euler4.step0.x_in" if name.endswith("_fixed.safetensors") else "euler4.step0.x_next"
    for key in ("euler4.init_noise_sigma", "euler35.init_noise_sigma", first):
        assert not rows[key].ok, key
    # the README's allclose(1e-4, 1e-4) lets the scale itself through (|80.00625 - 80| < 1e-4 + 1e-4 * 80)
    assert {r.name: r for r in check_file(DATA / name)}["euler4.init_noise_sigma"].ok


def test_cli_holds_listed_files_to_their_bounds(tmp_path, capsys):
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)
    bounds = json.loads(BOUNDS_FILE.read_text())
    bounds["files"]["net_fwd_v6_s0.safetensors"]["output"]["bound"] = 1e-7  # below the measured 2.1e-6
    (tmp_path / "b.json").write_text(json.dumps(bounds))
    f = str(tmp_path / "net_fwd_v6_s0.safetensors")
    assert main([f, "--bounds", str(BOUNDS_FILE)]) == 0
    assert main([f, "--bounds", str(tmp_path / "b.json")]) == 1
    assert "FAIL output" in capsys.readouterr().out
    assert main([f, "--record-bounds", str(tmp_path / "rec.json")]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())["files"]["net_fwd_v6_s0.safetensors"]["output"]
    assert rec["bound"] == pytest.approx(max(4 * rec["measured"], 1e-6 * rec["max_ref"]), rel=1e-2)


def test_lean_file_is_checked_along_our_own_trajectory(tmp_path):
    """The lean layout stores per step only x0 / x_next (per RES call sigma / x0): every one of them is computed."""
    t = load_file(str(DATA / "sample_v6_s0_lean.safetensors"))
    assert not any(k.endswith((".x_in", ".F_cond", ".x0_cond")) for k in t)
    rows = check_file(DATA / "sample_v6_s0_lean.safetensors")
    assert {r.name for r in rows} == set(output_keys(t)) and all(r.ok for r in rows)
    assert {"euler4.step3.x_next", "res4.call4.x0", "res4.call2.sigma"} <= {r.name for r in rows}
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def bump(t):
        t["euler4.step1.x_next"][0, 3, 5, 2, 2] += 1e-3

    f = rewrite(DATA / "sample_v6_s0_lean.safetensors", tmp_path / "lean.safetensors", bump)
    assert {r.name for r in check_file(f) if not r.ok} == {"euler4.step1.x_next"}


def edit_json(meta, key, fn):
    value = json.loads(meta[key])
    fn(value)
    meta[key] = json.dumps(value)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("sample_v6_s0_fixed", lambda m: m.pop("compat"), "metadata lacks 'compat'"),
        ("denoise_v6_s0", lambda m: edit_json(m, "args", lambda a: a.pop("guidance")), "'args.guidance'"),
        ("sample_v6_s0_lean", lambda m: m.pop("augment_sigma"), "'augment_sigma'"),
        ("denoise_v6_s0", lambda m: m.pop("video_cond_bool_train"), "'video_cond_bool_train."),
        ("net_fwd_v6_s0", lambda m: m.pop("shapes"), "'shapes.V'"),
        ("train_loss_v6_s0", lambda m: m.pop("model_config"), "'model_config."),
        (
            "train_loss_v6_s0",
            lambda m: edit_json(m, "model_config", lambda c: c.update(loss_scale=2.0)),
            "model_config.loss_scale = 2.0 is not supported",
        ),
        ("denoise_v6_s0", lambda m: m.update(sigma_data="0.25"), "sigma_data = 0.25 is not supported"),
    ],
)
def test_file_missing_a_setting_is_refused_in_one_line(name, change, message, tmp_path, capsys):
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path / "w.safetensors")
    f = rewrite(DATA / f"{name}.safetensors", tmp_path / "v.safetensors", change_meta=change)
    assert main([str(f), "--weights", str(tmp_path / "w.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ERROR {f}: ") and message in err, err


def test_training_noise_distributions_are_read_from_the_file(tmp_path):
    """sigma and sigma_aug follow from their stored uniforms through the file's own laws (model_config)."""
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def drop_sigma(t):
        t.pop("case1.sigma")  # now derived from case1.rand.sigma_u through sde.p_mean / p_std

    def shift(meta):
        edit_json(meta, "model_config", lambda c: c["sde"].update(p_mean=0.1))
        edit_json(meta, "model_config", lambda c: c["video_cond_bool"].update(augment_sigma_sample_p_std=1.5))

    f = rewrite(DATA / "train_loss_v6_s0.safetensors", tmp_path / "tl.safetensors", drop_sigma, shift)
    bad = {r.name for r in check_file(f) if not r.ok}
    # case1's sigma now comes from the shifted law; every stored sigma / sigma_aug disagrees with its uniform
    assert {"case1.xt", "case1.loss", "case0.sigma", "case2.sigma"} <= bad
    assert {"case0.aug_sigma", "case1.aug_sigma", "case2.aug_sigma"} <= bad
    assert "case0.xt" not in bad  # a stored sigma is used as stored


def test_denoise_train_path_reads_its_augmentation_sigma(tmp_path):
    shutil.copy(DATA / "net_fwd_v6_s0.safetensors", tmp_path)

    def bump(meta):
        edit_json(
            meta, "video_cond_bool_train", lambda v: v.update(apply_corruption_to_condition_region_sigma_value=[0.05])
        )

    f = rewrite(DATA / "denoise_v6_s0.safetensors", tmp_path / "d.safetensors", change_meta=bump)
    bad = {r.name for r in check_file(f) if not r.ok}
    assert "train.cond.xt" in bad and not any(n.startswith("infer.") for n in bad)


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
