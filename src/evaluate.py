"""Score predicted continuations of held-out clips: PSNR and SSIM of one sample per clip (the headline) and of the
mean of N samples, for the post-trained model, the model it started from, two baselines without a model (copy the
last input frame; the tokenizer's own continuation: the input's latent frames followed by mean latents, decoded) and
the tokenizer's reconstruction (the ceiling), with temporal and cross-view consistency; optionally a sheet of ground
truth beside the post-trained sample for every held-out clip.

Example (R=results/tiny_demo): python src/evaluate.py --experiment experiments/tiny_demo.yaml \
  --data-manifest $R/data/manifest.json --trained <post-trained model.pt> --baseline <release model.pt> \
  --out $R/report/eval.json [--sheet $R/report/heldout.png]
Under torchrun (infer.nproc > 1: python src/launch.py --nproc N -- src/evaluate.py ...) the processes share each
sample by context parallelism, as in infer.py; the main process encodes, decodes, scores and writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mvdit.assets.checkpoint import CheckpointError
from mvdit.assets.files import write_json
from mvdit.data.dataset import DatasetError
from mvdit.data.manifest import dataset_from_manifest
from mvdit.data.video_io import from_model_pixels
from mvdit.encoders.tokenizer import TokenizerLoadError
from mvdit.inference.metrics import cross_view_consistency, overlap_agreement, psnr, ssim, temporal_consistency
from mvdit.inference.session import SamplingSession
from mvdit.model.edm import num_condition_latent_frames
from mvdit.runtime import context_parallel
from mvdit.runtime.console import say
from mvdit.workflow.experiment import ExperimentError, load_experiment


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path)
    ap.add_argument("--data-manifest", required=True, type=Path)
    ap.add_argument("--trained", required=True, type=Path, help="post-trained model.pt")
    ap.add_argument("--baseline", required=True, type=Path, help="the model training started from")
    ap.add_argument("--out", required=True, type=Path, help="metrics JSON")
    ap.add_argument("--sheet", type=Path, default=None, help="PNG: ground truth beside the post-trained sample")
    ap.add_argument("--tokenizer-dir", type=Path, default=None)
    ap.add_argument("--guidance", type=float, default=None, help="override infer.guidance")
    ap.add_argument("--samples", type=int, default=None, help="override infer.eval_samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        metrics = evaluate(args)
    except (ExperimentError, CheckpointError, DatasetError, TokenizerLoadError, ValueError) as e:
        say(f"evaluate.py{context_parallel.rank_tag()}: {e}")
        return 1
    except torch.OutOfMemoryError as e:
        say(
            f"evaluate.py{context_parallel.rank_tag()}: out of GPU memory ({str(e).splitlines()[0]}); "
            "set infer.offload_tokenizer, use bf16, fewer data.cameras or fewer infer.eval_samples"
        )
        return 1
    finally:
        context_parallel.finish()
    if metrics is None:  # not the main process
        return 0
    sheets = metrics.pop("_sheets")
    if args.sheet is not None:
        write_sheet(args.sheet, sheets, metrics)
    write_json(args.out, metrics)
    p = metrics["psnr_db"]
    say(
        f"PSNR of predicted frames, one sample: post-trained {p['post_trained_single_sample']:.2f} dB, untrained "
        f"{p['untrained_single_sample']:.2f} dB, copy-last-frame {p['copy_last_frame']:.2f} dB, tokenizer continuation "
        f"{p['tokenizer_continuation']:.2f} dB, tokenizer ceiling "
        f"{p['tokenizer_ceiling']:.2f} dB; mean of {metrics['samples']}: post-trained {p['post_trained']:.2f} dB"
    )
    return 0


def write_sheet(path: Path, sheets: list[dict], metrics: dict, n_cols: int = 9) -> None:
    """One panel per held-out clip: per camera a row of ground-truth frames over a row of the post-trained model's
    (single, scored) sample; frames across, evenly spaced from the first input frame to the last frame."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mvdit.assets.files import atomic_write

    per_clip = metrics["psnr_db_per_clip"]
    n_frames, h, w = next(iter(sheets[0]["truth"].values())).shape[:3]
    cols = np.unique(np.linspace(0, n_frames - 1, min(n_cols, n_frames)).round().astype(int))
    rows = 2 * len(sheets[0]["truth"])
    fig = Figure(figsize=(len(cols) * w / 50 + 1.8, len(sheets) * (rows * h / 50 + 0.6)), dpi=100)
    FigureCanvasAgg(fig)
    for i, sheet in enumerate(sheets):
        ax = fig.add_subplot(len(sheets), 1, i + 1)
        strips, labels = [], []
        for cam, truth in sheet["truth"].items():
            strips += [np.concatenate(list(truth[cols]), 1), np.concatenate(list(sheet["pred"][cam][cols]), 1)]
            labels += [f"{cam}: truth", f"{cam}: model"]
        ax.imshow(np.concatenate(strips, 0), interpolation="nearest")
        ax.set_yticks([(r + 0.5) * h for r in range(rows)], labels, fontsize=7)
        ax.set_xticks([(c + 0.5) * w for c in range(len(cols))], [f"frame {t}" for t in cols], fontsize=7)
        ax.set_title(
            f"held-out {sheet['name']} (frames >= {metrics['num_input_frames']} predicted), PSNR of one sample: "
            f"post-trained {per_clip['post_trained_single_sample'][i]:.2f} dB, copy-last-frame "
            f"{per_clip['copy_last_frame'][i]:.2f} dB, tokenizer continuation "
            f"{per_clip['tokenizer_continuation'][i]:.2f} dB, "
            f"untrained {per_clip['untrained_single_sample'][i]:.2f} dB",
            fontsize=8,
        )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def evaluate(args: argparse.Namespace) -> dict | None:
    cfg = load_experiment(args.experiment)
    d, inf = cfg.data, cfg.infer
    cameras, f = d.cameras, d.num_frames
    n_in = inf.num_input_frames
    if n_in >= f:
        raise ValueError(f"infer.num_input_frames={n_in} leaves no frame to predict in {f}-frame clips")
    session = SamplingSession(cfg, args.experiment, args.device, args.tokenizer_dir)  # checks before any load
    procs, dev, dtype = session.procs, session.device, session.dtype
    if procs.main:
        say(f"evaluate: attention kernel: {session.attn_kernel} (infer.sdpa_backend: {inf.sdpa_backend})")
    guidance = inf.guidance if args.guidance is None else args.guidance
    dataset = dataset_from_manifest(args.data_manifest, split="held_out")
    n_clips = min(len(dataset), inf.eval_clips)
    if n_clips == 0:
        raise ValueError(f"{args.data_manifest}: no held-out clips to evaluate (set data.held_out > 0)")
    models = {"post_trained": session.load(args.trained), "untrained": session.load(args.baseline)}
    n_samples = inf.eval_samples if args.samples is None else args.samples
    baselines = ["copy_last_frame", "tokenizer_continuation", "tokenizer_ceiling"]
    keys = [*models, *(f"{m}_single_sample" for m in models), *baselines]
    scores: dict[str, list[float]] = {k: [] for k in keys}
    # single-sample video metrics: SSIM of the predicted frames, temporal and cross-view consistency
    methods = [*models, *baselines, "ground_truth"]
    extra = {
        m: {"ssim": [], "temporal_consistency": [], "cross_view_matches": [], "overlap_psnr_db": []} for m in methods
    }
    # the overlap agreement resamples neighbouring views through the synthetic rig's geometry: its clips only
    rig = d.source == "synthetic"

    def add_overlap(method: str, frames: dict[str, np.ndarray]) -> None:
        if rig:  # of the predicted frames
            extra[method]["overlap_psnr_db"].append(overlap_agreement({c: v[n_in:] for c, v in frames.items()}))

    sheets = []
    for i in range(n_clips):
        item = dataset[i]
        cond_video = None
        if procs.main:  # the other processes need only the text and fps
            video = item["video"].float().to(dev) / 128.0 - 1  # inference normalisation, [3, V*F, H, W]
            views = video.reshape(3, len(cameras), f, *video.shape[-2:])
            target = views[:, :, n_in:]
            cond = views.clone()
            cond[:, :, n_in:] = 0  # the input frames, zero-padded as the pipeline does
            cond_video = cond.reshape(1, 3, len(cameras) * f, *video.shape[-2:])
            recon = session.round_trip(video[None])
            truth = {c: from_model_pixels(views[:, v]) for v, c in enumerate(cameras)}
            recon = recon.float().reshape(views.shape).clamp(-1, 1)
            copied = torch.cat([views[:, :, :n_in], views[:, :, n_in - 1 : n_in].expand_as(target)], dim=2)
        gt = session.encode(cond_video)
        if procs.main:
            # What the tokenizer continues by itself: the input's latent frames, then the mean latent (0 in the
            # normalised space the model samples in), decoded. A model's sample must beat this to add anything.
            per_view = gt.reshape(*gt.shape[:2], len(cameras), -1, *gt.shape[-2:]).clone()
            per_view[:, :, :, min(num_condition_latent_frames(n_in, inf.compat), per_view.shape[3]) :] = 0
            continued = session.decode(per_view.reshape(gt.shape)).reshape(views.shape).clamp(-1, 1)
            pairs = (("tokenizer_ceiling", recon), ("copy_last_frame", copied), ("tokenizer_continuation", continued))
            for name, pred in pairs:
                scores[name].append(psnr(pred[:, :, n_in:], target))
                extra[name]["ssim"].append(ssim(pred[:, :, n_in:], target))
                frames = {c: from_model_pixels(pred[:, v]) for v, c in enumerate(cameras)}
                extra[name]["temporal_consistency"].append(
                    float(np.mean([temporal_consistency(frames[c], truth[c]) for c in cameras]))
                )
                add_overlap(name, frames)
        text = item["t5_text_embeddings"][None].to(dev, dtype)  # the same files on every process
        for name, model in models.items():
            pix = 0
            for k in range(n_samples):  # the mean of several samples estimates the MSE-optimal prediction
                latent = session.sample(
                    model, gt, text, n_in, steps=inf.steps, guidance=guidance, seed=inf.seed + 1000 * i + k,
                    fps=float(item["fps"]),
                )  # fmt: skip
                if not procs.main:
                    continue
                sample = session.decode(latent).reshape(views.shape).clamp(-1, 1)
                if k == 0:
                    scores[f"{name}_single_sample"].append(psnr(sample[:, :, n_in:], target))
                    video = {c: from_model_pixels(sample[:, v]) for v, c in enumerate(cameras)}
                    extra[name]["ssim"].append(ssim(sample[:, :, n_in:], target))
                    extra[name]["temporal_consistency"].append(
                        float(np.mean([temporal_consistency(video[c], truth[c]) for c in cameras]))
                    )
                    extra[name]["cross_view_matches"].append(cross_view_consistency(video))
                    add_overlap(name, video)
                    if name == "post_trained":
                        extra["ground_truth"]["cross_view_matches"].append(cross_view_consistency(truth))
                        add_overlap("ground_truth", truth)
                        sheets.append({"name": f"clip {i}", "truth": truth, "pred": video})
                pix = pix + sample / n_samples
            if procs.main:
                scores[name].append(psnr(pix[:, :, n_in:], target))
    if not procs.main:
        return None
    single, copied = np.array(scores["post_trained_single_sample"]), np.array(scores["copy_last_frame"])
    continued = np.array(scores["tokenizer_continuation"])
    return {
        "experiment": cfg.name,
        "trained": str(args.trained),
        "baseline": str(args.baseline),  # the model training started from
        "clips": n_clips,
        "num_input_frames": n_in,
        "guidance": guidance,
        "steps": inf.steps,
        "samples": n_samples,  # per clip and model; sample k of clip i has seed infer.seed + 1000 i + k
        "seed": inf.seed,
        "context_parallel": procs.world,
        **{k: v for k, v in session.describe().items() if k in ("sdpa_backend", "precision")},
        "psnr_db": {k: float(np.mean(v)) for k, v in scores.items()},
        "psnr_db_per_clip": scores,
        "single_sample_metrics": {m: {k: float(np.mean(v)) for k, v in d.items() if v} for m, d in extra.items()},
        "single_sample_metrics_per_clip": {m: {k: v for k, v in d.items() if v} for m, d in extra.items()},
        # the headline: one sample (not the mean of N, which PSNR rewards for blurring) against the baselines
        "single_sample_margin_over_copy_last_frame_db": float(np.mean(single - copied)),
        "single_sample_beats_copy_last_frame_on_every_clip": bool((single > copied).all()),
        "single_sample_margin_over_tokenizer_continuation_db": float(np.mean(single - continued)),
        "beats_baselines": bool(single.mean() > max(np.mean(scores["untrained_single_sample"]), copied.mean())),
        "beats_tokenizer_continuation": bool(single.mean() > continued.mean()),
        "_sheets": sheets,  # popped by main
    }


if __name__ == "__main__":
    sys.exit(main())
