"""Copy the final EMA weights of a training run to where inference reads a post-trained model
(upstream's doc: <checkpoint dir>/<DiT name>_post-trained/model.pt), after checking they load strictly.

Example: python src/copy_ema.py --experiment experiments/tiny_demo.yaml --train-dir results/tiny_demo/train \
  --out checkpoints/tiny/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview_post-trained/model.pt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mvdit.checkpoint import CheckpointError, atomic_write, build_model, load_file, load_into, write_json
from mvdit.config import get_preset
from mvdit.experiment import ExperimentError, load_experiment


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path)
    ap.add_argument("--train-dir", required=True, type=Path, help="the train rule's --out-dir (has final.json)")
    ap.add_argument("--out", required=True, type=Path, help="destination model.pt")
    args = ap.parse_args(argv)
    try:
        cfg = load_experiment(args.experiment)
        final = args.train_dir / "final.json"
        if not final.is_file():
            raise CheckpointError(f"{final} does not exist: training has not finished; rerun the train rule")
        info = json.loads(final.read_text())
        src = Path(info["ema_model"])
        net_cfg = get_preset(cfg["model"]["preset"], **cfg["model"]["overrides"])
        load_into(build_model(net_cfg, seed=None), load_file(src), source=str(src))  # strict: names and shapes
        atomic_write(args.out, lambda tmp: shutil.copyfile(src, tmp))
        write_json(
            args.out.with_name("config.json"),
            {
                "preset": cfg["model"]["preset"],
                "net": net_cfg.to_dict(),
                "source": str(src),
                "iteration": info["iteration"],
                "experiment": cfg["name"],
                "weights": "EMA (fp32), post-trained",
            },
        )
    except (ExperimentError, CheckpointError, KeyError, json.JSONDecodeError) as e:
        print(f"copy_ema.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
