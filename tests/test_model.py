"""The model package: presets, the released 7B key list, shapes for 1-6 views, determinism, compat switches."""

import pytest
import torch

from mvdit.assets.checkpoint import build_model
from mvdit.model.config import MODELS, NetConfig, get_preset
from mvdit.model.edm import Condition, condition_indicator, inference_x0, num_condition_latent_frames
from mvdit.model.network import DiffusionModel
from mvdit.model.sampler import karras_sigmas, sample_euler

from .helpers import DATA


def read_key_list():
    keys = {}
    for line in (DATA / "7b-state-dict-keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        keys[name] = [int(s) for s in shape.strip("[]").split(",")]
    return keys


def meta_state_dict(preset: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = DiffusionModel(get_preset(preset))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_7b_meta_build_has_exactly_the_released_keys_and_shapes():
    ours, ref = meta_state_dict("7b-multiview"), read_key_list()
    assert len(ref) == 574
    assert sorted(ours) == sorted(ref)
    assert ours == ref
    with torch.device("meta"):
        n = sum(p.numel() for p in DiffusionModel(get_preset("7b-multiview")).parameters())
    assert n == 7_234_799_792  # the header of the key list


def test_posttrain_variant_has_upstream_training_input_layer():
    sd = meta_state_dict("7b-multiview-posttrain")
    assert sd["net.x_embedder.proj.1.weight"] == [4096, 84]
    assert sd["net.view_embeddings.weight"] == [6, 3]
    assert not any(k.startswith("net.repeat_frame_embedding") for k in sd)
    assert get_preset("tiny").input_planes * 4 == 96


def test_unknown_preset_and_unknown_config_key_are_errors():
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("13b")
    with pytest.raises(ValueError, match="unknown network config keys: bogus"):
        NetConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="block_config"):
        NetConfig.from_upstream({"block_config": "FA-MLP"})


def tiny_inputs(n_views: int, t: int = 2, h: int = 4, w: int = 6, text_len: int = 8, b: int = 1):
    x = torch.randn(b, 16, n_views * t, h, w)
    text = torch.randn(b, n_views * text_len, 1024)
    return x, text


@pytest.mark.parametrize("n_views", [1, 2, 3, 4, 5, 6])
def test_forward_shapes_for_one_to_six_views(n_views):
    model = build_model(get_preset("tiny")).eval()
    x, text = tiny_inputs(n_views)
    mask = condition_indicator(n_views, 2, 1).expand(1, 1, 2 * n_views, 4, 6)
    with torch.no_grad():
        out = model.net(x, torch.tensor([0.1]), text, mask, n_views=n_views)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_more_views_than_the_model_has_is_an_error():
    model = build_model(get_preset("tiny").replace(n_views=2))
    x, text = tiny_inputs(3)
    with pytest.raises(ValueError, match="3 views requested but the model has 2"):
        model.net(x, torch.tensor([0.1]), text, n_views=3)


def test_cross_attention_is_per_view():
    """Changing view 1's text changes only view 1's output (self-attention mixes views only through x)."""
    model = build_model(get_preset("tiny").replace(num_blocks=1)).eval()
    x, text = tiny_inputs(3, t=1)
    base = model.net(x, torch.tensor([0.1]), text, n_views=3)
    # one block: cross-attn output of view 1 feeds only view 1's MLP; the final layer is per token
    text2 = text.clone()
    text2[:, 8:16] += 1.0
    out = model.net(x, torch.tensor([0.1]), text2, n_views=3)
    diff = (out - base).abs().amax(dim=(0, 1, 3, 4))  # per latent frame (= per view here)
    assert diff[0] == 0 and diff[2] == 0 and diff[1] > 0


def test_forward_is_deterministic_and_init_is_seeded():
    a, b = build_model(get_preset("tiny"), seed=3), build_model(get_preset("tiny"), seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = build_model(get_preset("tiny"), seed=4)
    assert not torch.equal(a.net.x_embedder.proj[1].weight, c.net.x_embedder.proj[1].weight)
    x, text = tiny_inputs(6)
    with torch.no_grad():
        assert torch.equal(a.net(x, torch.tensor([0.2]), text), a.net(x, torch.tensor([0.2]), text))


def test_num_condition_frames_fixed_and_head():
    assert num_condition_latent_frames(1) == 1
    assert num_condition_latent_frames(9) == 2
    assert num_condition_latent_frames(9, compat="head") == 1  # the release's bug 2
    assert num_condition_latent_frames(1, compat="head") == 1
    with pytest.raises(ValueError):
        num_condition_latent_frames(5)


def test_fixed_compat_pins_condition_frames_and_head_does_not():
    model = build_model(get_preset("tiny")).eval()
    v, t = 6, 2
    x, text = tiny_inputs(v, t)
    g = torch.randn_like(x)
    cond = Condition(g, condition_indicator(v, t, 1), text, v)
    sigma = torch.tensor(2.5)
    with torch.no_grad():
        fixed = inference_x0(model.net, x, sigma, cond, 7.0, "fixed")["x0"]
        head = inference_x0(model.net, x, sigma, cond, 7.0, "head")["x0"]
    frames = torch.arange(v * t) % t == 0
    assert torch.allclose(fixed[:, :, frames], g[:, :, frames], atol=1e-5)
    assert not torch.allclose(head[:, :, frames], g[:, :, frames], atol=1e-2)
    assert torch.equal(fixed[:, :, ~frames], head[:, :, ~frames])


def test_euler_sampler_is_deterministic_and_keeps_condition_frames_when_fixed():
    model = build_model(get_preset("tiny")).eval()
    v, t = 6, 2
    _, text = tiny_inputs(v, t)
    g = torch.randn(1, 16, v * t, 4, 6) * 0.5
    cond = Condition(g, condition_indicator(v, t, 1), text, v)
    noise = torch.randn_like(g)

    def run():
        def step(x, sigma):
            r = inference_x0(model.net, x, sigma, cond, 7.0, "fixed")
            return r["x_in"], r["x0"]

        with torch.no_grad():
            return sample_euler(step, noise, karras_sigmas(6))

    out1, out2 = run(), run()
    assert torch.equal(out1, out2)
    frames = torch.arange(v * t) % t == 0
    assert (out1[:, :, frames] - g[:, :, frames]).abs().max() < 0.05


def test_karras_schedule_matches_diffusers_fp32_values():
    s = karras_sigmas(35)
    assert s.dtype == torch.float32 and len(s) == 36 and s[-1] == 0
    assert abs(float(s[0]) - 79.999985) < 1e-5 and abs(float(s[34]) - 0.0002) < 1e-8


def test_presets_are_all_buildable():
    for name in MODELS:
        meta_state_dict(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_gpu_matches_fp32_closely():
    model = build_model(get_preset("tiny")).cuda().eval()
    x, text = (t.cuda() for t in tiny_inputs(6))
    with torch.no_grad():
        ref = model.net(x, torch.tensor([0.1], device="cuda"), text)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.net(x, torch.tensor([0.1], device="cuda"), text)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.slow
def test_compiled_blocks_sample_the_same_as_eager():
    from mvdit.inference.generate import generate
    from mvdit.runtime.compile import compile_blocks

    model = build_model(get_preset("tiny")).eval()
    v, t = 6, 2
    _, text = tiny_inputs(v, t)
    g = torch.randn(1, 16, v * t, 4, 6) * 0.5
    cams = ["front", "left", "right", "back", "back_left", "back_right"]
    eager = generate(model.net, g, text, cams, 1, steps=3, progress=False)
    compile_blocks(model.net)
    compiled = generate(model.net, g, text, cams, 1, steps=3, progress=False)
    assert torch.allclose(eager, compiled, atol=1e-3, rtol=1e-3)


def test_bf16_model_samples_in_bf16():
    """A bf16 model (as on GPU) gets bf16 inputs all the way: the fp32 EDM scalings must not promote the latent."""
    from mvdit.inference.generate import generate

    model = build_model(get_preset("tiny"), dtype=torch.bfloat16).eval()
    v, t = 6, 2
    _, text = tiny_inputs(v, t)
    g = (torch.randn(1, 16, v * t, 4, 6) * 0.5).bfloat16()
    cams = ["front", "left", "right", "back", "back_left", "back_right"]
    out = generate(model.net, g, text.bfloat16(), cams, 1, steps=2, progress=False)
    assert torch.isfinite(out).all() and out.shape == g.shape


def test_a_camera_subset_keeps_each_cameras_view_embedding_row():
    """A 5-camera rig without `back`: views carry rows [0, 1, 2, 4, 5], so view 3 of the input is back_left."""
    model = build_model(get_preset("tiny")).eval()
    x, text = tiny_inputs(5)
    rows = torch.tensor([0, 1, 2, 4, 5])
    fr = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        a = model.net(x, torch.tensor([0.1]), text, n_views=5, view_indices=rows, frame_repeat=fr)
        b = model.net(x, torch.tensor([0.1]), text, n_views=5, frame_repeat=fr)  # rows 0..4: back's row for view 3
        c = model.net(x, torch.tensor([0.1]), text, n_views=5, view_indices=rows, frame_repeat=fr)
    assert torch.equal(a, c) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        model.net(x, torch.tensor([0.1]), text, n_views=5, view_indices=torch.tensor([0, 1, 2, 4, 6]))


def test_batched_guidance_equals_two_forwards():
    from mvdit.inference.generate import generate

    model = build_model(get_preset("tiny")).eval()
    v, t = 6, 2
    _, text = tiny_inputs(v, t)
    g = torch.randn(1, 16, v * t, 4, 6) * 0.5
    cams = ["front", "left", "right", "back", "back_left", "back_right"]
    two = generate(model.net, g, text, cams, 1, steps=3, progress=False)
    one = generate(model.net, g, text, cams, 1, steps=3, progress=False, batch_guidance=True)
    assert torch.allclose(one, two, atol=1e-4, rtol=1e-4)
