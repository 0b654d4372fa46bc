"""The benchmark scripts run (CPU smoke tests on the tiny preset) and write the JSON that BENCHMARKS.md is built
from: the context-parallel benchmark emulated on one device and for real with two gloo processes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks/common.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)
RESULTS = ROOT / "benchmarks/results"

SMALL = ["--preset", "tiny", "--height", "64", "--width", "96", "--frames", "17", "--device", "cpu"]


def run(cmd, tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_context_parallel_benchmark_emulates_ranks_on_one_device(tmp_path):
    out = tmp_path / "cp.json"
    run(
        [
            sys.executable,
            ROOT / "benchmarks/infer_cp.py",
            *SMALL,
            "--worlds",
            "1,2,3",
            "--compile",
            "eager",
            "--link-gbps",
            "100",
            "--out",
            out,
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"P1_eager", "P2_ulysses_eager", "P2_allgather_eager", "P3_allgather_eager"}
    r1, r3 = res["results"]["P1_eager"], res["results"]["P3_allgather_eager"]
    assert r1["speedup_vs_1gpu"] == 1.0 and r1["comm"]["ms"] == 0.0
    # 3 ranks: each receives 2/3 of every block's keys and values plus the output, at the modelled bandwidth
    cfg_blocks, tokens, width = 2, res["shapes"]["tokens"], 128
    kv = 2 * tokens * width * 4  # fp32 on the CPU
    assert r3["comm"]["bytes_per_block"] == kv
    assert abs(r3["comm"]["recv_bytes_per_forward"] - (cfg_blocks * kv + tokens * 64 * 4) * 2 / 3) < 1
    assert abs(r3["projected_forward_ms"] - r3["forward_ms_median"] - r3["comm"]["recv_bytes_per_forward"] / 1e8) < 1e-6
    assert r3["sample_s"] == pytest.approx(2 * 35 * r3["projected_forward_ms"] / 1e3, rel=1e-12)  # float order
    assert r3["sdpa"]["shape_q"][2] == -(-tokens // 3) and r3["sdpa"]["shape_kv"][2] == tokens
    # ulysses moves q, k, v and the output of the local tokens: 4 N D / P per block instead of 2 N D
    assert res["results"]["P2_ulysses_eager"]["comm"]["bytes_per_block"] == 4 * tokens * width * 4 / 2


def test_context_parallel_benchmark_measures_real_processes(tmp_path):
    out = tmp_path / "cp2.json"
    bench = [ROOT / "benchmarks/infer_cp.py", *SMALL, "--compile", "eager", "--out", out]
    run([sys.executable, ROOT / "src/launch.py", "--nproc", "2", "--on-stop", "terminate", "--", *bench], tmp_path)
    res = json.loads(out.read_text())
    assert res["processes"] == 2
    assert set(res["results"]) == {"P1_eager", "P2_ulysses_eager", "P2_allgather_eager"}
    for key in ("P2_ulysses_eager", "P2_allgather_eager"):
        comm = res["results"][key]["comm"]
        assert comm["measured_ms_per_block"] > 0 and comm["bus_gbps"] > 0
        assert res["results"][key]["speedup_vs_1gpu"] > 0


def test_block_profile_times_variants_and_groups_kernels(tmp_path):
    out = tmp_path / "block.json"
    variants = "eager,eager-contig,compile"
    run(
        [sys.executable, ROOT / "benchmarks/block_profile.py", *SMALL, "--variants", variants, "--skip-ceilings"]
        + ["--dtype", "float32", "--reps", "2", "--out", out],
        tmp_path,
    )
    res = json.loads(out.read_text())
    vs = res["variants"]
    assert set(vs) == set(variants.split(","))
    assert all(v["ms_median"] > 0 and v["finite"] for v in vs.values())
    assert vs["eager-contig"]["rel_diff_vs_eager"] == 0.0  # contiguous inputs change the layout, not the values
    assert 0 < vs["compile"]["rel_diff_vs_eager"] < 1e-6  # fp32 on the CPU: rounding only (measured 6.9e-9)


def test_train_path_stops_resumes_and_reloads_the_final_ema(tmp_path):
    out = tmp_path / "path.json"
    args = ["--preset", "tiny", "--lora", "--height", "32", "--width", "48", "--frames", "9", "--text-len", "8"]
    args += ["--nproc", "2", "--device", "cpu", "--iterations", "40", "--stop-after", "2", "--out", out]
    run([sys.executable, ROOT / "benchmarks/train_path.py", *args], tmp_path)
    res = json.loads(out.read_text())
    assert res["steps"] == list(range(40))  # one log across the stop and the resume
    assert 2 <= res["iterations_before_stop"] < 40 and res["final"]["iteration"] == 40
    assert res["ema_tensors"] > 0 and res["steady_step_s_median"] > 0
    assert any(k.endswith("_ema_model.pt") for k in res["files_mb"])


def test_single_gpu_benchmarks_run_on_the_tiny_preset(tmp_path):
    """infer.py, train_step.py and train_lora.py: the scripts behind BENCHMARKS.md sections 1-3, on the CPU."""
    small = ["--preset", "tiny", "--height", "64", "--width", "96", "--frames", "17", "--device", "cpu"]
    infer = ["--steps", "2", "--gen-steps", "2", "--variants", "base,cudnn+fusedqk,cudnn+compile", "--dtype", "float32"]
    run([sys.executable, ROOT / "benchmarks/infer.py", *small, *infer, "--out", tmp_path / "i.json"], tmp_path)
    res = json.loads((tmp_path / "i.json").read_text())
    # the variants compute the same forward: in fp32 they differed from eager by 2.4e-8 (fused q/k) and 4.1e-8
    # (compiled blocks) in relative norm, so 1e-6 leaves 25x headroom (bf16 on a GPU: 1e-2, BENCHMARKS.md section 1)
    errs = {k: v["rel_err_vs_first"] for k, v in res["variants"].items()}
    assert errs["base"] == 0.0 and all(e < 1e-6 for e in errs.values()), errs
    assert all(g["finite"] and len(g["steps_ms"]) == 2 for g in res["generate"].values())
    run([sys.executable, ROOT / "benchmarks/train_step.py", *small, "--out", tmp_path / "t.json"], tmp_path)
    res = json.loads((tmp_path / "t.json").read_text())
    points = [r for v in res["runs"].values() for k, r in v.items() if k != "summary" and isinstance(r, dict)]
    assert points and all(r["finite"] and r["ms_per_block"] > 0 for r in points)
    for variant, rv in res["runs"].items():  # each variant's own floor, from this call's ceilings and perf.md's
        for key, s in rv.get("summary", {}).items():
            assert s["floor"]["checkpointing"] == ("full" if key == "ac" else "none")
            assert s["floor"]["same_call_s"] > 0 and s["frac_of_floor"]["same_call"] > 0
            assert s["floor"] == C.stored_floor_fractions(res)[f"{variant}/{s['floor']['checkpointing']}"]["floors"]
    lora = ["--text-len", "16", "--variants", "ac,sac", "--out", tmp_path / "l.json"]
    run([sys.executable, ROOT / "benchmarks/train_lora.py", *small, *lora], tmp_path)
    res = json.loads((tmp_path / "l.json").read_text())
    assert set(res["runs"]) == {"ac", "sac"} and all(r["finite"] for r in res["runs"].values())
    assert [r["floor"]["checkpointing"] for r in res["runs"].values()] == ["full", "selective"]
    assert all(r["floor"]["lora"] and r["floor"]["same_call_s"] > 0 for r in res["runs"].values())


def test_fp8_training_gemms_have_the_linear_gradients_within_fp8_rounding():
    """benchmarks/train_fp8_block.py's Fp8TrainLinear (emulated on the CPU): forward, input and weight gradients of
    x W^T each within E4M3 rounding of the fp32 Linear's, the weight still the trained Parameter."""
    from torch import nn

    spec = importlib.util.spec_from_file_location("train_fp8_block", ROOT / "benchmarks/train_fp8_block.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch = mod.torch
    lin = nn.Linear(64, 48, bias=False)
    f = mod.Fp8TrainLinear(lin, emulate=True)
    assert [p for p in f.parameters()] == [lin.weight]
    x = torch.randn(2, 40, 64, requires_grad=True)
    g = torch.randn(2, 40, 48)
    grads = []
    for m in (lin, f):
        x.grad = lin.weight.grad = None
        y = m(x)
        y.backward(g)
        grads.append((y.detach(), x.grad.clone(), lin.weight.grad.clone()))
    for ref, got in zip(grads[0], grads[1], strict=True):
        e = float((got - ref).norm() / ref.norm())
        assert 1e-3 < e < 0.1, e  # rounded (not the fp32 path), within a few E4M3 ulps


def test_fp8_training_block_benchmark_runs_on_the_tiny_preset(tmp_path):
    out = tmp_path / "tfb.json"
    args = [*SMALL, "--no-compile", "--reps", "1", "--warmup", "1", "--out", out]
    run([sys.executable, ROOT / "benchmarks/train_fp8_block.py", *args], tmp_path)
    res = json.loads(out.read_text())
    b, f = res["variants"]["bf16"], res["variants"]["fp8"]
    assert b["swapped_linears"] == 0 and f["swapped_linears"] == 8 and b["step_ms_median"] > 0
    assert 0 < f["input_grad_rel_diff_vs_bf16"] < 0.1 and 0 < f["mlp_in_weight_grad_rel_diff_vs_bf16"] < 0.2
    assert "says nothing" in res["adopt_step_1"]["note"]


@pytest.mark.parametrize("name", ["train_step.json", "train_step_opt.json", "train_step_sac.json", "train_lora.json"])
def test_no_stored_training_run_is_faster_than_its_own_floor(name):
    """Each variant is held to the floor of its own checkpointing (and LoRA's missing weight gradients): a fraction
    above 1 would mean the floor is wrong, as applying full checkpointing's to selective checkpointing was."""
    res = json.loads((RESULTS / name).read_text())
    fr = C.stored_floor_fractions(res)
    assert fr
    for key, v in fr.items():
        same, (lo, hi) = v["fractions"]["same_call"], v["fractions"]["perfmd"]
        assert same is None or 0.5 < same <= 1, (key, same)
        assert 0.5 < lo < hi <= 1, (key, lo, hi)
    kinds = {k.split("/")[1] for k in fr}
    expected = {
        "train_step.json": {"none", "full"},
        "train_step_opt.json": {"none", "full"},
        "train_step_sac.json": {"full", "selective"},
        "train_lora.json": {"full", "selective"},
    }
    assert kinds == expected[name]
    assert all(v["floors"]["lora"] == (name == "train_lora.json") for v in fr.values())


def test_training_floors_reproduce_perf_md_and_order_the_variants():
    fl = json.loads((RESULTS / "train_step.json").read_text())["flops"]
    floors = {ck: C.train_floors(fl, None, ck)["perfmd_s"] for ck in C.CHECKPOINTING}
    assert floors["none"][1] == pytest.approx(21.5, abs=0.05)  # perf.md's floors: the 690 TFLOP/s GEMM card
    assert floors["full"][1] == pytest.approx(27.5, abs=0.1)
    assert floors["none"][0] < floors["selective"][0] < floors["full"][0]  # selective skips self-attention only
    lora = json.loads((RESULTS / "train_lora.json").read_text())["flops"]
    lora_full = C.train_floors(lora, None, "full", adapter_forward=lora["adapter_forward"])["perfmd_s"]
    gemm_s = fl["forward_gemm"] / C.PERF_MD_RATES["gemm"][0]  # the base weight gradients LoRA does not compute
    assert lora_full[0] == pytest.approx(floors["full"][0] - gemm_s + 4 * lora["adapter_forward"] / 805e12, rel=1e-9)
    with pytest.raises(ValueError):
        C.train_floor_s(fl, C.PERF_MD_RATES | {"gemm": 805e12}, "partial")
