"""Power-EMA (mvdit.training.ema): upstream's gamma and decay sequence, the update of a full model's EMA, and the
adapters' EMA following the same rule. CPU, tiny preset."""

import copy

import pytest
import torch
from torch import nn

from mvdit.adapters.lora import LoraError, LoraSettings, add_lora, is_lora_key
from mvdit.assets.checkpoint import build_model
from mvdit.model.config import get_preset
from mvdit.training.ema import AdapterEma, ema_beta, ema_gamma, ema_update_, update_ema

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gamma_of_rate_0_1_is_upstreams():
    assert ema_gamma(0.1) == pytest.approx(6.9372, abs=1e-4)
    assert ema_gamma(0.05) > ema_gamma(0.1)  # a smaller relative width averages over longer


def test_beta_starts_at_zero_then_follows_the_power_rule():
    g = ema_gamma(0.1)
    assert ema_beta(0, g) == 0.0  # the first step copies the weights
    assert [round(ema_beta(i, g), 4) for i in (1, 10, 100, 1000, 1999)] == [0.0041, 0.4693, 0.9241, 0.9921, 0.996]
    assert ema_beta(10, g) == pytest.approx((1 - 1 / 11) ** (g + 1), rel=1e-12)


def test_full_model_ema_update_is_the_formula():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ema = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in ema.parameters()]
    beta = 0.7
    update_ema(ema, model, beta)
    for e, e0, w in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, beta * e0 + (1 - beta) * w, rtol=1e-6, atol=1e-7)
        assert not torch.equal(e, e0) and not torch.equal(e, w)
    update_ema(ema, model, 0.0)  # beta 0: the EMA becomes the weights
    for e, w in zip(ema.parameters(), model.parameters(), strict=True):
        assert torch.equal(e, w)


def test_bf16_weights_update_an_fp32_ema():
    ema = [torch.zeros(5)]
    w = [torch.full((5,), 1 / 3).bfloat16()]
    ema_update_(ema, w, 0.5)
    assert ema[0].dtype == torch.float32
    torch.testing.assert_close(ema[0], 0.5 * w[0].float(), rtol=0, atol=0)


def test_adapter_ema_follows_the_full_model_rule_on_the_adapters():
    model = add_lora(build_model(get_preset("tiny"), seed=0), LoraSettings(rank=4, alpha=8.0), generator=None)
    full_ema = copy.deepcopy(model).requires_grad_(False)
    ema = AdapterEma(model)
    assert set(ema.state_dict()) == {n for n, _ in model.named_parameters() if is_lora_key(n)}
    g = torch.Generator().manual_seed(3)
    for beta in (0.0, 0.6, 0.9):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if is_lora_key(n):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        update_ema(ema, model, beta)
        update_ema(full_ema, model, beta)
    full = dict(full_ema.named_parameters())
    for n, t in ema.state_dict().items():
        assert torch.equal(t, full[n]), n
    assert not torch.equal(ema.state_dict()[n], dict(model.named_parameters())[n])  # an average, not the weights
    with pytest.raises(LoraError, match="no LoRA adapters"):
        AdapterEma(build_model(get_preset("tiny"), seed=0))
