"""Summarise an experiment: the loss curve (optimised loss and the plain weighted MSE), and one metrics JSON with
training speed, held-out PSNR against the baselines and per-prompt-set inference timings.

Example (R=results/tiny_demo): python src/report.py --train-log $R/train/train_log.jsonl --eval $R/report/eval.json \
  --infer-json $R/infer/*/*.json --loss-png $R/report/loss.png --metrics $R/report/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mvdit.assets.files import atomic_write, write_json


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k < 2:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_losses(log: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in log])
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    k = max(1, len(log) // 50)
    for key, label in (("loss", "optimised loss (uncertainty-weighted, can be < 0)"), ("edm_loss", "weighted MSE")):
        y = np.array([r[key] for r in log], dtype=float)
        ax.plot(steps, y, alpha=0.25, lw=0.8)
        ax.plot(steps[k - 1 :] if k > 1 else steps, smooth(y, k), lw=1.8, label=f"{label}, mean of {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_psnr_per_clip(ev: dict, path: Path, title: str) -> None:
    """Held-out PSNR per clip: one sample of the post-trained and the untrained model against copy-last-frame, the
    tokenizer's own continuation and the tokenizer ceiling; the mean of N post-trained samples as open markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_clip = ev["psnr_db_per_clip"]
    x = np.arange(ev["clips"])
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = (
        ("tokenizer_ceiling", "tokenizer round trip (ceiling)", "k", "_", "-"),
        ("post_trained_single_sample", "post-trained, one sample", "C0", "o", "-"),
        ("post_trained", f"post-trained, mean of {ev.get('samples', 'N')} samples", "C0", "o", "none"),
        ("copy_last_frame", "copy the last input frame", "C1", "s", "-"),
        ("tokenizer_continuation", "tokenizer's own continuation (no model)", "C2", "D", "-"),
        ("untrained_single_sample", "untrained, one sample", "C3", "v", "-"),
    )
    for key, label, colour, marker, line in series:
        y = per_clip[key]
        filled = line != "none"
        ax.plot(x, y, marker=marker, color=colour, ls="-" if filled else "none", mfc=colour if filled else "none",
                ms=9 if key == "tokenizer_ceiling" else 7, label=f"{label}: mean {np.mean(y):.2f} dB")  # fmt: skip
    ax.set_xticks(x, [f"clip {i}" for i in x])
    ax.set_xlabel("held-out clip")
    ax.set_ylabel(f"PSNR of the predicted frames (>= {ev['num_input_frames']}), dB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def train_summary(train_log: Path, loss_png: Path, title: str) -> dict:
    """Plot the loss curve and summarise the run; ValueError (one line) for an unreadable or empty log."""
    try:
        log = read_log(train_log)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {train_log} ({e}); rerun the train rule") from e
    if not log:
        raise ValueError(f"{train_log} has no steps; rerun the train rule")
    plot_losses(log, loss_png, title)
    tail = log[-max(1, len(log) // 10) :]
    return {
        "iterations": len(log),
        "first_loss": log[0]["loss"],
        "final_loss_mean_last_10pct": float(np.mean([r["loss"] for r in tail])),
        "final_weighted_mse_mean_last_10pct": float(np.mean([r["edm_loss"] for r in tail])),
        "skipped_steps": sum(bool(r.get("skipped")) for r in log),
        "samples_per_s_median": float(np.median([r["samples_per_s"] for r in log])),
        "step_time_s_median": float(np.median([r["step_time_s"] for r in log])),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in log),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-log", type=Path, default=None, help="train_log.jsonl (none for an inference-only run)")
    ap.add_argument("--eval", type=Path, default=None, help="eval.json of evaluate.py (optional)")
    ap.add_argument("--infer-json", type=Path, nargs="*", default=[])
    ap.add_argument("--loss-png", type=Path, default=None, help="the loss plot (with --train-log)")
    ap.add_argument("--psnr-png", type=Path, default=None, help="per-clip held-out PSNR plot (with --eval)")
    ap.add_argument("--metrics", required=True, type=Path)
    ap.add_argument("--title", default="post-training")
    args = ap.parse_args(argv)
    if (args.train_log is None) != (args.loss_png is None):
        ap.error("--train-log and --loss-png go together")
    metrics = {}
    if args.train_log is not None:
        try:
            metrics["train"] = train_summary(args.train_log, args.loss_png, args.title)
        except ValueError as e:
            print(f"report.py: {e}", file=sys.stderr)
            return 1
    if args.eval and args.eval.exists():
        metrics["held_out"] = json.loads(args.eval.read_text())
        if args.psnr_png is not None:
            plot_psnr_per_clip(metrics["held_out"], args.psnr_png, f"{args.title}: held-out clips")
    elif args.psnr_png is not None:
        ap.error("--psnr-png needs --eval")
    metrics["inference"] = {}
    for p in args.infer_json:
        m = json.loads(p.read_text())
        metrics["inference"][m["prompt_set"]] = {k: m[k] for k in ("settings", "timings_s", "peak_gpu_memory_gb")}
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
