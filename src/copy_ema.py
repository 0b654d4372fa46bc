"""Export the weights of one saved training iteration as the experiment's post-trained model, after checking they load
strictly; or publish that model where upstream's inference script reads it.

Export (the copy_ema rule): the EMA (or regular) weights of iteration `export.iteration` (`last`, or N) to
results/<name>/post-trained/model.pt, with a config.json that says what they are. LoRA runs merge the adapter of that
iteration into the base they were trained on.
  python src/copy_ema.py --experiment results/tiny_demo/experiment.yaml --train-dir results/tiny_demo/train \
    --out results/tiny_demo/post-trained/model.pt

Publish (the upstream_layout rule, export.upstream_layout: true): copy it to <checkpoint_dir>/<DiT repo>_post-trained/
model.pt, refusing to replace a file there that this experiment did not write (export.replace_upstream: true allows it).
  python src/copy_ema.py --experiment ... --publish results/tiny_demo/post-trained/model.pt \
    --to checkpoints/tiny/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview_post-trained/model.pt --record ...json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from mvdit.adapters.lora import LoraError, merge_state_dict, read_adapter
from mvdit.assets.checkpoint import CheckpointError, build_model, load_file, load_into
from mvdit.assets.files import atomic_write, save_state_dict, write_json
from mvdit.assets.hub import file_digests
from mvdit.training.starting_point import initial_state_dict
from mvdit.workflow.experiment import Experiment, ExperimentError, load_experiment

ITER_FILE = re.compile(r"iter_(\d{9})_(ema|reg)_(model\.pt|adapter\.safetensors)$")


def saved_iterations(ckpt_dir: Path, weights: str, lora: bool) -> list[int]:
    suffix = "adapter.safetensors" if lora else "model.pt"
    found = (ITER_FILE.match(p.name) for p in ckpt_dir.glob("iter_*"))
    return sorted({int(m[1]) for m in found if m and m[2] == weights and m[3] == suffix})


def export_weights(exp: Experiment, train_dir: Path) -> tuple[Path | dict, int, str]:
    """(file or merged state dict, iteration, description) of the iteration and weights `export:` names."""
    final = train_dir / "final.json"
    if not final.is_file():
        raise CheckpointError(f"{final} does not exist: training has not finished; rerun the train rule")
    info = json.loads(final.read_text())
    it = info["iteration"] if exp.export.iteration == "last" else exp.export.iteration
    w, lora, ckpts = exp.export.weights, exp.train.lora.enabled, train_dir / "checkpoints"
    stem = ckpts / f"iter_{it:09d}"
    if not lora or (w == "ema" and it == info["iteration"]):  # LoRA's last save holds the merged EMA model too
        src = Path(f"{stem}_{w}_model.pt")
        what = f"{w} weights of iteration {it}" + (" (LoRA, merged at the final save)" if lora else "")
        if src.is_file():
            return src, it, what
    else:
        src = Path(f"{stem}_{w}_adapter.safetensors")
        if src.is_file():
            adapters, settings, _ = read_adapter(src)
            merged = merge_state_dict(initial_state_dict(exp), settings, adapters=adapters)
            return merged, it, f"{w} LoRA adapter of iteration {it}, merged into the base it was trained on"
    have = ", ".join(map(str, saved_iterations(ckpts, w, lora))) or "none"
    raise CheckpointError(
        f"{exp.source}: export.iteration: iteration {it} has no {w} weights in {ckpts} (saved: {have}); "
        "set export.iteration to one of them or last"
    )


def export(exp: Experiment, train_dir: Path, out: Path) -> None:
    src, it, what = export_weights(exp, train_dir)
    sd = load_file(src) if isinstance(src, Path) else src
    load_into(build_model(exp.net, seed=None), sd, source=f"{train_dir} iteration {it}")  # strict: names and shapes
    if isinstance(src, Path):
        atomic_write(out, lambda tmp: shutil.copyfile(src, tmp))  # the saved file itself, byte for byte
    else:
        save_state_dict(out, sd)
    write_json(
        out.with_name("config.json"),
        {
            "experiment": exp.name,
            "preset": exp.model.preset,
            "net": exp.net.to_dict(),
            "iteration": it,
            "weights": what,
            "train_dir": str(train_dir),
            "sha256": file_digests(out)["sha256"],
        },
    )


def publish(exp: Experiment, src: Path, dst: Path, record: Path) -> None:
    """Copy src to upstream's layout; a file already there is replaced only if this experiment wrote it."""
    src_sha = file_digests(src)["sha256"]
    if dst.exists():
        owner_file = dst.with_name("config.json")
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, json.JSONDecodeError):
            owner = {}
        ours = owner.get("experiment") == exp.name and owner.get("sha256") == file_digests(dst)["sha256"]
        if not ours and not exp.export.replace_upstream:
            who = f"experiment {owner['experiment']!r}" if owner.get("experiment") else "you (not this workflow)"
            raise CheckpointError(
                f"{exp.source}: export.upstream_layout: refusing to replace {dst}, written by {who}; move it away, "
                "or set export.replace_upstream: true"
            )
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    meta = json.loads(src.with_name("config.json").read_text()) | {"sha256": src_sha, "copied_from": str(src)}
    write_json(dst.with_name("config.json"), meta)
    write_json(record, {"published": str(dst), "sha256": src_sha, "experiment": exp.name})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path)
    ap.add_argument("--train-dir", type=Path, help="export: the train rule's --out-dir (has final.json)")
    ap.add_argument("--out", type=Path, help="export: destination model.pt")
    ap.add_argument("--publish", type=Path, help="publish: the exported model.pt")
    ap.add_argument("--to", type=Path, help="publish: upstream's <checkpoint_dir>/<DiT repo>_post-trained/model.pt")
    ap.add_argument("--record", type=Path, help="publish: JSON written last, naming what was published")
    args = ap.parse_args(argv)
    if (args.publish is None) == (args.train_dir is None):
        ap.error("give either --train-dir and --out (export) or --publish, --to and --record")
    try:
        exp = load_experiment(args.experiment)
        if args.publish is not None:
            publish(exp, args.publish, args.to, args.record)
        else:
            export(exp, args.train_dir, args.out)
    except (ExperimentError, CheckpointError, LoraError, KeyError, json.JSONDecodeError) as e:
        print(f"copy_ema.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
