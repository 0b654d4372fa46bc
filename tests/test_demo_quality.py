"""The demo's quality claims at the size a test can run: a reduced demo (fixed seeds, the demo's clip format, model
and tokenizer) post-trains a model whose single sample beats both copy-last-frame and the untrained model on every
held-out clip by margins that sample-to-sample noise does not explain, with smooth motion and an SSIM far above the
untrained model's; the tokenizer's round trip of those clips stays above 30 dB."""

import json

import numpy as np
import pytest
import yaml

from .helpers import ROOT, merged, snakemake

REDUCED = {
    "name": "ci_quality",
    "data": {"num_clips": 10, "held_out": 2},
    "train": {"iterations": 300, "save_iter": 300, "warmup_steps": 20},
    "infer": {"eval_clips": 2, "eval_samples": 2, "prompt_sets": ["synthetic_highway"]},
}


@pytest.mark.slow
def test_reduced_demo_single_sample_beats_copy_last_and_the_untrained_model(tmp_path):
    """About 2.5 min on 2 cores (2026-12-07, commit 5e0b9c0: 144 s, tiny assets built from scratch)."""
    cfg = merged(yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text()), REDUCED)
    exp = tmp_path / "ci_quality.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    r = snakemake("--cores", "2", "--configfile", str(exp), "--directory", str(tmp_path), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = json.loads((tmp_path / "results/ci_quality/report/eval.json").read_text())
    clip = ev["psnr_db_per_clip"]
    single = np.array(clip["post_trained_single_sample"])
    copied, untrained = np.array(clip["copy_last_frame"]), np.array(clip["untrained_single_sample"])
    # Measured at this size (2026-12-07, commit 5e0b9c0, the demo's lr 2e-3, docs/demo-tuning-2026-12-07-d.md): one
    # sample 26.07 / 25.72 dB against copy-last 22.82 / 23.25 dB and the untrained model 22.53 / 22.03 dB. The margins
    # (2.5-3.7 dB) are far above what one sample's luck moves: the mean of the 2 samples is 0.4-1.1 dB above the single
    # one. SSIM 0.867 against the untrained 0.694 (copy-last 0.893: level at this size, ahead only in the full demo),
    # temporal consistency 1.14 against 1.72. Rounding-level changes to training (per-item latents, fused AdamW) moved
    # one sample by up to 0.8 dB and SSIM from 0.892 to 0.863-0.867 (lr 1.5e-3 / 2e-3); the thresholds leave room.
    assert (single > copied + 1.5).all() and single.mean() > copied.mean() + 2.0, clip
    assert (single > untrained + 1.5).all() and single.mean() > untrained.mean() + 2.0, clip
    assert (single < np.array(clip["tokenizer_ceiling"])).all(), clip
    assert (np.array(clip["tokenizer_ceiling"]) >= 30.0).all(), clip
    assert ev["single_sample_beats_copy_last_frame_on_every_clip"] and ev["beats_baselines"]
    # Reported, not claimed: the tokenizer's own continuation (zero latents after the input's) is the baseline a
    # model must beat to add anything; the full demo's sample does not yet (README "The demo").
    continued = np.array(clip["tokenizer_continuation"])
    assert (continued < np.array(clip["tokenizer_ceiling"])).all(), clip
    assert ev["single_sample_margin_over_tokenizer_continuation_db"] == pytest.approx(np.mean(single - continued))
    ss = ev["single_sample_metrics"]
    assert ss["post_trained"]["ssim"] > ss["untrained"]["ssim"] + 0.05
    assert ss["post_trained"]["ssim"] > ss["copy_last_frame"]["ssim"] - 0.05
    assert 0.7 <= ss["post_trained"]["temporal_consistency"] <= 1.3
    assert ss["post_trained"]["temporal_consistency"] < ss["untrained"]["temporal_consistency"]
