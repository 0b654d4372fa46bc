"""Prepare the training data of an experiment and precompute its T5 embeddings, then write the data manifest.

Sources: synthetic (render driving clips), real (validate a user's dataset, see mvdit.data.dataset for the layout) and
mock (upstream's random videos and embeddings, generated on the fly; nothing to write).
Example: python src/prepare_data.py --experiment experiments/tiny_demo.yaml --out-dir results/tiny_demo/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mvdit.assets.files import write_json
from mvdit.data.dataset import DatasetError, HeldOutSplit, save_t5_embedding, scan_clips, t5_path
from mvdit.data.synthetic import make_synthetic_dataset
from mvdit.data.video_io import VideoReadError
from mvdit.encoders.text_encoder import EmbeddingCache, T5TextEncoder, TextEncoderLoadError, encoder_identity
from mvdit.workflow.experiment import ExperimentError, load_experiment

log = logging.getLogger("prepare_data")


def embed_captions(
    root: Path, cameras: list[str], num_frames: int, t5: Path, cache_dir: Path, device: str, skipped=None
) -> int:
    """Write <root>/t5/<camera>/<clip>.safetensors for every caption that has none yet. Returns how many.
    With `skipped` (a list), bad clips are left out here; the caller's final scan reports them."""
    clips = scan_clips(
        root, cameras, num_frames, require_captions=True, require_t5=False, skipped=None if skipped is None else []
    )
    todo = [(c, cam) for c in clips for cam in cameras if cam not in c.t5]
    if not todo:
        return 0
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    cache = EmbeddingCache(cache_dir, encoder_identity(t5, dtype))  # bf16 and fp32 embeddings are cached apart
    prompts = [clip.captions[cam] for clip, cam in todo]
    embs = cache.encode_cached(lambda: T5TextEncoder(t5, device=device, dtype=dtype), prompts)  # encodes each once
    for (clip, cam), prompt, emb in tqdm(zip(todo, prompts, embs, strict=True), desc="T5 files", file=sys.stderr):
        n = cache.get_with_length(prompt)[1]
        save_t5_embedding(t5_path(root, cam, clip.name, upstream=False), emb[:n], prompt)
    return len(todo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path, help="synthetic clips and manifest.json go here")
    ap.add_argument("--t5-dir", type=Path, default=None, help="default: <checkpoint_dir>/google-t5/t5-11b")
    ap.add_argument("--cache-dir", type=Path, default=None, help="prompt embeddings (default: results/<name>/t5_cache)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--workers", type=int, default=None, help="processes rendering synthetic clips (default: the usable cores)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_experiment(args.experiment)
        d = cfg.data
        keys = ("source", "cameras", "num_frames", "height", "width", "text_len", "fps", "seed")
        manifest = {k: getattr(d, k) for k in keys}
        if d.source == "mock":
            manifest |= {"mock_items": d.mock_items, "train": [], "held_out": []}
        else:
            if d.source == "synthetic":
                root = args.out_dir / "clips"
                cores = len(os.sched_getaffinity(0))  # the usable cores (cpu_count() counts the whole machine)
                workers = min(args.workers or cores, cores)
                make_synthetic_dataset(
                    root, d.num_clips, d.num_frames, d.height, d.width, d.seed, fps=d.fps, workers=workers
                )
            else:
                root = Path(d.root)
            view_map = d.view_map
            skipped: list[tuple[str, str]] | None = [] if d.skip_bad_clips else None
            if view_map is None:  # our layout: captions -> T5 embeddings (upstream's layout ships its own pickles)
                t5 = args.t5_dir or cfg.t5_dir
                cache = args.cache_dir or cfg.results / "t5_cache"
                n = embed_captions(root, d.cameras, d.num_frames, t5, cache, args.device, skipped)
                log.info("%d new T5 embeddings under %s", n, root / "t5")
            clips = scan_clips(
                root,
                d.cameras,
                d.num_frames,
                view_map=view_map,
                require_captions=view_map is None,
                require_t5=True,
                skipped=skipped,
            )
            for clip, reason in skipped or []:
                log.warning("skipped clip %s: %s", clip, reason)
            if not clips:
                raise DatasetError(f"no usable clips under {root}; fix the clips listed above")
            names = [c.name for c in clips]
            n_clips = len(names)
            frac = d.held_out / n_clips if n_clips else 0.0
            train, held = HeldOutSplit(fraction=frac, seed=d.seed, min_held_out=min(d.held_out, 1)).split(names)
            manifest |= {
                "root": str(root),
                "train": train,
                "held_out": held,
                "view_map": view_map,
                "allow_pickle": d.allow_pickle,
                "window_stride": d.window_stride,
                "skipped": [{"clip": c, "reason": r} for c, r in skipped or []],
            }
        write_json(args.out_dir / "manifest.json", manifest)
    except (ExperimentError, DatasetError, VideoReadError, TextEncoderLoadError) as e:
        print(f"prepare_data.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
