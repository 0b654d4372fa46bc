"""Checkpoint loading is strict and safe; saves are atomic and use upstream's key names."""

import os
import pickle

import pytest
import torch

from mvdit.assets.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    build_model,
    load_file,
    load_into,
    load_model,
)
from mvdit.assets.files import save_state_dict
from mvdit.model.config import get_preset


@pytest.fixture
def tiny_ckpt(tmp_path):
    model = build_model(get_preset("tiny"), seed=1)
    path = tmp_path / "model.pt"
    save_state_dict(path, model.state_dict())
    return model, path


def test_round_trip_is_exact_and_keys_are_upstreams(tiny_ckpt):
    model, path = tiny_ckpt
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(model.state_dict())
    assert all(k.startswith(("net.", "logvar.")) for k in sd)
    assert "net.pos_embedder.seq" in sd and "logvar.0.freqs" in sd
    loaded, report = load_model(get_preset("tiny"), path)
    assert not report.reinitialised and len(report.loaded) == len(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bf16_reg_and_fp32_ema_files_both_load(tmp_path, tiny_ckpt):
    model, _ = tiny_ckpt
    save_state_dict(tmp_path / "iter_000000010_reg_model.pt", model.state_dict(), dtype=torch.bfloat16)
    save_state_dict(tmp_path / "iter_000000010_ema_model.pt", model.state_dict(), dtype=torch.float32)
    reg = torch.load(tmp_path / "iter_000000010_reg_model.pt", weights_only=True)
    assert reg["net.x_embedder.proj.1.weight"].dtype == torch.bfloat16
    for name in ("reg", "ema"):
        load_model(get_preset("tiny"), tmp_path / f"iter_000000010_{name}_model.pt")


def test_release_layout_with_te_extra_state_and_wrappers_loads(tmp_path, tiny_ckpt):
    model, _ = tiny_ckpt
    sd = {k.replace("net.blocks.", "net.blocks._checkpoint_wrapped_module."): v for k, v in model.state_dict().items()}
    sd["net.blocks.block0.blocks.0.block.attn.attn_op._extra_state"] = torch.zeros(3, dtype=torch.uint8)
    torch.save({"model": sd}, tmp_path / "model.pt")
    _, report = load_model(get_preset("tiny"), tmp_path / "model.pt")
    assert report.ignored == ["net.blocks.block0.blocks.0.block.attn.attn_op._extra_state"]


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_ckpt):
    model, path = tiny_ckpt
    sd = load_file(path)
    sd.pop("net.final_layer.linear.weight")
    sd["net.bogus.weight"] = torch.zeros(1)
    sd["net.view_embeddings.weight"] = torch.zeros(6, 3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_into(build_model(get_preset("tiny")), sd, source="x.pt")
    msg = str(e.value)
    assert "\n" not in msg and "x.pt" in msg
    assert "missing 1: net.final_layer.linear.weight" in msg
    assert "unexpected 1: net.bogus.weight" in msg
    assert "net.view_embeddings.weight [6, 3] vs model [6, 6]" in msg


def test_posttrain_variant_from_release_needs_explicit_reinit(tiny_ckpt, caplog):
    _, path = tiny_ckpt
    with pytest.raises(CheckpointMismatchError):
        load_model(get_preset("tiny-posttrain"), path)
    model, report = load_model(
        get_preset("tiny-posttrain"),
        path,
        reinit=["net.x_embedder.proj.1.weight", "net.view_embeddings.weight"],
        ignore=["net.repeat_frame_embedding.*"],
    )
    assert sorted(report.reinitialised) == ["net.view_embeddings.weight", "net.x_embedder.proj.1.weight"]
    assert sorted(report.ignored) == ["net.repeat_frame_embedding.bias", "net.repeat_frame_embedding.weight"]
    assert "re-initialised" in caplog.text
    assert model.net.x_embedder.proj[1].weight.abs().sum() > 0


def test_truncated_empty_and_foreign_files_are_one_line_errors(tmp_path, tiny_ckpt):
    _, path = tiny_ckpt
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name in ("trunc.pt", "empty.pt", "text.pt", "tensor.pt", "absent.pt"):
        with pytest.raises(CheckpointError) as e:
            load_file(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"net.x": Boom()}, f)
    torch.save({"net.x": Boom()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="refusing to unpickle"):
            load_file(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_atomic_save_leaves_previous_file_on_failure(tmp_path, tiny_ckpt, monkeypatch):
    model, path = tiny_ckpt
    before = path.read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_state_dict(path, model.state_dict())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
