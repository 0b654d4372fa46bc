"""LoRA adapters (mvdit.adapters.lora): peft injection, freezing, adapter files, merging, a short training run on
the demo data, and FSDP2 sharding with 2 gloo processes. CPU, tiny preset."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from mvdit.adapters.lora import (
    LoraError,
    LoraSettings,
    adapter_state_dict,
    add_lora,
    init_lora,
    load_adapter,
    load_model_with_adapter,
    lora_init_state_dict,
    lora_parameters,
    merge_state_dict,
    read_adapter,
    save_adapter,
)
from mvdit.assets.checkpoint import CheckpointError, CheckpointMismatchError, build_model, load_into, load_model
from mvdit.assets.files import save_state_dict
from mvdit.data.video_io import read_video
from mvdit.model.config import get_preset
from mvdit.model.network import DiffusionModel
from mvdit.training.checkpointing import lora_train_state
from mvdit.training.ema import AdapterEma
from mvdit.training.loss import LossConfig, draw_loss_randomness, training_loss

from .helpers import ROOT, tiny_inference_setup

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = get_preset("tiny")
S = LoraSettings(rank=4, alpha=8.0)


def lora_model(seed=0, s=S) -> DiffusionModel:
    return add_lora(build_model(CFG, seed=seed), s, generator=torch.Generator().manual_seed(1))


def randomise_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def net_inputs(b=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    v, t = CFG.n_views, 2
    return {
        "x": torch.randn(b, 16, v * t, 4, 6, generator=g),
        "timesteps": torch.randn(b, generator=g),
        "crossattn_emb": torch.randn(b, v * 8, 1024, generator=g),
        "fps": torch.full((b,), 10.0),
    }


def test_adapters_only_trainable_and_frozen_base_gets_no_grad():
    model = lora_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # 2 blocks x (self-attn 4 + cross-attn 4 + MLP 2) Linear layers, each with A and B
    assert len(names) == CFG.num_blocks * 10 * 2
    assert "net.blocks.block0.blocks.0.block.attn.to_q.0.base_layer.weight" in dict(model.named_parameters())
    randomise_adapters(model)  # B = 0 at init would give A no gradient
    f, u = model(**net_inputs())
    (f.square().mean() + u.mean()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n


def test_settings_and_targets_validated():
    with pytest.raises(LoraError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(LoraError, match="unknown lora settings: bogus"):
        LoraSettings.from_dict({"rank": 4, "bogus": 1})
    assert LoraSettings.from_dict({"enabled": True, "rank": 8, "targets": ["to_q.0"]}).targets == ("to_q.0",)
    with pytest.raises(LoraError, match="match no module.*nope"):
        add_lora(build_model(CFG, seed=0), replace(S, targets=("to_q.0", "nope")))
    with pytest.raises(LoraError, match="not an nn.Linear"):
        add_lora(build_model(CFG, seed=0), replace(S, targets=("to_q",)))
    model = lora_model()
    with pytest.raises(LoraError, match="already has LoRA"):
        add_lora(model, S)


def test_meta_build_dtypes_and_deterministic_init():
    with torch.device("meta"):
        model = DiffusionModel(CFG)
    add_lora(model, S, base_dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    init_lora(model, torch.Generator().manual_seed(5))
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in n else torch.bfloat16), n
        if ".lora_B." in n:
            assert not p.any()
        elif ".lora_A." in n:
            bound = 1 / p.shape[1] ** 0.5
            assert p.abs().max() <= bound and p.std() > bound / 3
    assert model.logvar[0].freqs.dtype == torch.float32  # buffers keep their dtype
    # the state-dict route (for sharded models) gives the same adapters as init_lora
    plain = build_model(CFG, seed=0).state_dict()
    full = lora_init_state_dict(plain, S, torch.Generator().manual_seed(5))
    ref = lora_model()
    load_into(ref, full, source="lora_init_state_dict")  # strict: every name of the LoRA model
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if ".lora_" in n:
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_adapter_file_is_small_and_round_trips_strictly(tmp_path):
    model = lora_model()
    randomise_adapters(model)
    sd = adapter_state_dict(model)
    assert set(sd) == {n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad}
    assert "net.blocks.block1.blocks.2.block.layer2.lora_B.weight" in sd
    path = tmp_path / "a.safetensors"
    save_adapter(path, sd, S, metadata={"iteration": 7})
    full = tmp_path / "full.pt"
    save_state_dict(full, model.state_dict())
    assert path.stat().st_size < full.stat().st_size / 10
    assert path.stat().st_size < 2**20  # 7B rank 16: 45 M fp32 parameters = 180 MB
    _, s, meta = read_adapter(path)
    assert s == S and meta["iteration"] == "7" and json.loads(meta["mvdit_lora"])["rank"] == 4
    other = lora_model(seed=1)
    assert load_adapter(other, path) == S
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        if ".lora_" in n:
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    # strict: settings, missing and unexpected keys are named
    with pytest.raises(CheckpointMismatchError, match="alpha 8.0 in the file vs 4.0"):
        load_adapter(lora_model(s=replace(S, alpha=4.0)), path)
    with pytest.raises(CheckpointMismatchError, match="missing 4: .*block.layer1.lora_A.weight"):
        fewer = {k: v for k, v in sd.items() if ".layer1." not in k}
        save_adapter(tmp_path / "b.safetensors", fewer, S)
        load_adapter(other, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointMismatchError, match="unexpected 1: net.extra.lora_A.weight"):
        save_adapter(tmp_path / "c.safetensors", sd | {"net.extra.lora_A.weight": torch.zeros(4, 2)}, S)
        load_adapter(other, tmp_path / "c.safetensors")
    with pytest.raises(LoraError, match="non-adapter"):
        save_adapter(tmp_path / "d.safetensors", model.state_dict(), S)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter(tmp_path / "none.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_adapter(tmp_path / "e.safetensors")


def test_merged_equals_unmerged_and_loads_into_plain_model(tmp_path):
    model = lora_model().eval()
    randomise_adapters(model)
    merged = merge_state_dict(model.state_dict(), S)
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)
    plain = build_model(CFG, seed=None).eval()
    load_into(plain, merged, source="merged")  # strict
    inputs = net_inputs(b=2)
    with torch.no_grad():
        f_lora, u_lora = model(**inputs)
        f_plain, u_plain = plain(**inputs)
        f_base = build_model(CFG, seed=0).eval()(**inputs)[0]
    assert (f_lora - f_base).abs().max() > 1e-3  # the adapters change the output, so the comparison means something
    torch.testing.assert_close(f_plain, f_lora, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u_plain, u_lora, rtol=0, atol=0)
    # base file + adapter file: merged at load time, or kept as LoRA layers, give the same network
    save_state_dict(tmp_path / "base.pt", build_model(CFG, seed=0).state_dict())
    save_adapter(tmp_path / "a.safetensors", adapter_state_dict(model), S)
    m1 = load_model_with_adapter(CFG, tmp_path / "base.pt", tmp_path / "a.safetensors").eval()
    m2 = load_model_with_adapter(CFG, tmp_path / "base.pt", tmp_path / "a.safetensors", merge=True).eval()
    assert set(m2.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m1(**inputs)[0], f_lora, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m2(**inputs)[0], f_lora, rtol=1e-5, atol=1e-5)
    # adapters from elsewhere (the EMA) replace those of the state dict; incomplete ones are refused
    ema = AdapterEma(model)
    ema.update(model, 0.0)
    merged_ema = merge_state_dict(model.state_dict(), S, adapters=ema.adapter_state_dict())
    torch.testing.assert_close(merged_ema, merged, rtol=0, atol=0)
    ema2 = AdapterEma(lora_model())
    ema2.load_state_dict(ema.state_dict())
    torch.testing.assert_close(ema2.adapter_state_dict(), ema.adapter_state_dict(), rtol=0, atol=0)
    partial = {k: v for k, v in ema.adapter_state_dict().items() if ".layer2." not in k}
    with pytest.raises(LoraError, match="without adapter tensors"):
        merge_state_dict(model.state_dict(), S, adapters=partial)


def demo_latents(tmp: Path, n_clips: int = 2) -> torch.Tensor:
    """The tiny demo's data: synthetic six-camera clips through the tiny video tokenizer -> [B, 16, 6*2, 4, 6]."""
    from mvdit.data.synthetic import render_clip
    from mvdit.encoders.tokenizer import VideoTokenizer
    from mvdit.tiny.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp / "tok")
    tok = VideoTokenizer(tmp / "tok", pixel_chunk_frames=9)
    clips = [torch.from_numpy(render_clip(i, 9, 32, 48)) for i in range(n_clips)]
    video = rearrange(torch.stack(clips), "b v t h w c -> b c (v t) h w").float() / 127.5 - 1
    with torch.no_grad():
        return tok.encode_views(video, CFG.n_views).float()


def test_short_lora_run_lowers_the_loss(tmp_path):
    x0 = demo_latents(tmp_path)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(x0.shape[0], CFG.n_views * 8, 1024, generator=g)
    fps = torch.full((x0.shape[0],), 10.0)
    model = lora_model().train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optim = torch.optim.AdamW(lora_parameters(model), lr=1e-3, weight_decay=0.1)
    ema = AdapterEma(model)
    draws = [draw_loss_randomness(x0, LossConfig(), g) for _ in range(5)]  # a fixed cycle: same draws per window
    edm = []
    for step in range(60):
        out = training_loss(model, x0, text, draws[step % 5], CFG.n_views, fps=fps)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        ema.update(model, 0.9)
        edm.append(out.edm_loss.item())
    first, last = sum(edm[:10]) / 10, sum(edm[-10:]) / 10
    print(f"edm_loss first 10 {first:.4f} last 10 {last:.4f}")
    assert last < 0.8 * first, (first, last)
    for n, p in model.named_parameters():
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- FSDP2, 2 processes


def _fsdp_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from mvdit.runtime.distributed import broadcast_full_state, full_state_dict, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    results = {}

    def make(base_dtype):
        plain = build_model(CFG, seed=0).state_dict() if rank == 0 else None
        full = lora_init_state_dict(plain, S, torch.Generator().manual_seed(1)) if rank == 0 else None
        with torch.device("meta"):
            model = DiffusionModel(CFG)
        add_lora(model, S, base_dtype=base_dtype)
        parallelize(model, mesh, param_dtype=base_dtype, activation_checkpointing=True)
        model.to_empty(device="cpu")
        model.net.pos_embedder.reset_buffers()
        broadcast_full_state(model, full)
        return plain, model, torch.optim.AdamW(lora_parameters(model), lr=1e-2), AdapterEma(model)

    try:
        for mode in ("fp32", "bf16"):
            base_dtype = torch.bfloat16 if mode == "bf16" else None
            plain, model, optim, ema = make(base_dtype)
            g = torch.Generator().manual_seed(10 + rank)
            x0 = torch.randn(1, 16, CFG.n_views * 2, 4, 6, generator=g)
            text = torch.randn(1, CFG.n_views * 8, 1024, generator=g)
            losses = []
            for _ in range(3):
                out = training_loss(model, x0, text, draw_loss_randomness(x0, LossConfig(), g), CFG.n_views)
                out.loss.backward()
                grads = {n: p.grad is not None for n, p in model.named_parameters()}
                assert all(v == (".lora_" in n) for n, v in grads.items()), grads
                torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
                optim.step()
                optim.zero_grad(set_to_none=True)
                ema.update(model, 0.5)
                losses.append(out.loss.item())
            if mode == "fp32":  # sharded adapter-only save, then resume into a fresh model: bitwise equal state
                ckpt = str(Path(out_dir, "dcp"))
                dcp.save(lora_train_state(model, ema, optim), checkpoint_id=ckpt)
                _, model2, optim2, ema2 = make(base_dtype)
                state = lora_train_state(model2, ema2, optim2)
                dcp.load(state, checkpoint_id=ckpt)
                set_model_state_dict(model2, state["model"], options=StateDictOptions(strict=False))
                ema2.load_state_dict(state["ema"])
                set_optimizer_state_dict(model2, optim2, state["optim"])
                a1, a2 = lora_train_state(model, ema, optim), lora_train_state(model2, ema2, optim2)
                resume_ok = all(
                    torch.equal(a1[p][k].to_local(), a2[p][k].to_local()) for p in ("model", "ema") for k in a1[p]
                )
                o1, o2 = a1["optim"]["state"], a2["optim"]["state"]
                resume_ok &= (
                    len(o1) == CFG.num_blocks * 10 * 2
                    and set(o1) == set(o2)
                    and all(torch.equal(o1[k]["exp_avg"].to_local(), o2[k]["exp_avg"].to_local()) for k in o1)
                )
                results["resume_ok"] = resume_ok
            adapters = adapter_state_dict(model)  # collective
            ema_ad = ema.adapter_state_dict()  # collective
            reg = full_state_dict(model)  # collective; tensors on rank 0
            # a forward of the sharded model on the same input on every rank, against the merged plain model
            inp = net_inputs(seed=99)
            model.eval()
            with torch.no_grad():
                f_sharded = model(**inp)[0].float()
            if rank == 0:
                b_moved = max(float(v.abs().max()) for k, v in adapters.items() if ".lora_B." in k)
                base_same = all(
                    torch.equal(reg[k.replace(".0.weight", ".0.base_layer.weight")].float(), v.to(reg_dtype).float())
                    for k, v in plain.items()
                    if k.endswith("to_q.0.weight")
                    for reg_dtype in [base_dtype or torch.float32]
                )
                merged = merge_state_dict(reg, S)
                ref = build_model(CFG, seed=None).eval()
                load_into(ref, merged, source="merged sharded")
                if base_dtype is not None:  # what MixedPrecisionPolicy does: bf16 weights and inputs
                    ref = ref.to(base_dtype)
                    inp = {k: v.to(base_dtype) for k, v in inp.items()}
                with torch.no_grad():
                    f_ref = ref(**inp)[0].float()
                merged_ema = merge_state_dict(reg, S, adapters=ema_ad)
                results[mode] = {
                    "losses": losses,
                    "b_moved": b_moved,
                    "base_same": base_same,
                    "n_adapters": len(adapters),
                    "max_diff": float((f_sharded - f_ref).abs().max()),
                    "scale": float(f_ref.abs().max()),
                    "ema_differs": any(not torch.equal(merged_ema[k], merged[k]) for k in merged),
                    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                }
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_processes(tmp_path):
    import torch.multiprocessing as mp

    store = tempfile.mktemp(dir=tmp_path)  # FileStore needs a path that does not exist yet
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_worker, args=(2, store, str(tmp_path)), nprocs=2, join=True)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res.pop("resume_ok")
    for mode, r in res.items():
        assert all(torch.isfinite(torch.tensor(r["losses"]))), (mode, r)
        assert r["b_moved"] > 0, (mode, r)  # the adapters trained
        assert r["base_same"], (mode, r)  # the base did not
        assert r["n_adapters"] == CFG.num_blocks * 10 * 2
        assert r["ema_differs"]
        tol = 1e-5 if mode == "fp32" else 0.05  # bf16: the reference merges into bf16 weights
        assert r["max_diff"] <= tol * max(1.0, r["scale"]), (mode, r)
    assert res["bf16"]["dtypes"] == ["torch.bfloat16", "torch.float32"]


# --------------------------------------------------------------------------------------------- infer.py --adapter


def test_infer_with_an_adapter_writes_the_merged_models_videos(tmp_path):
    """`infer.py --adapter`: the tiny release model plus a LoRA adapter file, kept as LoRA layers (not merged),
    samples what the merged model samples, and far from what the base model samples. One conditioning frame (a still
    per camera), so that most of each video is generated. The two latents differ in float rounding (merging reorders
    the sums), and one pixel that rounds the other way can change how h264 codes the frames after it: measured, five
    cameras' videos are identical and one differs by 1.1 levels on average, against 25-30 for the adapter's effect."""
    tiny = tiny_inference_setup(tmp_path, "lora_infer", steps=3)
    ck = tiny / "checkpoints"
    base = ck / "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview/model.pt"
    model = add_lora(load_model(CFG, base)[0], S, generator=torch.Generator().manual_seed(1))
    randomise_adapters(model, seed=4)
    adapter, merged = tmp_path / "adapter.safetensors", tmp_path / "merged/model.pt"
    save_adapter(adapter, adapter_state_dict(model), S)
    save_state_dict(merged, merge_state_dict(model.state_dict(), S))

    def infer(out, checkpoint, *extra):
        cmd = [sys.executable, ROOT / "src/infer.py", "--experiment", tiny / "exp.yaml", "--checkpoint", checkpoint]
        cmd += ["--prompt-set", ROOT / "prompts/synthetic_stills.yaml", "--out-dir", tiny / out, "--device", "cpu"]
        cmd += ["--project-root", ROOT, "--tokenizer-dir", ck / "Cosmos-Tokenize1-CV8x8x8-720p"]
        cmd += ["--t5-dir", ck / "google-t5/t5-11b", "--cache-dir", tiny / "t5_cache", *extra]
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tiny / out / "synthetic_stills.json").read_text())

    with_adapter = infer("adapter", base, "--adapter", adapter)  # the same prompts, seed and settings throughout
    assert with_adapter["adapter"] == str(adapter) and with_adapter["checkpoint"] == str(base)
    assert len(with_adapter["adapter_sha256"]) == 64
    same_latent = infer("merged", merged)["latent_sha256"] == with_adapter["latent_sha256"]
    print(f"base + adapter and merged: {'the same' if same_latent else 'different'} latent_sha256")
    infer("base", base)
    for cam in ("front", "left", "right", "back", "back_left", "back_right"):
        a, m, b = (read_video(tiny / out / f"{cam}.mp4")[0].astype(int) for out in ("adapter", "merged", "base"))
        assert a.shape == m.shape == b.shape and a.shape[0] == 9
        near, far = np.abs(a - m).mean(), np.abs(a - b).mean()
        print(f"{cam}: mean difference to the merged model's video {near:.3f} levels, to the base model's {far:.2f}")
        assert near < 0.1 * far and far > 10, (cam, near, far)
