"""Samplers (mvdit.model.sampler): the Karras and RES schedules, the Euler step and both samplers on denoisers whose
probability-flow ODE has a closed-form solution."""

import math

import pytest
import torch

from mvdit.model.sampler import euler_step, init_noise_sigma, karras_sigmas, sample_euler
from mvdit.refvec.parity import res_sigmas, sample_res_2ab

S = 0.5  # std of the Gaussian "data" below


def gaussian_x0(x, sigma):
    """Ideal denoiser for data ~ N(0, S^2): x S^2 / (S^2 + sigma^2). The ODE dx/dsigma = (x - x0)/sigma then has the
    solution x(sigma) = x(sigma_0) sqrt((S^2 + sigma^2) / (S^2 + sigma_0^2))."""
    return x * S**2 / (S**2 + float(sigma) ** 2)


def flow(x, sigma_from, sigma_to):
    return x * math.sqrt((S**2 + sigma_to**2) / (S**2 + sigma_from**2))


@pytest.mark.parametrize("n", [4, 35])
def test_karras_schedule_endpoints_and_monotonicity(n):
    s = karras_sigmas(n)
    assert s.shape == (n + 1,) and s.dtype == torch.float32
    assert float(s[0]) == pytest.approx(80.0, rel=1e-6) and float(s[n - 1]) == pytest.approx(0.0002, rel=1e-5)
    assert float(s[-1]) == 0.0 and bool((s[1:] < s[:-1]).all())
    # rho = 7: sigma^(1/7) is linear in the step index
    r = s[:-1].double() ** (1 / 7)
    step = torch.full((n - 1,), float(r[-1] - r[0]) / (n - 1), dtype=torch.float64)
    torch.testing.assert_close(r[1:] - r[:-1], step, rtol=0, atol=1e-6)  # fp32 rounding of sigma


def test_karras_schedule_is_evaluated_in_fp32_like_the_release():
    assert float(karras_sigmas(35)[0]) == pytest.approx(79.999985, abs=2e-6)  # not 80: fp32 arithmetic


def test_res_schedule_endpoints_and_monotonicity():
    s = res_sigmas(4)
    assert s.dtype == torch.float64 and s.shape == (5,)
    assert float(s[0]) == pytest.approx(80.0, rel=1e-14) and float(s[-1]) == pytest.approx(0.002, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all())
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(s[2]) == pytest.approx(mid, rel=1e-14)


def test_initial_noise_scale_is_sqrt_of_sigma_max_squared_plus_one():
    assert init_noise_sigma() == pytest.approx(math.sqrt(80**2 + 1), rel=1e-15)
    assert init_noise_sigma(2.0) == pytest.approx(math.sqrt(5), rel=1e-15)


def test_euler_step_is_exact_for_a_point_mass():
    """x0 = c everywhere: the ODE solution is linear in sigma, c + (x - c) sigma'/sigma, and Euler is exact."""
    x, c = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.2, -0.7], dtype=torch.float64)
    out = euler_step(x, c, torch.tensor(2.0), torch.tensor(0.5))
    torch.testing.assert_close(out, c + (x - c) * 0.25, rtol=1e-6, atol=1e-6)
    assert out.dtype == x.dtype


def test_euler_sampler_reaches_the_point_mass_and_reports_every_step():
    c = torch.full((4,), 0.3)
    seen = []
    out = sample_euler(lambda x, s: (x, c), torch.randn(4), karras_sigmas(5), callback=lambda i, d: seen.append(i))
    torch.testing.assert_close(out, c, rtol=0, atol=1e-6)
    assert seen == [0, 1, 2, 3, 4]


def test_euler_sampler_converges_at_first_order_to_the_gaussian_solution():
    z = torch.ones(1, dtype=torch.float64)
    errs = []
    for n in (20, 40):
        sig = karras_sigmas(n).double()
        out = sample_euler(lambda x, s: (x, gaussian_x0(x, s)), z, sig)
        exact = flow(init_noise_sigma(), float(sig[0]), 0.0)
        errs.append(abs(float(out) - exact) / exact)
    assert errs[1] < 0.1 and 1.8 < errs[0] / errs[1] < 2.2


def test_euler_sampler_uses_the_step_functions_state():
    """step_fn returns the state after condition replacement; the update starts from it, not from x."""
    sig = torch.tensor([2.0, 1.0, 0.0])
    out = sample_euler(lambda x, s: (torch.zeros_like(x) + 5, torch.zeros_like(x)), torch.ones(2), sig)
    torch.testing.assert_close(out, torch.zeros(2))  # 5 + (5 - 0)/1 * (0 - 1) = 0
    mid = []
    sample_euler(
        lambda x, s: (torch.zeros_like(x) + 5, torch.zeros_like(x)),
        torch.ones(2),
        sig,
        callback=lambda i, d: mid.append(d["x_next"]),
    )
    torch.testing.assert_close(mid[0], torch.full((2,), 2.5))  # 5 + 5/2 * (1 - 2)


def test_res_sampler_is_second_order_on_the_gaussian_solution():
    z = torch.ones(1)
    exact_state = flow(80.0, 80.0, 0.002)
    exact = float(gaussian_x0(torch.tensor(exact_state), 0.002))
    errs = []
    for n in (20, 40):
        out = sample_res_2ab(lambda x, s: gaussian_x0(x.double(), s).float(), z, res_sigmas(n))
        assert out.dtype == torch.float32
        errs.append(abs(float(out) - exact) / exact)
    assert errs[1] < 0.02 and errs[0] / errs[1] > 3.5


def test_res_sampler_is_exact_for_a_point_mass_and_calls_once_per_sigma():
    c = torch.full((3,), -0.4)
    calls = []
    out = sample_res_2ab(
        lambda x, s: c.clone(), torch.randn(3), res_sigmas(4), callback=lambda i, d: calls.append(d["sigma"])
    )
    torch.testing.assert_close(out, c)
    torch.testing.assert_close(torch.tensor(calls, dtype=torch.float64), res_sigmas(4))
