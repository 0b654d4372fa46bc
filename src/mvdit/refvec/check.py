"""Check this implementation against reference vectors of the upstream code (safetensors files whose metadata
holds the config; see tests/data/REFVEC_README.md). Usage: python -m mvdit.refvec FILE [FILE ...]

Every setting (kind, network config, shapes, guidance, steps, condition frames, compat, augmentation sigma, the
training noise distributions and loss options) is read from each file; a file whose metadata lacks one is refused
with a one-line error. Lean files (per-step x0/x_next without x_in) are checked along our own trajectory.
Prints the max abs error per output tensor and exits 1 if any exceeds the tolerance: allclose(1e-4, 1e-4) by default
(the vectors' README), or the per-tensor bounds of a JSON file (--bounds; tests/data/refvec_bounds.json holds the
measured errors of the public vectors and bounds 4x above them).
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

from mvdit.model import sampler
from mvdit.model.config import NetConfig
from mvdit.model.edm import (
    Condition,
    condition_indicator,
    edm_scalings,
    inference_x0,
    num_condition_latent_frames,
    train_denoise,
)
from mvdit.model.network import DiffusionModel
from mvdit.model.sampler import karras_sigmas, sample_euler
from mvdit.refvec.parity import guided_train_x0, res_sigmas, sample_res_2ab
from mvdit.training.loss import LossDraws, lognormal_sigma, training_loss

ATOL = RTOL = 1e-4  # the README's recommended check for an fp32 CPU re-implementation
GRAD_REL = 1e-4
HEADROOM = 4.0  # --record-bounds: bound = HEADROOM x the measured error ...
BOUND_FLOOR_REL = 1e-6  # ... but at least this x max|ref| (about 8 fp32 ulps of the largest value)


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


# ------------------------------------------------------------------------------------------------ settings
def setting(meta: dict, path: str, what: str):
    """The metadata value at a dotted path (JSON strings inside are parsed); a refused file if it is absent."""
    cur = meta
    for part in path.split("."):
        if isinstance(cur, str):
            try:
                cur = json.loads(cur)
            except json.JSONDecodeError:
                pass
        if not isinstance(cur, dict) or part not in cur:
            raise RefvecError(f"metadata lacks {path!r} ({what})")
        cur = cur[part]
    if isinstance(cur, str) and cur[:1] in "[{":
        cur = json.loads(cur)
    return cur


def require(value, expected, name: str) -> None:
    """Refuse a setting this checker does not reproduce (the released model's value is `expected`)."""
    if value != expected:
        raise RefvecError(f"{name} = {value!r} is not supported (this implementation follows {expected!r})")


def n_views_of(meta: dict, tensors: dict) -> int:
    v = int(setting(meta, "shapes.V", "the number of views"))
    fr = tensors.get("input.frame_repeat")
    if fr is not None and fr.shape[-1] != v:
        raise RefvecError(f"shapes.V = {v} disagrees with input.frame_repeat of shape {list(fr.shape)}")
    return v


def sigma_data_of(meta: dict, path: str = "sigma_data") -> float:
    sd = float(setting(meta, path, "EDM sigma_data"))
    require(sd, 0.5, path)
    return sd


def compat_of(meta: dict) -> str:
    compat = str(setting(meta, "compat", "head or fixed inference behaviour"))
    if compat not in ("head", "fixed"):
        raise RefvecError(f"compat = {compat!r}: expected 'head' or 'fixed'")
    return compat


def guidance_of(meta: dict) -> float:
    return float(setting(meta, "args.guidance", "classifier-free guidance weight"))


def augment_sigma_of(meta: dict) -> float:
    """The inference path's condition-augmentation sigma."""
    return float(setting(meta, "augment_sigma", "inference condition-augmentation sigma"))


def train_aug_sigma(meta: dict) -> float:
    """The fixed corruption sigma of the training-side denoise (first entry of its sigma list)."""
    key = "video_cond_bool_train"
    mode = setting(meta, f"{key}.apply_corruption_to_condition_region", "training-side condition corruption")
    require(mode, "noise_with_sigma_fixed", f"{key}.apply_corruption_to_condition_region")
    vals = setting(meta, f"{key}.apply_corruption_to_condition_region_sigma_value", "its sigma")
    return float(vals[0])


def loss_settings(meta: dict) -> dict:
    """The training noise distributions of a train_loss file, and a refusal of any loss option we do not follow."""
    mc = "model_config"
    vc = f"{mc}.video_cond_bool"
    for path, expected in (
        (f"{mc}.loss_reduce", "mean"),
        (f"{mc}.loss_scale", 1.0),
        (f"{mc}.loss_add_logvar", True),
        (f"{mc}.loss_mask_enabled", False),
        (f"{mc}.adjust_video_noise", False),
        (f"{vc}.compute_loss_for_condition_region", False),
        (f"{vc}.apply_corruption_to_condition_region", "noise_with_sigma"),
        (f"{vc}.condition_on_augment_sigma", False),
        (f"{vc}.augment_sigma_sample_multiplier", 1.0),
    ):
        require(setting(meta, path, "a loss option"), expected, path)
    return {
        "sigma_data": sigma_data_of(meta, f"{mc}.sigma_data"),
        "p_mean": float(setting(meta, f"{mc}.sde.p_mean", "ln sigma ~ N(p_mean, p_std^2)")),
        "p_std": float(setting(meta, f"{mc}.sde.p_std", "ln sigma ~ N(p_mean, p_std^2)")),
        "aug_p_mean": float(setting(meta, f"{vc}.augment_sigma_sample_p_mean", "ln sigma_aug distribution")),
        "aug_p_std": float(setting(meta, f"{vc}.augment_sigma_sample_p_std", "ln sigma_aug distribution")),
    }


def condition(tensors: dict, meta: dict, noise_key: str, aug_sigma: float) -> Condition:
    sigma_data_of(meta)
    return Condition(
        gt_latent=tensors["input.gt_latent"],
        indicator=tensors["input.condition_video_indicator"],
        crossattn_emb=tensors["input.crossattn_emb"],
        n_views=n_views_of(meta, tensors),
        fps=tensors.get("input.fps"),
        padding_mask=tensors.get("input.padding_mask"),
        frame_repeat=tensors.get("input.frame_repeat"),
        augment_noise=tensors.get(noise_key),
        augment_sigma=aug_sigma,
        uncond_crossattn_emb=tensors.get("input.uncond_crossattn_emb"),
    )


# ------------------------------------------------------------------------------------------------ runners
def run_net_fwd(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    inp = {k[len("input.") :]: v for k, v in t.items() if k.startswith("input.")}
    n_views = n_views_of(meta, t)
    return {"output": model.net(**inp, n_views=n_views)}


def run_denoise(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    x, sigma = t["input.x_sigma"], t["input.sigma"].reshape(())
    guidance = guidance_of(meta)
    c_noise = edm_scalings(sigma)[3]
    if any(k.startswith("train.") for k in t):
        cond = condition(t, meta, "input.augment_noise_train", train_aug_sigma(meta))
        x0s = {}
        for name, c in {"cond": cond, "uncond": cond.uncond()}.items():
            r = train_denoise(model.net, x, sigma, c)
            out.update({f"train.{name}.{k}": v for k, v in r.items()})
            out[f"train.{name}.net_in"] = r["xt"] * edm_scalings(sigma)[2]
            x0s[name] = r["x0"]
        out["train.c_noise"] = c_noise.reshape(1)
        out["train.cfg.x0"] = x0s["cond"] + guidance * (x0s["cond"] - x0s["uncond"])
    if any(k.startswith("infer.") for k in t):
        cond = condition(t, meta, "input.augment_noise", augment_sigma_of(meta))
        r = inference_x0(model.net, x, sigma, cond, guidance, compat_of(meta))
        out["infer.new_xt"] = r["x_in"]
        out["infer.net_in"] = r["x_in"] * edm_scalings(sigma)[2]
        out["infer.timesteps"] = c_noise.reshape(1)
        for k in ("F_cond", "F_uncond", "model_output", "x0"):
            out[f"infer.{k}"] = r[k]
    return out


def run_sample(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    """Both samplers along our own trajectory, every intermediate recorded (a file may store any subset of them:
    lean files keep only x0 / x_next per step)."""
    out: dict[str, Tensor] = {}
    guidance = guidance_of(meta)
    for n in sorted({int(m.group(1)) for k in t if (m := re.match(r"euler(\d+)\.", k))}):
        cond = condition(t, meta, "input.augment_noise", augment_sigma_of(meta))
        compat = compat_of(meta)
        sigmas = karras_sigmas(n)
        p = f"euler{n}."
        out[p + "sigmas"] = sigmas
        out[p + "timesteps"] = edm_scalings(sigmas[:-1])[3]
        out[p + "init_noise_sigma"] = torch.tensor([sampler.init_noise_sigma()], dtype=torch.float32)
        out[p + "indicator_active"] = (sigmas[:-1] > cond.augment_sigma).float()
        calls = [0]

        def step(x, sigma, _cond=cond, _p=p, _calls=calls, _compat=compat):
            r = inference_x0(model.net, x, sigma, _cond, guidance, _compat)
            pre = f"{_p}step{_calls[0]}."
            _calls[0] += 1
            out[pre + "x_in"] = r["x_in"]
            out[pre + "net_in"] = r["x_in"] * edm_scalings(sigma)[2]
            for name in ("F_cond", "F_uncond", "model_output", "x0"):
                out[pre + name] = r[name]
            return r["x_in"], r["x0"]

        def record_next(k, d, _p=p):
            out[f"{_p}step{k}.x_next"] = d["x_next"]

        out[p + "output"] = sample_euler(step, t["input.init_noise_euler"], sigmas, callback=record_next)
    for n in sorted({int(m.group(1)) for k in t if (m := re.match(r"res(\d+)\.", k))}):
        cond = condition(t, meta, "input.augment_noise_train", train_aug_sigma(meta))
        p = f"res{n}."
        out[p + "sigmas"] = res_sigmas(n)
        branches: dict[str, Tensor] = {}

        def x0_fn(x, sigma, _cond=cond, _b=branches):
            guided, c, u = guided_train_x0(model.net, x, sigma, _cond, guidance)
            _b.update(x0_cond=c["x0"], x0_uncond=u["x0"])
            return guided

        def record(k, d, _p=p, _b=branches):  # called right after x0_fn on the same state
            pre = f"{_p}call{k}."
            out.update({pre + "x_in": d["x_in"], pre + "sigma": torch.tensor([d["sigma"]], dtype=torch.float32)})
            out.update({pre + "x0": d["x0"], pre + "x0_cond": _b["x0_cond"], pre + "x0_uncond": _b["x0_uncond"]})

        out[p + "output"] = sample_res_2ab(x0_fn, t["input.init_noise_res"], out[p + "sigmas"], callback=record)
    return out


def draws_of(t: dict, meta: dict, case: int, x0: Tensor, ls: dict) -> LossDraws:
    """The stored draws of one case; a draw the file leaves out comes from its stored uniform (through the file's
    distribution), else from the `cases` metadata, else (an inert random input) zeros."""
    b, p = x0.shape[0], f"case{case}."
    cases = meta.get("cases") if isinstance(meta.get("cases"), list) else []
    info = cases[case] if case < len(cases) else {}

    def scalar(key, meta_key, what):
        if p + key in t:
            return t[p + key]
        if meta_key in info:
            return torch.tensor([float(info[meta_key])])
        raise RefvecError(f"{p}{key} is absent and metadata 'cases[{case}].{meta_key}' lacks it ({what})")

    def lognormal(key, u_key, meta_key, mean, std):
        if p + key in t:
            return t[p + key]
        if p + u_key in t:
            return lognormal_sigma(torch.special.ndtri(t[p + u_key].double()), mean, std)
        if meta_key in info:
            return torch.tensor([float(info[meta_key])])
        return None

    sigma = lognormal("sigma", "rand.sigma_u", "sigma", ls["p_mean"], ls["p_std"])
    if sigma is None:
        raise RefvecError(f"{p}sigma: neither the tensor, its uniform nor 'cases[{case}].sigma' is in the file")
    aug_sigma = lognormal("aug_sigma", "rand.aug_sigma_u", "aug_sigma", ls["aug_p_mean"], ls["aug_p_std"])
    if p + "rand.text_keep" in t:
        keep = t[p + "rand.text_keep"]
    elif "text_dropped" in info:
        keep = torch.tensor([1.0 - float(info["text_dropped"])])
    else:
        raise RefvecError(f"{p}rand.text_keep is absent and metadata 'cases[{case}].text_dropped' lacks it")
    return LossDraws(
        text_keep=keep.float().reshape(b),
        n_cond=int(scalar("rand.n_cond", "n_cond", "conditioned latent frames").reshape(-1)[0]),
        epsilon=t.get(p + "rand.epsilon", torch.zeros_like(x0)),
        sigma=sigma.float().reshape(b),
        aug_sigma=(torch.zeros(b) if aug_sigma is None else aug_sigma).float().reshape(b),
        aug_noise=t.get(p + "rand.aug_noise", torch.zeros_like(x0)),
    )


def run_train_loss(model: DiffusionModel, t: dict, meta: dict) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    ls = loss_settings(meta)
    x0, text = t["input.x0"], t["input.t5_text_embeddings"]
    n_views = n_views_of(meta, t)
    cases = sorted({int(m.group(1)) for k in t if (m := re.match(r"case(\d+)\.", k))})
    for i in cases:
        p = f"case{i}."
        draws = draws_of(t, meta, i, x0, ls)
        model.zero_grad(set_to_none=True)
        fps, pad = t.get("input.fps"), t.get("input.padding_mask")
        r = training_loss(model, x0, text, draws, n_views, fps=fps, padding_mask=pad, sigma_data=ls["sigma_data"])
        r.loss.backward()
        out.update({p + k: v for k, v in r.parts.items()})
        out.update({p + "loss": r.loss, p + "edm_loss": r.edm_loss, p + "mse_loss": r.mse_loss})
        for key, mean, std in (("sigma", "p_mean", "p_std"), ("aug_sigma", "aug_p_mean", "aug_p_std")):
            u = t.get(f"{p}rand.{key}_u")
            if u is not None and p + key in t:  # the stored value must follow from its uniform and the file's law
                out[p + key] = lognormal_sigma(torch.special.ndtri(u.double()), ls[mean], ls[std])
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


# ------------------------------------------------------------------------------------------------ comparison
def output_keys(tensors: dict) -> list[str]:
    """The stored tensors a checker must reproduce (everything but inputs, weights and random draws)."""
    return sorted(k for k in tensors if not k.startswith(("input.", "net.", "logvar.")) and ".rand." not in k)


def default_rule(name: str, m: Tensor, r: Tensor, err: float, ref_max: float) -> tuple[bool, str]:
    """The vectors' README: allclose(1e-4, 1e-4); gradients 1e-4 of their max; gradient norms 1e-4 relative."""
    if ".grad.norm" in name:
        return err <= GRAD_REL * max(ref_max, 1e-12) or err <= 1e-10, "rel<=1e-4"
    if ".grad." in name:
        return err <= GRAD_REL * ref_max or err <= 1e-12, "max<=1e-4*max|ref|"
    return bool(torch.allclose(m, r, rtol=RTOL, atol=ATOL)), "allclose(1e-4,1e-4)"


def compare(mine: dict[str, Tensor], ref: dict[str, Tensor], bounds: dict[str, float] | None = None) -> list[Row]:
    """One row per stored output. With `bounds` (tensor -> max abs error), each tensor must stay within its own
    bound and a tensor without one fails; otherwise the default rule applies."""
    rows = []
    for name in output_keys(ref):
        if name not in mine:
            rows.append(Row(name, float("nan"), float("nan"), False, "not computed"))
            continue
        r = ref[name].double()
        m = mine[name].double().reshape(r.shape)
        err = float((m - r).abs().max()) if r.numel() else 0.0
        ref_max = float(r.abs().max()) if r.numel() else 0.0
        if bounds is None:
            ok, rule = default_rule(name, m, r, err, ref_max)
        elif name in bounds:
            ok, rule = err <= bounds[name], f"abs<={bounds[name]:.2e}"
        else:
            ok, rule = False, "no bound recorded"
        rows.append(Row(name, err, ref_max, bool(ok), rule))
    return rows


def load_bounds(path: Path) -> dict[str, dict[str, float]]:
    """file name -> tensor -> max abs error allowed, from a --record-bounds JSON."""
    files = json.loads(Path(path).read_text())["files"]
    return {f: {k: float(v["bound"]) for k, v in rows.items()} for f, rows in files.items()}


def record_bounds(results: dict[str, list[Row]], headroom: float = HEADROOM, floor_rel: float = BOUND_FLOOR_REL):
    """The bounds JSON: per tensor the measured error and max(headroom x measured, floor_rel x max|ref|)."""
    return {
        "about": "max abs error of `python -m mvdit.refvec` per stored tensor, measured on the public vectors, and "
        f"the bound the tests hold it to: max({headroom:g} x measured, {floor_rel:g} x max|ref|)",
        "headroom": headroom,
        "floor_rel": floor_rel,
        "files": {
            f: {
                r.name: {
                    "measured": r.max_abs,
                    "max_ref": r.ref_max,
                    "bound": float(f"{max(headroom * r.max_abs, floor_rel * r.ref_max):.3g}"),
                }
                for r in rows
            }
            for f, rows in results.items()
        },
    }


def check_file(path: Path, weights: Path | None = None, bounds: dict[str, float] | None = None) -> list[Row]:
    """Run our implementation on one vector file and compare every stored output tensor."""
    return compare(*run_file(path, weights), bounds)


def run_file(path: Path, weights: Path | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(ours, the file's tensors): everything our implementation computes for one vector file."""
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
        n = num_condition_latent_frames(int(n_input), compat_of(meta))
        t = ind.shape[2] // v
        mine["derived.condition_video_indicator"] = condition_indicator(v, t, min(n, t), batch=ind.shape[0])
        ref["derived.condition_video_indicator"] = ind
    return mine, ref


def args_of(meta: dict) -> dict:
    return meta.get("args") if isinstance(meta.get("args"), dict) else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvdit.refvec", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="reference vector files (.safetensors)")
    ap.add_argument("--weights", type=Path, default=None, help="file with the net.* tensors, if not beside the vector")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every tensor, not only the worst per file")
    ap.add_argument(
        "--bounds",
        type=Path,
        default=None,
        help="JSON of per-tensor max abs errors (tests/data/refvec_bounds.json); files it lists are held to them",
    )
    ap.add_argument("--record-bounds", type=Path, default=None, help="write the measured errors and bounds here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        bounds = load_bounds(args.bounds) if args.bounds else {}
    except (OSError, KeyError, ValueError) as e:
        print(f"ERROR {args.bounds}: not a bounds file ({e})", file=sys.stderr)
        return 1
    failed, measured = 0, {}
    for path in args.files:
        try:
            rows = check_file(path, args.weights, bounds.get(path.name))
        except (RefvecError, KeyError, ValueError) as e:
            msg = str(e).replace("\n", " ")
            print(f"ERROR {path}: {msg.removeprefix(f'{path}: ')}", file=sys.stderr)
            failed += 1
            continue
        measured[path.name] = rows
        bad = [r for r in rows if not r.ok]
        print(f"{path}: {len(rows)} tensors, {len(bad)} over tolerance")
        for r in rows if args.verbose else sorted(rows, key=lambda r: -(r.max_abs / max(r.ref_max, 1e-30)))[:5] + bad:
            flag = "ok  " if r.ok else "FAIL"
            print(f"  {flag} {r.name:55s} max_abs_err={r.max_abs:.3e}  max|ref|={r.ref_max:.3e}  [{r.rule}]")
        failed += bool(bad)
    if args.record_bounds:
        args.record_bounds.write_text(json.dumps(record_bounds(measured), indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
