"""The sampling session infer.py and evaluate.py share: its set-up reads the experiment, and a sample through it is the
released pipeline's `generate` with the experiment's settings, nothing added."""

import pytest
import torch

from mvdit.inference.generate import generate, pad_condition_video
from mvdit.inference.session import SamplingSession
from mvdit.workflow.experiment import load_experiment

from .helpers import tiny_inference_setup


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    d = tiny_inference_setup(tmp_path_factory.mktemp("session"), "session", steps=2)
    exp = load_experiment(d / "exp.yaml")
    return SamplingSession(exp, d / "exp.yaml", "cpu")


def test_set_up_follows_the_experiment(session):
    d = session.exp.data
    assert session.main and session.procs.world == 1 and session.dtype == torch.float32  # fp32 on the CPU
    assert session.cameras == list(d.cameras)
    assert session.latent_shape == (1, 16, 6 * 2, d.height // 8, d.width // 8)  # 9 frames -> 2 latent frames
    assert session.text_shape == (1, 6 * d.text_len, 1024)
    info = session.describe()
    assert info["context_parallel"] == 1 and info["precision"] == {"setting": "fp32"}
    assert info["sdpa_backend"]["setting"] == session.exp.infer.sdpa_backend


def test_a_sample_is_generate_with_the_experiment_settings(session, one_thread):
    model = session.load(session.exp.release_checkpoint)
    d, inf = session.exp.data, session.exp.infer
    views = [torch.rand(3, 1, d.height, d.width) * 2 - 1 for _ in session.cameras]
    gt = session.encode(pad_condition_video(views, d.num_frames))
    assert gt.shape == session.latent_shape
    text = torch.randn(session.text_shape, generator=torch.Generator().manual_seed(0))
    got = session.sample(model, gt, text, 1, steps=2, guidance=3.0, seed=5, fps=10.0)
    want = generate(
        model.net, gt, text, session.cameras, 1, steps=2, guidance=3.0, seed=5, fps=10.0, compat=inf.compat,
        frame_repeat=inf.frame_repeat, batch_guidance=inf.batch_guidance, progress=False,
    )  # fmt: skip
    assert torch.equal(got, want)
    other = session.sample(model, gt, text, 1, steps=2, guidance=3.0, seed=6, fps=10.0)
    assert not torch.equal(got, other)  # the seed reaches the sampler
    pixels = session.decode(got)
    assert pixels.shape == (3, 6 * d.num_frames, d.height, d.width) and pixels.dtype == torch.float32
    assert session.round_trip(pad_condition_video(views, d.num_frames)).shape == pixels.shape
