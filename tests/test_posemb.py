"""Position embeddings (mvdit.model.posemb): closed-form cases of the 3-D RoPE, the sin-cos tables and the timestep
sinusoid, tested through the public functions only."""

import math

import pytest
import torch

from mvdit.model.posemb import (
    RopePosition3D,
    SinCosPosEmb3D,
    apply_rope,
    axis_split,
    ntk_theta,
    rope_table,
    sincos_1d,
    timestep_sinusoid,
)

HEAD_DIM = 32


def rotate(x, angles):
    """x [B, heads, N, d] rotated by per-token angles [N, d]."""
    return apply_rope(x, rope_table(angles))


def rope(ratios=(1.0, 1.0, 1.0)):
    return RopePosition3D(HEAD_DIM, len_h=16, len_w=16, len_t=16, ratios=ratios)


def token(t, h, w, *, v=0, grid=(4, 6, 8)):
    """Index of token (v, t, h, w) in the view-major (v t h w) order."""
    tt, hh, ww = grid
    return ((v * tt + t) * hh + h) * ww + w


def test_axis_split_gives_equal_even_h_and_w_and_t_the_rest():
    assert axis_split(128) == (44, 42, 42)
    assert axis_split(HEAD_DIM) == (12, 10, 10)
    for d in (24, 32, 96, 128, 4096):
        t, h, w = axis_split(d)
        assert t + h + w == d and h == w and h % 2 == 0


def test_ntk_theta_is_the_base_at_ratio_one_and_scales_as_ratio_to_d_over_d_minus_2():
    assert ntk_theta(1.0, 12) == 10000.0
    assert ntk_theta(2.0, 12) == pytest.approx(10000.0 * 2.0 ** (12 / 10), rel=1e-12)


def test_rope_rotation_preserves_every_token_norm():
    ang = rope()(2, 4, 6, 8, fps=None)
    x = torch.randn(1, 3, ang.shape[0], HEAD_DIM)
    y = rotate(x, ang)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x)  # it does rotate


def test_rope_is_the_identity_at_position_zero():
    ang = rope()(1, 4, 6, 8, fps=None)
    assert torch.all(ang[0] == 0)
    x = torch.randn(1, 1, ang.shape[0], HEAD_DIM)
    torch.testing.assert_close(rotate(x, ang)[..., 0, :], x[..., 0, :])


def test_rope_scores_depend_only_on_relative_position():
    """<R(p) q, R(p') k> is a function of p - p' on each axis: shifting both tokens by the same (t, h, w) keeps it."""
    ang = rope(ratios=(1.0, 1.0, 2.0))(1, 4, 6, 8, fps=None)
    n = ang.shape[0]
    q = torch.randn(HEAD_DIM).expand(1, 1, n, HEAD_DIM).double()
    k = torch.randn(HEAD_DIM).expand(1, 1, n, HEAD_DIM).double()
    rq, rk = rotate(q, ang)[0, 0], rotate(k, ang)[0, 0]

    def score(a, b):
        return float(rq[token(*a)] @ rk[token(*b)])

    for shift in [(1, 0, 0), (0, 2, 0), (0, 0, 3), (2, 1, 4)]:
        a, b = (0, 1, 2), (1, 3, 1)
        a2 = tuple(x + s for x, s in zip(a, shift, strict=True))
        b2 = tuple(x + s for x, s in zip(b, shift, strict=True))
        assert score(a2, b2) == pytest.approx(score(a, b), rel=1e-5, abs=1e-5)
    assert score((0, 1, 2), (1, 3, 1)) != pytest.approx(score((0, 1, 2), (1, 3, 2)), rel=1e-3)


def test_rope_restarts_time_in_every_view():
    ang = rope()(3, 4, 6, 8, fps=None).reshape(3, 4 * 6 * 8, HEAD_DIM)
    assert torch.equal(ang[1], ang[0]) and torch.equal(ang[2], ang[0])


def test_rope_time_positions_scale_with_fps():
    """Time positions are t * 24 / fps: at fps 12, frame 1 sits where frame 2 sits at the base 24 fps."""
    r = rope()
    slow = r(1, 4, 6, 8, fps=torch.tensor([12.0]))
    base = r(1, 4, 6, 8, fps=None)
    dt = axis_split(HEAD_DIM)[0] // 2
    t_cols = list(range(dt)) + list(range(HEAD_DIM // 2, HEAD_DIM // 2 + dt))
    torch.testing.assert_close(slow[token(1, 0, 0)][t_cols], base[token(2, 0, 0)][t_cols])
    torch.testing.assert_close(r(1, 4, 6, 8, fps=torch.tensor([24.0])), base)


def test_rope_grid_larger_than_its_table_is_an_error():
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        rope()(1, 17, 2, 2, fps=None)


def test_sincos_1d_closed_form():
    e = sincos_1d(8, torch.tensor([0.0, 1.0, 3.0]))
    assert e.shape == (3, 8) and e.dtype == torch.float64
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    omega = [10000 ** (-k / 4) for k in range(4)]
    expect = [math.sin(3 * o) for o in omega] + [math.cos(3 * o) for o in omega]
    torch.testing.assert_close(e[2], torch.tensor(expect, dtype=torch.float64))


def test_sincos_table_is_t_h_w_parts_and_restarts_in_every_view():
    dim = 24
    emb = SinCosPosEmb3D(dim, len_h=8, len_w=8, len_t=8, ratios=(1.0, 1.0, 1.0))(2, 3, 4, 5, torch.float32, "cpu")
    assert emb.shape == (2 * 3 * 4 * 5, dim)
    views = emb.reshape(2, 3 * 4 * 5, dim)
    assert torch.equal(views[0], views[1])
    dt, dh, _ = axis_split(dim)
    grid = (3, 4, 5)
    a, b = emb[token(1, 2, 0, grid=grid)], emb[token(1, 2, 3, grid=grid)]  # differ in w only
    assert torch.equal(a[: dt + dh], b[: dt + dh]) and not torch.equal(a[dt + dh :], b[dt + dh :])
    torch.testing.assert_close(a[:dt], sincos_1d(dt, torch.tensor([1.0]))[0].float())


def test_timestep_sinusoid_is_cos_then_sin_with_unit_first_frequency():
    t = torch.tensor([0.0, 0.37])
    e = timestep_sinusoid(t, 16)
    assert e.shape == (2, 16)
    assert torch.equal(e[0], torch.tensor([1.0] * 8 + [0.0] * 8))
    assert e[1, 0].item() == pytest.approx(math.cos(0.37), rel=1e-6)
    assert e[1, 8].item() == pytest.approx(math.sin(0.37), rel=1e-6)
    assert e[1, 7].item() == pytest.approx(math.cos(0.37 * math.exp(-math.log(10000) * 7 / 8)), rel=1e-6)
