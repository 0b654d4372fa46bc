"""The demo's quality claims at the size a test can run: a reduced demo (fixed seeds, the demo's clip format, model
and tokenizer) post-trains a model whose single sample is far above the untrained model's on held-out clips, and the
tokenizer's round trip of those clips stays above 30 dB. (The single sample does not yet beat copy-last-frame at any
size the 2-core budget allows: issue #20; the evaluation reports both.)"""

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
def test_reduced_demo_single_sample_beats_the_untrained_model_below_the_tokenizer_ceiling(tmp_path):
    """What holds at this size; one sample does not yet beat copy-last-frame (issue #20), so that is not asserted."""
    cfg = merged(yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text()), REDUCED)
    exp = tmp_path / "ci_quality.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    r = snakemake("--cores", "2", "--configfile", str(exp), "--directory", str(tmp_path), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = json.loads((tmp_path / "results/ci_quality/report/eval.json").read_text())
    clip = ev["psnr_db_per_clip"]
    single = np.array(clip["post_trained_single_sample"])
    # Measured at this size (2026-12-07, the change-coding tokenizer): one sample 17.6 / 16.4 dB against the untrained
    # 11.2 / 10.8 dB (copy-last 19.6 / 18.6), SSIM 0.38 against 0.08, temporal consistency 1.18 against 3.66; the
    # thresholds leave room for other torch builds.
    untrained = np.array(clip["untrained_single_sample"])
    assert (single > untrained + 1.5).all() and single.mean() > untrained.mean() + 4.0, clip
    assert (single < np.array(clip["tokenizer_ceiling"])).all(), clip
    assert (np.array(clip["tokenizer_ceiling"]) >= 30.0).all(), clip
    ss = ev["single_sample_metrics"]
    assert ss["post_trained"]["ssim"] > ss["untrained"]["ssim"] + 0.05
    assert ss["post_trained"]["temporal_consistency"] < ss["untrained"]["temporal_consistency"] / 2
