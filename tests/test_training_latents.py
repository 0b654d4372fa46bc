"""What each training step encodes (train.cache_latents) and the optimiser's kernel: the cached latents are the
tokenizer's, each item goes through the encoder once, and the fused AdamW steps as the per-tensor loop does."""

import pytest
import torch

from mvdit.data.dataset import MockDataset
from mvdit.encoders.tokenizer import VideoTokenizer
from mvdit.tiny.tokenizer import build_tiny_tokenizer
from mvdit.training.latents import Indexed, TrainingLatents
from mvdit.training.optim import fused_supported


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return VideoTokenizer(d, pixel_chunk_frames=9)


def batches(indices_per_step, views=2):
    data = Indexed(MockDataset(num_items=4, num_frames=9, num_views=views, height=16, width=24, text_len=4))
    for indices in indices_per_step:
        yield torch.utils.data.default_collate([data[i] for i in indices])


def test_cached_latents_are_the_tokenizers_and_each_item_is_encoded_once(tokenizer):
    plain, cached = TrainingLatents(tokenizer, 2, cache=False), TrainingLatents(tokenizer, 2, cache=True)
    steps = [[0, 1], [2, 3], [1, 0], [3, 1], [2, 2]]  # two epochs and a repeat within a batch
    for batch in batches(steps):
        want = plain(batch)
        got = cached(batch)
        assert got.shape == want.shape == (2, 16, 2 * 2, 2, 3) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # one item at a time vs the batch: rounding
    assert plain.encoded == len(steps) and cached.encoded == 4
    assert sorted(cached.items) == [0, 1, 2, 3]
    # a fresh cache (a resumed run) encodes the same bits as the one that ran from the start
    again = TrainingLatents(tokenizer, 2, cache=True)
    for batch in batches([[3, 1]]):
        assert torch.equal(again(batch), cached(batch))


def test_the_cache_key_is_the_items_index_not_its_place_in_the_batch(tokenizer):
    cached = TrainingLatents(tokenizer, 2, cache=True)
    first, swapped = batches([[0, 1], [1, 0]])
    a, b = cached(first), cached(swapped)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_fused_adamw_steps_as_the_per_tensor_loop_does():
    g = torch.Generator().manual_seed(0)
    shapes = [(128, 128), (128,), (16, 1024), (3, 5, 7)]
    params = [[torch.randn(s, generator=g).requires_grad_() for s in shapes] for _ in range(2)]
    for a, b in zip(*params, strict=True):
        b.data.copy_(a.data)
    start = [p.detach().clone() for p in params[0]]
    assert fused_supported(params[0]) and not fused_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_supported([torch.zeros(2, device="meta")])
    opts = [torch.optim.AdamW(params[0], lr=1e-2, weight_decay=0.1, fused=True)]
    opts.append(torch.optim.AdamW(params[1], lr=1e-2, weight_decay=0.1, foreach=False))
    for _ in range(20):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, opt in zip(params, opts, strict=True):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            opt.step()
    for a, b, a0 in zip(*params, start, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - a0).abs().max() > 0.05  # 20 steps of lr 1e-2 moved every tensor
