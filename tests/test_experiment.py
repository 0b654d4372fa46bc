"""Experiment YAML validation: defaults, unknown keys, wrong types and impossible combinations are one-line errors."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from mvdit.training.ema import ema_beta, ema_gamma
from mvdit.training.loss import LossConfig, draw_loss_randomness, loss_config
from mvdit.training.optim import lr_multiplier
from mvdit.workflow.experiment import (
    DataCfg,
    Experiment,
    ExperimentError,
    ExportCfg,
    InferCfg,
    LoraCfg,
    ModelCfg,
    TrainCfg,
    check_files,
    load_experiment,
    load_schema,
    resolved_yaml,
    validate,
)

from .helpers import ROOT


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_shipped_experiment_validates(name):
    exp = load_experiment(ROOT / "experiments" / name)
    assert exp.name == name.removesuffix(".yaml") and exp.train.iterations >= 1


def test_7b_example_has_upstreams_settings():
    exp = load_experiment(ROOT / "experiments" / "video2world_multiview_7b_example.yaml")
    t, d = exp.train, exp.data
    assert (d.num_frames, d.height, d.width, len(d.cameras)) == (57, 480, 848, 6)
    assert (t.iterations, t.save_iter, t.batch_size) == (2000, 200, 1)
    assert t.lr == pytest.approx(2**-14.3) and t.betas == (0.9, 0.99) and t.eps == 1e-10
    assert t.weight_decay == 0.1 and t.warmup_steps == 2500 and t.ema_rate == 0.1
    assert d.source == "mock" and exp.model.preset == "7b-multiview" and exp.trains
    assert loss_config(t) == LossConfig()  # upstream's noise levels, dropout and condition frames


def test_the_demo_trains_its_own_noise_levels_and_condition_frames_and_the_draws_follow():
    t = load_experiment(ROOT / "experiments" / "tiny_demo.yaml").train
    cfg = loss_config(t)
    assert (cfg.p_mean, cfg.p_std) == (t.sigma_p_mean, t.sigma_p_std) == (0.5, 1.5)
    assert (cfg.min_cond_frames, cfg.max_cond_frames) == (t.min_cond_frames, t.max_cond_frames) == (2, 2)
    x0 = torch.zeros(4000, 1, 3, 1, 1)
    log_sigma = draw_loss_randomness(x0, cfg, torch.Generator().manual_seed(0)).sigma.log()
    assert abs(float(log_sigma.mean()) - 0.5) < 0.1 and abs(float(log_sigma.std()) - 1.5) < 0.1
    gen = torch.Generator().manual_seed(0)
    assert {draw_loss_randomness(x0[:1], cfg, gen).n_cond for _ in range(20)} == {2}
    upstream = LossConfig()  # U{0, 1, 2}
    assert {draw_loss_randomness(x0[:1], upstream, gen).n_cond for _ in range(60)} == {0, 1, 2}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown key bogus"),
        ({"train": {"oops": 1}}, "unknown key train.oops"),
        ({"train": {"lr": "fast"}}, "train.lr: 'fast' is not of type 'number'"),
        ({"data": {"height": 50}}, "data.height: 50 is not divisible by 16"),
        ({"data": {"num_frames": 20}}, "data.num_frames: 20 is not 1 + 8k"),
        ({"model": {"preset": "tiny", "overrides": {"n_views": 2}}}, "data.cameras: 6 views but the model has 2"),
        ({"train": {"nproc": 2}, "resources": {"train": {"gpus": 4}}}, "resources.train.gpus"),
        ({"data": {"source": "real"}}, "data.root"),
        ({"infer": {"num_input_frames": 5}}, "infer.num_input_frames"),
        ({"train": {"min_cond_frames": 3, "max_cond_frames": 2}}, "train.min_cond_frames: 3 exceeds"),
        ({"model": {"overrides": {"wings": 2}}}, "model.overrides"),
        ({"model": {"compat": "head"}}, "model.compat has moved to infer.compat"),
        ({"export": {"iteration": 300}}, "export.iteration: 300 is not an iteration training saves (last, or one of"),
        ({"export": {"weights": "best"}}, "export.weights"),
        ({"infer": {"checkpoint": "release"}, "export": {"upstream_layout": True}}, "export.upstream_layout"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_key(change, message):
    cfg = {"name": "x", **change}
    with pytest.raises(ExperimentError) as e:
        validate(cfg, "exp.yaml")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("exp.yaml: ")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ExperimentError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_experiment(p)


def test_schedule_and_ema_match_upstream():
    assert lr_multiplier(0, 2500, 1e-6) == pytest.approx(1e-6)
    assert lr_multiplier(1000, 2500, 1e-6) == pytest.approx(0.4, rel=1e-5)
    assert lr_multiplier(3000, 2500, 1e-6) == 1.0
    g = ema_gamma(0.1)
    assert g == pytest.approx(6.9372, abs=1e-4)
    assert ema_beta(0, g) == 0.0
    assert [round(ema_beta(i, g), 4) for i in (1, 10, 100, 1000, 1999)] == [0.0041, 0.4693, 0.9241, 0.9921, 0.996]


def test_defaults_are_filled(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump({"name": "e"}))
    exp = load_experiment(p)
    assert exp.train.save_iter == 200 and exp.infer.steps == 35 and exp.infer.compat == "fixed"
    assert exp.export == ExportCfg(iteration="last", weights="ema", upstream_layout=False, replace_upstream=False)
    assert exp.trains and exp.post_trained == Path("results/e/post-trained/model.pt")


def test_typed_sections_have_exactly_the_schema_keys():
    props = load_schema()["properties"]
    sections = {"model": ModelCfg, "data": DataCfg, "train": TrainCfg, "infer": InferCfg, "export": ExportCfg}
    for name, cls in sections.items():
        assert {f.name for f in dataclasses.fields(cls)} == set(props[name]["properties"]), name
    lora = props["train"]["properties"]["lora"]["properties"]
    assert {f.name for f in dataclasses.fields(LoraCfg)} == set(lora)
    top = {f.name for f in dataclasses.fields(Experiment)} - {"source"}
    assert top == set(props)


def test_resolved_experiment_round_trips(tmp_path):
    exp = load_experiment(ROOT / "experiments" / "video2world_multiview_7b_lora.yaml")
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(exp.to_dict()))
    again = load_experiment(p)
    assert dataclasses.replace(again, source=exp.source) == exp


def test_the_resolved_copy_names_the_users_file_in_errors(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"name": "mine", "infer": {"checkpoint": "post-trained"}}))
    exp = load_experiment(user)
    resolved = tmp_path / "results/mine/experiment.yaml"
    resolved.parent.mkdir(parents=True)
    resolved.write_text(resolved_yaml(exp))
    assert resolved.read_text().startswith(f"# resolved from {user} (edit that file, not this one)\n")
    again = load_experiment(resolved)
    assert again == exp and again.source == str(user)
    # a later error (here a cross-field one, as a script would find it) points at the user's file
    broken = yaml.safe_load(resolved.read_text())
    broken["resources"] = {"train": {"nodes": 3}}
    resolved.write_text(resolved.read_text().split("\n", 1)[0] + "\n" + yaml.safe_dump(broken))
    with pytest.raises(ExperimentError, match=rf"^{re.escape(str(user))}: resources.train.nodes: 3 nodes"):
        load_experiment(resolved)
    # a file without the header (or with a look-alike first line) names itself
    resolved.write_text("# resolved from somewhere\n" + yaml.safe_dump(broken))
    with pytest.raises(ExperimentError, match=rf"^{re.escape(str(resolved))}: resources.train.nodes"):
        load_experiment(resolved)


@pytest.mark.parametrize(
    "key, value, trains, path",
    [
        ("checkpoint", "post-trained", True, "results/e/post-trained/model.pt"),
        ("checkpoint", "release", False, "checkpoints/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview/model.pt"),
        ("checkpoint", "somewhere/model.pt", False, "somewhere/model.pt"),
    ],
)
def test_what_inference_reads_decides_whether_the_experiment_trains(key, value, trains, path):
    exp = Experiment.from_config(validate({"name": "e", "infer": {key: value}}))
    assert exp.trains is trains and exp.infer_checkpoint == Path(path)


def test_files_the_user_brings_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for section, key in (("infer", "checkpoint"), ("infer", "adapter"), ("train", "init")):
        cfg = {"name": "e", section: {key: "mine/model.pt"}}
        with pytest.raises(ExperimentError, match=rf"^e.yaml: {section}.{key}: mine/model.pt does not exist"):
            check_files(Experiment.from_config(validate(cfg), "e.yaml"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/model.pt").write_bytes(b"x")
    check_files(Experiment.from_config(validate({"name": "e", "train": {"init": "mine/model.pt"}}), "e.yaml"))
