"""Multiview Video2World inference for one prompt set (upstream `video2world_multiview.py`), working with the
released checkpoint, our post-trained EMA copy and the tiny demo model alike (chosen by the experiment).

Example: python src/infer.py --experiment experiments/tiny_demo.yaml --prompt-set prompts/snowy_road.yaml \
  --checkpoint checkpoints/tiny/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview_post-trained/model.pt \
  --out-dir results/tiny_demo/infer/snowy_road
Writes <set>.mp4 (views back to back), <set>_grid.mp4, <set>.txt (upstream's files), <camera>.mp4 per camera,
<set>_sheet.png and <set>.json (prompts, seed, settings, checkpoint sha256, timings, peak memory).

Several GPUs share one sample by context parallelism (each holds a slice of the tokens):
  python src/launch.py --nproc 8 -- src/infer.py ...   (or infer.nproc: 8 in the experiment)
The main process encodes the text and the condition frames and broadcasts them; every process runs the DiT on its
slice; the main process decodes and writes the files.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from mvdit.adapters.lora import LoraError
from mvdit.assets.checkpoint import CheckpointError
from mvdit.assets.files import atomic_write, write_json
from mvdit.assets.hub import file_digests
from mvdit.constants import latent_frames
from mvdit.data.prompts import PromptSetError, check_input, load_prompt_sets, read_condition_frames
from mvdit.data.video_io import (
    VideoReadError,
    concat_views,
    contact_sheet,
    from_model_pixels,
    grid_frames,
    to_model_pixels,
    write_video,
)
from mvdit.encoders.text_encoder import EmbeddingCache, T5TextEncoder, TextEncoderLoadError, encoder_identity
from mvdit.encoders.tokenizer import TokenizerLoadError
from mvdit.inference.generate import full_grid_views, pad_condition_video, text_context
from mvdit.inference.session import SamplingSession
from mvdit.runtime import context_parallel
from mvdit.runtime.console import say
from mvdit.runtime.lifetime import die_with_parent, under_torchrun
from mvdit.workflow.experiment import ExperimentError, load_experiment

log = logging.getLogger("infer")


def sha256_of(path: Path) -> str:
    return file_digests(Path(path))["sha256"]  # streamed, with a progress bar for big checkpoints


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path)
    ap.add_argument("--prompt-set", required=True, type=Path, help="prompts/<name>.yaml (or an upstream .jsonl)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="model.pt to sample from (default: infer.checkpoint)")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--tokenizer-dir", type=Path, default=None)
    ap.add_argument("--t5-dir", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None, help="prompt embeddings (default: results/<name>/t5_cache)")
    ap.add_argument("--project-root", type=Path, default=Path.cwd(), help="relative prompt-set paths resolve here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the number of sampling steps")
    ap.add_argument("--adapter", type=Path, default=None, help="LoRA adapter (default: infer.adapter)")
    ap.add_argument("--index", type=int, default=None, help="run only this set of a multi-set (JSONL) file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if under_torchrun():
        die_with_parent()
    try:
        run(args)
    except (
        LoraError,
        ExperimentError,
        PromptSetError,
        CheckpointError,
        TokenizerLoadError,
        TextEncoderLoadError,
        VideoReadError,
    ) as e:
        say(f"infer.py{context_parallel.rank_tag()}: {e}")
        return 1
    except torch.OutOfMemoryError as e:
        say(
            f"infer.py{context_parallel.rank_tag()}: out of GPU memory ({str(e).splitlines()[0]}); "
            "set infer.offload_text_encoder and infer.offload_tokenizer, use bf16, or fewer data.cameras"
        )
        return 1
    except RuntimeError as e:
        if not context_parallel.peer_failed(e):
            raise
        say(f"infer.py{context_parallel.rank_tag()}: stopped: another process failed (its error is above)")
        return 1
    finally:
        context_parallel.finish()
    return 0


def run(args: argparse.Namespace) -> None:
    cfg = load_experiment(args.experiment)
    d, inf = cfg.data, cfg.infer
    cameras = list(d.cameras)
    # everything that can be wrong with the inputs is found before any model loads (by every process)
    sets = load_prompt_sets(
        args.prompt_set,
        cameras,
        args.project_root,
        defaults=inf.sampling_defaults(),
        visual_root=args.project_root / inf.visual_root,
    )
    if args.index is not None:
        if not 0 <= args.index < len(sets):
            raise PromptSetError(f"{args.prompt_set}: no prompt set at index {args.index} (it has {len(sets)})")
        sets = [sets[args.index]]
    for ps in sets:
        check_input(ps, cameras)
    args.checkpoint = args.checkpoint or cfg.infer_checkpoint
    args.adapter = args.adapter or (Path(inf.adapter) if inf.adapter else None)
    args.cache_dir = args.cache_dir or cfg.results / "t5_cache"
    if not args.checkpoint.is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} does not exist: run the train and copy_ema rules first")
    session = SamplingSession(cfg, args.experiment, args.device, args.tokenizer_dir)  # checks before any load
    main_proc, dev, dtype = session.main, session.device, session.dtype
    if not main_proc:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("attention kernel: %s (infer.sdpa_backend: %s)", session.attn_kernel, inf.sdpa_backend)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    texts = {}
    if main_proc:  # the text encoder runs (and is released) before the DiT loads
        t5 = args.t5_dir or cfg.t5_dir
        cache = EmbeddingCache(args.cache_dir, encoder_identity(t5, dtype))  # bf16 and fp32 are cached apart
        t5_device = "cpu" if inf.offload_text_encoder else dev
        for ps in sets:
            embs = cache.encode_cached(
                lambda: T5TextEncoder(t5, device=t5_device, dtype=dtype), list(ps.prompts.values())
            )
            texts[ps.name] = text_context(embs, d.text_len).to(dev, dtype)
    for ps in sets:
        texts[ps.name] = session.broadcast(texts.get(ps.name), session.text_shape)
    timings["text_encoder_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if main_proc:
        session.tokenizer  # noqa: B018 - open it now: its load time counts with the model's
    model = session.load(args.checkpoint, args.adapter)
    ckpt_sha = sha256_of(args.checkpoint) if main_proc else None
    timings["load_s"] = time.perf_counter() - t0

    for ps in sets:
        t_set = time.perf_counter()
        video = None
        if main_proc:
            frames = read_condition_frames(ps, cameras)
            views = [to_model_pixels(f, d.height, d.width, dtype=torch.float32) for f in frames]
            video = pad_condition_video(views, d.num_frames)
        gt = session.encode(video)
        settings = ps.settings | {
            "steps": args.steps or ps.settings["steps"],
            "compat": inf.compat,
            "frame_repeat": inf.frame_repeat,
        }
        if os.environ.get("MVDIT_DEBUG_OOM") == f"{session.procs.rank}:{ps.name}":  # fault injection for the tests
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {session.procs.rank})")
        t0 = time.perf_counter()
        latent = session.sample(
            model,
            gt,
            texts[ps.name],
            ps.num_input_frames,
            steps=settings["steps"],
            guidance=settings["guidance"],
            seed=settings["seed"],
            fps=settings["fps"],
            progress=True,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        sample_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        peaks = context_parallel.gather_floats(-1.0 if peak is None else peak, session.procs)
        if not main_proc:
            continue
        t0 = time.perf_counter()
        pixels = session.decode(latent)
        decode_s = time.perf_counter() - t0
        f = d.num_frames
        per_view = {cam: from_model_pixels(pixels[:, i * f : (i + 1) * f]) for i, cam in enumerate(cameras)}
        write_outputs(args.out_dir, ps, cameras, per_view, settings["fps"])
        meta = {
            "prompt_set": ps.name,
            "source": str(ps.source),
            "prompts": ps.prompts,
            "default_prompts": ps.default_prompt_cameras,  # cameras given upstream's default side-camera prompts
            "input": str(ps.input),
            "settings": settings,
            "experiment": cfg.name,
            "model_preset": cfg.model.preset,
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": ckpt_sha,
            "adapter": str(args.adapter) if args.adapter else None,
            "adapter_sha256": sha256_of(args.adapter) if args.adapter else None,
            "latent_sha256": hashlib.sha256(latent.cpu().contiguous().numpy().tobytes()).hexdigest(),
            **session.describe(),
            "resolution": [d.height, d.width],
            "frames_per_view": f,
            "latent_frames": latent_frames(f),
            "timings_s": timings
            | {
                "sample": sample_s,
                "decode": decode_s,
                "set_total": time.perf_counter() - t_set,
                "per_step": sample_s / settings["steps"],
            },
            "peak_gpu_memory_gb": peak,
            "peak_gpu_memory_gb_per_rank": None if peak is None else peaks,
        }
        write_json(args.out_dir / f"{ps.name}.json", meta)
        log.info("%s: %d steps in %.1f s -> %s", ps.name, settings["steps"], sample_s, args.out_dir)


def write_outputs(out: Path, ps, cameras: list[str], per_view: dict, fps: float) -> None:
    """Upstream's three files plus one mp4 per camera and a contact sheet; the JSON sidecar is written last."""
    out.mkdir(parents=True, exist_ok=True)
    for cam, frames in per_view.items():
        write_video(out / f"{cam}.mp4", frames, fps)
    write_video(out / f"{ps.name}.mp4", concat_views([per_view[c] for c in cameras]), fps)
    write_video(out / f"{ps.name}_grid.mp4", grid_frames(full_grid_views(per_view)), fps)
    text = "".join(ps.prompts[c].rstrip("\n") + "\n" for c in cameras)
    atomic_write(out / f"{ps.name}.txt", lambda p: Path(p).write_text(text))
    contact_sheet(out / f"{ps.name}_sheet.png", [per_view[c] for c in cameras], names=cameras, title=ps.name)


if __name__ == "__main__":
    sys.exit(main())
