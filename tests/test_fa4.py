"""infer.sdpa_backend: fa4 — the one-line errors of what cannot run it, the custom op's layout and scale (against a
stand-in flash_attn.cute on the CPU), its conversion of a model from outside, and under torch.compile. The GPU test
runs the real kernels."""

import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
import torch
import torch.nn.functional as F

from mvdit.assets.checkpoint import build_model
from mvdit.model.config import get_preset
from mvdit.model.network import Attention, sdpa
from mvdit.runtime import fa4
from mvdit.runtime import sdpa as sdpa_setting
from mvdit.workflow.experiment import ExperimentError

from .helpers import ROOT, tiny_forward, tiny_inference_setup


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def fake_fa4(monkeypatch):
    """A stand-in `flash_attn.cute` whose flash_attn_func is exact attention on [B, N, H, d], recording its calls."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None):
        calls.append({"shape": tuple(q.shape), "contiguous": all(t.is_contiguous() for t in (q, k, v))})
        calls[-1]["scale"] = softmax_scale
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
        return out.transpose(1, 2).contiguous(), None  # (out, lse) as the 4.0 betas answer

    pkg, mod = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    # transformers looks for a flash_attn when it loads T5
    pkg.__spec__, mod.__spec__ = ModuleSpec("flash_attn", None), ModuleSpec("flash_attn.cute", None)
    mod.flash_attn_func, pkg.cute = flash_attn_func, mod
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", mod)
    return calls


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    return monkeypatch


def resolve_error(dtype=torch.bfloat16, device="cpu") -> str:
    with pytest.raises(ExperimentError) as e:
        sdpa_setting.resolve("fa4", 4, 64, dtype, device, source="experiments/x.yaml")
    msg = str(e.value)
    assert msg.startswith("experiments/x.yaml: infer.sdpa_backend: fa4 ") and "\n" not in msg
    assert msg.endswith("(or set infer.sdpa_backend: auto)")
    return msg


def test_on_a_gpu_fp32_is_refused_before_the_import_naming_the_precision_fix(fake_gpu):
    fake_gpu.setattr(fa4, "_module", lambda: pytest.fail("imported before the dtype was checked"))
    msg = resolve_error(torch.float32, "cuda")
    assert "runs bf16 or fp16 attention, not float32; set infer.precision: bf16" in msg


def test_a_missing_or_broken_wheel_names_the_extra(fake_gpu):
    fake_gpu.setitem(sys.modules, "flash_attn.cute", None)  # import raises ImportError, installed or not
    msg = resolve_error(device="cuda")
    assert "flash-attn-4 does not import (ModuleNotFoundError: import of flash_attn.cute halted" in msg
    assert "pip install -e '.[fa4-cu13]' (torch built for CUDA 13) or '.[fa4]' (CUDA 12)" in msg

    def broken(name):
        raise OSError("libcuda.so.1: cannot open shared object file")

    fake_gpu.setattr(fa4.importlib, "import_module", broken)  # installed, but its CUDA libraries do not load
    assert "flash-attn-4 does not import (OSError: libcuda.so.1: cannot open" in resolve_error(device="cuda")


def test_with_the_wheel_a_cpu_or_a_pre_hopper_gpu_is_refused(fake_fa4, monkeypatch):
    assert "needs a CUDA GPU with compute capability 9.0+ (Hopper or later), not cpu" in resolve_error()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    assert "needs compute capability 9.0+ (Hopper or later); NVIDIA A100-SXM4-80GB is 8.0" in resolve_error(
        device="cuda"
    )


def test_on_hopper_the_probe_decides_and_its_failure_is_one_line(fake_fa4, fake_gpu):
    fake_gpu.setattr(fa4, "version", lambda: "4.0.0b40")
    fake_gpu.setattr(fa4, "_probe", lambda device, head_dim, dtype: 3e-3)
    assert sdpa_setting.resolve("fa4", 4, 64, torch.bfloat16, "cuda") == "fa4 (flash-attn-4 4.0.0b40)"

    def broken(device, head_dim, dtype):
        raise RuntimeError("DSLRuntimeError: ptxas failed\n  in kernel flash_fwd_sm90")

    fake_gpu.setattr(fa4, "_probe", broken)
    msg = resolve_error(device="cuda")
    assert "flash-attn-4 4.0.0b40 does not run here: RuntimeError: DSLRuntimeError: ptxas failed in kernel" in msg
    fake_gpu.setattr(fa4, "_probe", lambda device, head_dim, dtype: 0.5)
    assert "flash-attn-4 4.0.0b40 is off by 0.5 (relative L2) on a probe" in resolve_error(device="cuda")


def test_auto_prefers_fa4_where_it_runs_and_otherwise_keeps_torchs_pick_without_an_error(fake_fa4, fake_gpu, caplog):
    fake_gpu.setattr(fa4, "version", lambda: "4.0.0b40")
    fake_gpu.setattr(fa4, "_probe", lambda device, head_dim, dtype: 3e-3)
    assert fa4.preferred("cuda", 128, torch.bfloat16) == "fa4 (flash-attn-4 4.0.0b40)"
    assert sdpa_setting.resolve("auto", 4, 128, torch.bfloat16, "cuda") == "fa4 (flash-attn-4 4.0.0b40)"
    assert fa4.preferred("cuda", 128, torch.float32) is None  # fp32: torch's SDPA
    assert fa4.preferred("cpu", 128, torch.bfloat16) is None

    def broken(device, head_dim, dtype):
        raise RuntimeError("no kernel for this GPU")

    fake_gpu.setattr(fa4, "_probe", broken)
    with caplog.at_level("INFO", logger="mvdit.runtime.fa4"):
        assert fa4.preferred("cuda", 128, torch.bfloat16) is None
    assert "FlashAttention-4 not used (flash-attn-4 4.0.0b40 does not run here: RuntimeError: no kernel" in caplog.text
    fake_gpu.setattr(fa4.importlib.util, "find_spec", lambda name: None)  # the extra not installed: not even probed
    fake_gpu.setattr(fa4, "check", lambda *a: pytest.fail("probed without the extra"))
    assert fa4.preferred("cuda", 128, torch.bfloat16) is None


def test_attention_hands_flash_attention_its_layout_and_scale_and_matches_sdpa(fake_fa4):
    qkv = torch.randn(2, 37, 3 * 4 * 16)  # the projections' [B, N, h*d], split into heads as Attention does
    q, k, v = (t.unflatten(-1, (4, 16)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # [B, h, N, d] views
    out = fa4.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 4, 37, 16)
    assert fake_fa4 == [{"shape": (2, 37, 4, 16), "contiguous": True, "scale": 16**-0.5}]


def test_apply_routes_every_attention_of_a_model_through_fa4(fake_fa4):
    model = build_model(get_preset("tiny")).eval()
    ref = tiny_forward(model.net)
    n_attn = sum(isinstance(m, Attention) for m in model.net.modules())
    assert fa4.apply(model.net) == n_attn == 2 * len(model.net.blocks)  # self- and cross-attention of every block
    assert Attention.attention_fn is sdpa  # the class default is untouched
    out = tiny_forward(model.net)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    per_forward = len(fake_fa4)
    assert per_forward >= n_attn  # every module called it (cross-attention once per view group or run)


def test_the_op_is_one_opaque_call_under_torch_compile(fake_fa4):
    attn = Attention(64, 64, 4).eval()
    x = torch.randn(1, 12, 64)
    graphs = []

    def recording(gm, example_inputs):  # the graph dynamo hands a backend
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    with torch.no_grad():
        ref = attn(x)
        attn.attention_fn = fa4.attention
        out = torch.compile(attn, backend=recording, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and graphs[0].count(torch.ops.mvdit.fa4_attention.default) == 1
    assert F.scaled_dot_product_attention not in graphs[0]  # not traced into: the stand-in ran only at run time
    assert len(fake_fa4) == 1


def test_the_op_passes_torch_library_opcheck_at_cross_attention_shapes(fake_fa4):
    q = torch.randn(2, 37, 4, 16)
    k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 4, 16)  # fewer keys than queries, as the text context
    torch.library.opcheck(torch.ops.mvdit.fa4_attention.default, (q, k, v, 0.25))


has_fa4 = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not has_fa4, reason="needs CUDA and the fa4 extra")
def test_on_the_gpu_fa4_is_as_accurate_as_bf16_sdpa():
    assert fa4.check("cuda", 128, torch.bfloat16).startswith("fa4 (flash-attn-4 ")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err_fa4, err_sdpa = rel(fa4.attention(q, k, v), ref), rel(F.scaled_dot_product_attention(q, k, v), ref)
    assert err_fa4 < 1.5 * err_sdpa, (err_fa4, err_sdpa)


def test_the_benchmark_variant_installs_fa4_and_undoes_it(fake_fa4, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import infer_fp8

    model = build_model(get_preset("tiny")).eval()
    with infer_fp8.Swap(model.net, "bf16-fa4", emulate=True):
        tiny_forward(model.net)
        assert fake_fa4
    assert not any("attention_fn" in m.__dict__ for m in model.net.modules() if isinstance(m, Attention))


def sample_with_each_backend(d, device, precision, compile_blocks, sdpa_backend):
    """One 4-step sample of the tiny release model through a SamplingSession per infer.sdpa_backend (an SDPA one,
    then fa4)."""
    import yaml

    from mvdit.inference.generate import pad_condition_video
    from mvdit.inference.session import SamplingSession
    from mvdit.workflow.experiment import load_experiment

    raw = yaml.safe_load((d / "exp.yaml").read_text())
    latents = {}
    for backend in (sdpa_backend, "fa4"):
        raw["infer"] |= {"precision": precision, "compile": compile_blocks, "sdpa_backend": backend}
        path = d / f"exp_{backend}.yaml"
        path.write_text(yaml.safe_dump(raw))
        exp = load_experiment(path)
        session = SamplingSession(exp, path, device)
        model = session.load(exp.release_checkpoint)
        n_fa4 = sum(m.__dict__.get("attention_fn") is fa4.attention for m in model.net.modules())
        assert n_fa4 == (2 * len(model.net.blocks) if backend == "fa4" else 0)
        views = [torch.zeros(3, 1, exp.data.height, exp.data.width) for _ in session.cameras]
        gt = session.encode(pad_condition_video(views, exp.data.num_frames))
        text = torch.randn(session.text_shape, generator=torch.Generator().manual_seed(0)).to(device, session.dtype)
        latents[backend] = session.sample(model, gt, text, 1, steps=4, guidance=3.0, seed=5, fps=10.0)
        kernel = session.describe()["sdpa_backend"]["kernel"]
        assert kernel.startswith("fa4 (flash-attn-4 ") == (backend == "fa4"), kernel
    return latents


def test_a_session_with_fa4_installs_it_and_samples_what_sdpa_samples(tmp_path, fake_fa4, monkeypatch):
    monkeypatch.setattr(fa4, "check", lambda device, head_dim, dtype: "fa4 (flash-attn-4 stand-in)")  # CPU, fp32
    latents = sample_with_each_backend(tiny_inference_setup(tmp_path, "fa4", steps=4), "cpu", "fp32", False, "auto")
    assert fake_fa4 and rel(latents["fa4"], latents["auto"]) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not has_fa4, reason="needs CUDA and the fa4 extra")
def test_on_the_gpu_a_session_with_fa4_samples_what_sdpa_samples(tmp_path):
    d = tiny_inference_setup(tmp_path, "fa4", steps=4)
    latents = sample_with_each_backend(d, "cuda", "bf16", True, "flash")  # auto would pick FA4 here
    assert rel(latents["fa4"], latents["flash"]) < 0.02, rel(latents["fa4"], latents["flash"])
