"""Check this implementation against reference vectors of the upstream code (safetensors files whose metadata
holds the config; see tests/data/REFVEC_README.md). Usage: python -m mvdit.refvec FILE [FILE ...]

Everything (kind, network config, shapes, guidance, steps, condition frames, compat) is read from each file.
Prints the max abs error per output tensor and exits 1 if any exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from mvdit.config import NetConfig
from mvdit.edm import (
    Condition,
    condition_indicator,
    edm_scalings,
    guided_train_x0,
    inference_x0,
    num_condition_latent_frames,
    train_denoise,
)
from mvdit.loss import LossDraws, lognormal_sigma, training_loss
from mvdit.network import DiffusionModel
from mvdit.sampler import euler_step, init_noise_sigma, karras_sigmas, res_sigmas, sample_euler, sample_res_2ab

ATOL = RTOL = 1e-4  # the README's recommended check for an fp32 CPU re-implementation
GRAD_REL = 1e-4


class RefvecError(RuntimeError):
    """A vector file that cannot be checked (unknown kind, missing weights file, unsupported setting)."""


@dataclass
class Row:
    name: str
    max_abs: float
    ref_max: float
    ok: bool
    rule: str


def read_vector(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        meta = safe_open(str(path), "pt").metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise RefvecError(f"{path}: not a readable safetensors vector file ({e})") from e
    parsed = {}
    for k, v in meta.items():
        try:
            parsed[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            parsed[k] = v
    return tensors, parsed


def vector_kind(tensors: dict, meta: dict) -> str:
    if meta.get("kind"):
        return str(meta["kind"])
    keys = set(tensors)
    if "output" in keys and "input.x" in keys:
        return "net_fwd"
    if any(k.startswith(("infer.", "train.")) for k in keys):
        return "denoise"
    if any(re.match(r"(euler|res)\d+\.", k) for k in keys):
        return "sample"
    raise RefvecError("cannot tell the vector kind from its keys or metadata")


def net_config(meta: dict) -> NetConfig:
    cfg = meta.get("net_config") or meta.get("config")
    if not isinstance(cfg, dict):
        raise RefvecError("metadata has no 'net_config' / 'config' JSON")
    return NetConfig.from_upstream(cfg)


def weights_file(path: Path, meta: dict, override: Path | None) -> Path:
    if override is not None:
        return override
    for key in ("net_weights_from", "weights"):
        m = re.search(r"([\w.\-]+\.safetensors)", str(meta.get(key, "")))
        if m:
            cand = path.parent / m.group(1)
            if cand.exists():
                return cand
            raise RefvecError(f"{path}: its weights live in {m.group(1)}, not found beside it; pass --weights FILE")
    raise RefvecError(f"{path}: no network weights in the file or its metadata; pass --weights FILE")


def build_model(path: Path, tensors: dict, meta: dict, weights: Path | None) -> DiffusionModel:
    cfg = net_config(meta)
    model = DiffusionModel(cfg)
    net_sd = {k: v for k, v in tensors.items() if k.startswith("net.")}
    if not net_sd:
        net_sd = {k: v for k, v in load_file(str(weights_file(path, meta, weights))).items() if k.startswith("net.")}
    sd = {k[4:]: v for k, v in net_sd.items()}
    missing, unexpected = model.net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RefvecError(f"{path}: weights do not fit the config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    logvar = {k[len("logvar.") :]: v for k, v in tensors.items() if k.startswith("logvar.")}
    if logvar:
        model.logvar.load_state_dict(logvar, strict=True)
    return model.eval()


def n_views_of(meta: dict, tensors: dict) -> int:
    shapes = meta.get("shapes") or {}
    if "V" in shapes:
        return int(shapes["V"])
    if "input.frame_repeat" in tensors:
        return int(tensors["input.frame_repeat"].shape[1])
    raise RefvecError("cannot tell the number of views (no shapes.V metadata, no input.frame_repeat)")


def condition(tensors: dict, meta: dict, noise_key: str, aug_sigma: float | None = None) -> Condition:
    sd = float(meta.get("sigma_data", 0.5))
    if abs(sd - 0.5) > 1e-12:
        raise RefvecError(f"sigma_data={sd} is not supported (the released model uses 0.5)")
    return Condition(
        gt_latent=tensors["input.gt_latent"],
        indicator=tensors["input.condition_video_indicator"],
        crossattn_emb=tensors["input.crossattn_emb"],
        n_views=n_views_of(meta, tensors),
        fps=tensors.get("input.fps"),
        padding_mask=tensors.get("input.padding_mask"),
        frame_repeat=tensors.get("input.frame_repeat"),
        augment_noise=tensors.get(noise_key),
        augment_sigma=float(meta.get("augment_sigma", 0.001) if aug_sigma is None else aug_sigma),
        uncond_crossattn_emb=tensors.get("input.uncond_crossattn_emb"),
    )


def args_of(meta: dict) -> dict:
    return meta.get("args") if isinstance(meta.get("args"), dict) else {}


def train_aug_sigma(meta: dict) -> float:
    """The fixed corruption sigma of the training-side denoise (first entry of its sigma list)."""
    vc = meta.get("video_cond_bool_train") or {}
    vals = vc.get("apply_corruption_to_condition_region_sigma_value")
    if isinstance(vals, str):
        vals = json.loads(vals)
    return float(vals[0]) if vals else 0.001


def run_net_fwd(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    inp = {k[len("input.") :]: v for k, v in t.items() if k.startswith("input.")}
    n_views = n_views_of(meta, t)
    return {"output": model.net(**inp, n_views=n_views)}


def run_denoise(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    x, sigma = t["input.x_sigma"], t["input.sigma"].reshape(())
    guidance = float(args_of(meta).get("guidance", 7.0))
    compat = str(meta.get("compat", "head"))
    c_noise = edm_scalings(sigma)[3]
    if any(k.startswith("train.") for k in t):
        cond = condition(t, meta, "input.augment_noise_train", train_aug_sigma(meta))
        branches = {"cond": cond, "uncond": cond.uncond()}
        x0s = {}
        for name, c in branches.items():
            r = train_denoise(model.net, x, sigma, c)
            _, _, c_in, _ = edm_scalings(sigma)
            out.update({f"train.{name}.{k}": v for k, v in r.items()})
            out[f"train.{name}.net_in"] = r["xt"] * c_in
            x0s[name] = r["x0"]
        out["train.c_noise"] = c_noise.reshape(1)
        out["train.cfg.x0"] = x0s["cond"] + guidance * (x0s["cond"] - x0s["uncond"])
    if any(k.startswith("infer.") for k in t):
        cond = condition(t, meta, "input.augment_noise")
        r = inference_x0(model.net, x, sigma, cond, guidance, compat)
        out["infer.new_xt"] = r["x_in"]
        out["infer.net_in"] = r["x_in"] * edm_scalings(sigma)[2]
        out["infer.timesteps"] = c_noise.reshape(1)
        for k in ("F_cond", "F_uncond", "model_output", "x0"):
            out[f"infer.{k}"] = r[k]
    return out


def run_sample(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    guidance = float(args_of(meta).get("guidance", 7.0))
    compat = str(meta.get("compat", "head"))
    for n in sorted({int(m.group(1)) for k in t if (m := re.match(r"euler(\d+)\.", k))}):
        cond = condition(t, meta, "input.augment_noise")
        sigmas = karras_sigmas(n)
        p = f"euler{n}."
        out[p + "sigmas"] = sigmas
        out[p + "timesteps"] = edm_scalings(sigmas[:-1])[3]
        out[p + "init_noise_sigma"] = torch.tensor([init_noise_sigma()], dtype=torch.float32)
        out[p + "indicator_active"] = (sigmas[:-1] > cond.augment_sigma).float()

        def step(x, sigma, _cond=cond, _p=p, _sigmas=sigmas):
            r = inference_x0(model.net, x, sigma, _cond, guidance, compat)
            k = int((_sigmas == sigma).nonzero()[0])
            pre = f"{_p}step{k}."
            if pre + "x_in" in t:
                out[pre + "x_in"] = r["x_in"]
                out[pre + "net_in"] = r["x_in"] * edm_scalings(sigma)[2]
                for name in ("F_cond", "F_uncond", "model_output", "x0"):
                    out[pre + name] = r[name]
                out[pre + "x_next"] = euler_step(r["x_in"], r["x0"], sigma, _sigmas[k + 1])
            return r["x_in"], r["x0"]

        out[p + "output"] = sample_euler(step, t["input.init_noise_euler"], sigmas)
    for n in sorted({int(m.group(1)) for k in t if (m := re.match(r"res(\d+)\.", k))}):
        cond = condition(t, meta, "input.augment_noise_train", train_aug_sigma(meta))
        p = f"res{n}."
        out[p + "sigmas"] = res_sigmas(n)

        def x0_fn(x, sigma, _cond=cond):
            return guided_train_x0(model.net, x, sigma, _cond, guidance)[0]

        def record(k, d, _p=p, _cond=cond):
            pre = f"{_p}call{k}."
            if pre + "x_in" not in t:
                return
            sigma = torch.tensor(d["sigma"], dtype=torch.float32)
            g, c, u = guided_train_x0(model.net, d["x_in"], sigma, _cond, guidance)
            out.update({pre + "x_in": d["x_in"], pre + "sigma": sigma.reshape(t[pre + "sigma"].shape)})
            out.update({pre + "x0_cond": c["x0"], pre + "x0_uncond": u["x0"], pre + "x0": d["x0"]})

        out[p + "output"] = sample_res_2ab(x0_fn, t["input.init_noise_res"], out[p + "sigmas"], callback=record)
    return out


def draws_of(t: dict, prefix: str, x0: Tensor) -> LossDraws:
    b = x0.shape[0]

    def get(key, default):
        return t.get(prefix + key, default)

    sigma = get("sigma", None)
    if sigma is None:
        sigma = lognormal_sigma(torch.special.ndtri(t[prefix + "rand.sigma_u"].double()), 0.0, 1.0)
    aug_sigma = get("aug_sigma", None)
    if aug_sigma is None:
        u = get("rand.aug_sigma_u", None)
        aug_sigma = torch.zeros(b) if u is None else lognormal_sigma(torch.special.ndtri(u.double()), -3.0, 2.0)
    return LossDraws(
        text_keep=get("rand.text_keep", torch.ones(b)).float().reshape(b),
        n_cond=int(get("rand.n_cond", torch.zeros(1)).reshape(-1)[0]),
        epsilon=get("rand.epsilon", torch.zeros_like(x0)),
        sigma=sigma.float().reshape(b),
        aug_sigma=aug_sigma.float().reshape(b),
        aug_noise=get("rand.aug_noise", torch.zeros_like(x0)),
    )


def run_train_loss(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    x0, text = t["input.x0"], t["input.t5_text_embeddings"]
    n_views = n_views_of(meta, t)
    cases = sorted({int(m.group(1)) for k in t if (m := re.match(r"case(\d+)\.", k))})
    for i in cases:
        p = f"case{i}."
        draws = draws_of(t, p, x0)
        model.zero_grad(set_to_none=True)
        fps, pad = t.get("input.fps"), t.get("input.padding_mask")
        r = training_loss(model, x0, text, draws, n_views, fps=fps, padding_mask=pad)
        r.loss.backward()
        out.update({p + k: v for k, v in r.parts.items()})
        out.update({p + "loss": r.loss, p + "edm_loss": r.edm_loss, p + "mse_loss": r.mse_loss})
        if p + "rand.sigma_u" in t and p + "sigma" in t:
            out[p + "sigma"] = lognormal_sigma(torch.special.ndtri(t[p + "rand.sigma_u"].double()), 0.0, 1.0)
        grads = {n: torch.zeros_like(w) if w.grad is None else w.grad for n, w in model.named_parameters()}
        net_norms = torch.stack([g.norm() for n, g in grads.items() if n.startswith("net.")])
        all_norms = torch.stack([g.norm() for g in grads.values()])
        out[p + "grad.norm_net"] = net_norms.norm()
        out[p + "grad.norm_all"] = all_norms.norm()
        out[p + "grad.norm_net_f64"] = torch.stack(
            [g.double().norm() for n, g in grads.items() if n.startswith("net.")]
        ).norm()
        for name, g in grads.items():
            out[p + "grad." + name] = g
    return {k: v.detach() for k, v in out.items()}


RUNNERS = {"net_fwd": run_net_fwd, "denoise": run_denoise, "sample": run_sample, "train_loss": run_train_loss}


def compare(mine: dict[str, Tensor], ref: dict[str, Tensor], kind: str) -> list[Row]:
    rows = []
    for name in sorted(ref):
        if name.startswith("input.") or ".rand." in name or name.startswith(("net.", "logvar.")) or name not in mine:
            continue
        r = ref[name].double()
        m = mine[name].double().reshape(r.shape)
        err = float((m - r).abs().max()) if r.numel() else 0.0
        ref_max = float(r.abs().max()) if r.numel() else 0.0
        if ".grad.norm" in name:
            ok, rule = err <= GRAD_REL * max(ref_max, 1e-12) or err <= 1e-10, "rel<=1e-4"
        elif ".grad." in name:
            ok, rule = err <= GRAD_REL * ref_max or err <= 1e-12, "max<=1e-4*max|ref|"
        else:
            ok, rule = torch.allclose(m, r, rtol=RTOL, atol=ATOL), "allclose(1e-4,1e-4)"
        rows.append(Row(name, err, ref_max, bool(ok), rule))
    skip = ("input.", "net.", "logvar.")
    for name in [k for k in ref if k not in mine and not k.startswith(skip) and ".rand." not in k]:
        rows.append(Row(name, float("nan"), float("nan"), False, "not computed"))
    return rows


def check_file(path: Path, weights: Path | None = None, threads: int | None = None) -> list[Row]:
    """Run our implementation on one vector file and compare every stored output tensor."""
    tensors, meta = read_vector(path)
    kind = vector_kind(tensors, meta)
    if kind not in RUNNERS:
        raise RefvecError(f"{path}: unknown vector kind {kind!r}")
    model = build_model(path, tensors, meta, weights)
    grad = torch.enable_grad() if kind == "train_loss" else torch.no_grad()
    with grad:
        mine = RUNNERS[kind](model, tensors, meta)
    ref = dict(tensors)
    n_input = args_of(meta).get("num_input_frames")
    if n_input is not None and "input.condition_video_indicator" in tensors:
        # the pipeline's own rule for n (fixed: 1 + 8k pixel frames -> 1 + k latent frames; head: 9 -> 1)
        ind = tensors["input.condition_video_indicator"]
        v = n_views_of(meta, tensors)
        n = num_condition_latent_frames(int(n_input), str(meta.get("compat", "head")))
        t = ind.shape[2] // v
        mine["derived.condition_video_indicator"] = condition_indicator(v, t, min(n, t), batch=ind.shape[0])
        ref["derived.condition_video_indicator"] = ind
    return compare(mine, ref, kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvdit.refvec", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="reference vector files (.safetensors)")
    ap.add_argument("--weights", type=Path, default=None, help="file with the net.* tensors, if not beside the vector")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every tensor, not only the worst per file")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    failed = 0
    for path in args.files:
        try:
            rows = check_file(path, args.weights)
        except (RefvecError, KeyError, ValueError) as e:
            print(f"ERROR {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        bad = [r for r in rows if not r.ok]
        print(f"{path}: {len(rows)} tensors, {len(bad)} over tolerance")
        for r in rows if args.verbose else sorted(rows, key=lambda r: -(r.max_abs / max(r.ref_max, 1e-30)))[:5] + bad:
            flag = "ok  " if r.ok else "FAIL"
            print(f"  {flag} {r.name:55s} max_abs_err={r.max_abs:.3e}  max|ref|={r.ref_max:.3e}  [{r.rule}]")
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
