"""EDM preconditioning and the conditioned denoiser (mvdit.model.edm): closed-form scalings, the condition-frame
replacement and guidance, with stand-in networks whose output is known."""

import math

import pytest
import torch
from torch import nn

from mvdit.model.edm import (
    Condition,
    augment_condition,
    condition_indicator,
    edm_scalings,
    inference_x0,
    loss_weight,
    num_condition_latent_frames,
    train_denoise,
)

V, T, H, W = 2, 3, 4, 4


class TextNet(nn.Module):
    """F = mean of the text embedding everywhere (0 for the unconditional branch), plus 0 * x."""

    def forward(self, x, timesteps, crossattn_emb, **kw):
        return torch.zeros_like(x) + crossattn_emb.mean()


def cond(n_cond=1, **kw):
    g = torch.Generator().manual_seed(0)
    return Condition(
        gt_latent=torch.randn(1, 16, V * T, H, W, generator=g),
        indicator=condition_indicator(V, T, n_cond),
        crossattn_emb=torch.rand(1, V * 3, 8, generator=g) + 0.5,
        n_views=V,
        augment_noise=torch.randn(1, 16, V * T, H, W, generator=g),
        **kw,
    )


@pytest.mark.parametrize("sigma", [0.002, 0.5, 2.5, 80.0])
def test_scalings_match_the_closed_forms(sigma):
    c_skip, c_out, c_in, c_noise = (float(c) for c in edm_scalings(torch.tensor(sigma, dtype=torch.float64)))
    assert c_skip == pytest.approx(0.25 / (sigma**2 + 0.25), rel=1e-12)
    assert c_out == pytest.approx(0.5 * sigma / math.sqrt(sigma**2 + 0.25), rel=1e-12)
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + 0.25), rel=1e-12)
    assert c_noise == pytest.approx(0.25 * math.log(sigma), rel=1e-12)
    # unit variance of the network input and target for data of std sigma_data (Karras et al. 2022, table 1)
    assert c_in**2 * (sigma**2 + 0.25) == pytest.approx(1.0, rel=1e-12)
    assert c_skip + c_out**2 / 0.25 == pytest.approx(1.0, rel=1e-12)
    assert float(loss_weight(torch.tensor(sigma, dtype=torch.float64))) == pytest.approx(1 / c_out**2, rel=1e-12)


def test_scalings_at_sigma_data_and_the_limits():
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(0.5, dtype=torch.float64))
    assert float(c_skip) == pytest.approx(0.5) and float(c_out) == pytest.approx(math.sqrt(0.125))
    assert float(c_in) == pytest.approx(math.sqrt(2)) and float(c_noise) == pytest.approx(0.25 * math.log(0.5))
    c_skip, c_out, _, _ = edm_scalings(torch.tensor([1e-8, 1e8], dtype=torch.float64))
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.0], dtype=torch.float64))  # clean: x0 = x
    torch.testing.assert_close(c_out, torch.tensor([0.0, 0.5], dtype=torch.float64))  # pure noise: x0 = F / 2


def test_condition_frames_per_view_from_input_frames():
    assert [num_condition_latent_frames(n) for n in (1, 9, 17, 57)] == [1, 2, 3, 8]
    assert [num_condition_latent_frames(n, "head") for n in (1, 9)] == [1, 1]  # the release's modulo bug
    with pytest.raises(ValueError):
        num_condition_latent_frames(0)
    with pytest.raises(ValueError):
        num_condition_latent_frames(4)


def test_condition_indicator_marks_the_first_frames_of_every_view():
    ind = condition_indicator(3, 4, 2)
    assert ind.shape == (1, 1, 12, 1, 1)
    assert ind.flatten().tolist() == [1, 1, 0, 0] * 3
    with pytest.raises(ValueError):
        condition_indicator(3, 4, 5)


def test_augmented_condition_reaches_the_network_as_c_in_a_times_g_plus_a_e():
    g, e = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a, s = torch.tensor(0.001, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    seen = augment_condition(g, e, a, s) * edm_scalings(s)[2]
    torch.testing.assert_close(seen, edm_scalings(a)[2] * (g + a * e))


def test_train_denoise_pins_condition_frames_to_g_and_returns_eps():
    c = cond(n_cond=1)
    x, sigma = torch.randn_like(c.gt_latent) * 2.5, torch.tensor(2.5)
    r = train_denoise(TextNet(), x, sigma, c)
    m = c.indicator.bool().expand_as(x)
    c_skip, c_out, _, _ = edm_scalings(sigma)
    torch.testing.assert_close(r["net_x0_pred"], c_skip * r["xt"] + c_out * c.crossattn_emb.mean())
    assert torch.equal(r["x0"][m], c.gt_latent[m]) and torch.equal(r["xt"][~m], x[~m])
    torch.testing.assert_close(r["eps"], (x - r["x0"]) / sigma)


@pytest.mark.parametrize("compat", ["fixed", "head"])
def test_inference_x0_replaces_condition_frames_and_guides(compat):
    c = cond(n_cond=2)
    x, sigma, w = torch.randn_like(c.gt_latent) * 10, torch.tensor(10.0), 7.0
    r = inference_x0(TextNet(), x, sigma, c, w, compat)
    m = c.indicator.bool().expand_as(x)
    f_c = c.crossattn_emb.mean()
    torch.testing.assert_close(r["F_uncond"], torch.zeros_like(x))
    c_skip, c_out, _, _ = edm_scalings(sigma)
    torch.testing.assert_close(r["x0"][~m], (c_skip * x + c_out * (1 + w) * f_c)[~m])  # F_c + w (F_c - F_u)
    if compat == "fixed":
        torch.testing.assert_close(r["x0"][m], c.gt_latent[m], rtol=0, atol=1e-5)
    else:  # the release: g / c_out - c_skip x_in, so x0 = g + c_skip (1 - c_out) x_in there
        torch.testing.assert_close(r["x0"][m], (c.gt_latent + c_skip * (1 - c_out) * r["x_in"])[m])


def test_inference_replacement_is_off_below_the_augmentation_sigma():
    c = cond(n_cond=1)
    x = torch.randn_like(c.gt_latent) * 1e-3
    r = inference_x0(TextNet(), x, torch.tensor(0.0009), c, 7.0)
    assert torch.equal(r["x_in"], x)
    on = inference_x0(TextNet(), x, torch.tensor(0.002), c, 7.0)
    assert not torch.equal(on["x_in"], x)
