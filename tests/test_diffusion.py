"""Tests for diffrobust.diffusion: schedules, q / posterior / p, reverse processes, sigma -> t* rules."""

import math

import numpy as np
import pytest
import torch

from diffrobust import diffusion as D
from diffrobust import imagespace

SHAPE = (2, 3, 4, 4)


def _x0(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE, generator=g, dtype=dtype) * 1.6 - 0.8)


def _normal(seed, dtype=torch.float64, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _toy_model(calls=None):
    """A deterministic learned-variance 'network': eps and v in [-1, 1] depend on x and the timestep."""

    def model(x, t, y=None):
        if calls is not None:
            calls.append(float(t[0]))
        tt = t.to(x.dtype)[:, None, None, None]
        eps = torch.tanh(0.7 * x + 0.002 * tt)
        v = torch.sin(3.0 * x + 0.01 * tt)
        return torch.cat([eps, v], dim=1)

    return model


def _point_mass_oracle(alpha_bar_of_model_timestep, mu):
    """True eps of q(x_t) when the data is the single point mu: (x - sqrt(a)·mu)/sqrt(1 - a); v = 0."""

    def model(x, t, y=None):
        a = alpha_bar_of_model_timestep(float(t[0]))
        eps = (x - math.sqrt(a) * mu) / math.sqrt(1.0 - a)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def _ddpm_oracle(diffusion, mu):
    def alpha_bar(t_model):
        time = t_model / diffusion.timestep_scale + 1.0
        if abs(time - round(time)) < 1e-3:
            time = round(time)
        return diffusion.alpha_bar(time)

    return _point_mass_oracle(alpha_bar, mu)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------

def test_betas_equal_official_fixtures(fixtures_dir):
    arch = fixtures_dir / "architectures"
    linear = D.linear_betas(1000)
    cosine = D.cosine_betas(4000)
    assert linear.dtype == cosine.dtype == np.float64
    assert np.array_equal(linear, np.load(arch / "betas_linear_1000.npy"))
    assert np.array_equal(cosine, np.load(arch / "betas_cosine_4000.npy"))


def test_diffusers_schedules_agree_only_to_float32():
    # Why the module writes the formulas itself: diffusers returns float32 betas.
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    cosine = D.cosine_betas(4000)
    hf_cosine = betas_for_alpha_bar(4000, max_beta=0.999, alpha_transform_type="cosine")
    assert hf_cosine.dtype == torch.float32
    assert torch.equal(hf_cosine, torch.tensor(cosine, dtype=torch.float32))  # same Python floats, rounded
    assert not np.array_equal(hf_cosine.double().numpy(), cosine)
    hf_squaredcos = DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2").betas
    assert torch.equal(hf_squaredcos, hf_cosine)
    hf_linear = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas
    np.testing.assert_allclose(hf_linear.double().numpy(), D.linear_betas(1000), rtol=1e-6)


def test_cosine_closed_form_matches_table_at_integer_times():
    diffusion = D.GaussianDiffusion.cosine(4000)
    for t in (1, 2, 500, 1158, 1159, 2810, 3990):
        assert diffusion.alpha_bar(t) == pytest.approx(D.cosine_alpha_bar(t, 4000), rel=1e-12)
        assert diffusion.alpha_bar(t) == diffusion.alphas_cumprod[t - 1]
    assert diffusion.alpha_bar(0) == 1.0
    # Between the table's neighbours, strictly decreasing.
    assert diffusion.alpha_bar(1158) > diffusion.alpha_bar(1158.5) > diffusion.alpha_bar(1159)
    with pytest.raises(ValueError):
        D.GaussianDiffusion.linear(1000).alpha_bar(144.5)


# ---------------------------------------------------------------------------------------------------------------
# q, conversions, posterior, p
# ---------------------------------------------------------------------------------------------------------------

def test_q_sample_moments():
    diffusion = D.GaussianDiffusion.linear(1000)
    t = 300
    a = diffusion.alpha_bar(t)  # about 0.27
    n = 50_000
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0], dtype=torch.float64)
    samples = diffusion.q_sample(x0.expand(n, 4), t, _normal(1, shape=(n, 4)))
    # Standard errors: mean sqrt((1-a)/n) ≈ 0.0038, variance (1-a)·sqrt(2/n) ≈ 0.0046; 5 standard errors each.
    mean_se = math.sqrt((1 - a) / n)
    var_se = (1 - a) * math.sqrt(2 / n)
    np.testing.assert_allclose(samples.mean(0).numpy(), math.sqrt(a) * x0.numpy(), atol=5 * mean_se)
    np.testing.assert_allclose(samples.var(0).numpy(), np.full(4, 1 - a), atol=5 * var_se)
    assert torch.equal(diffusion.q_sample(x0, 0, torch.ones(4, dtype=torch.float64)), x0)


@pytest.mark.parametrize("t", [1, 37, 999, 1158.5])
def test_eps_xstart_round_trip(t):
    diffusion = D.GaussianDiffusion.cosine(4000)
    x_t, eps = _normal(2), _normal(3)
    x0 = diffusion.predict_xstart_from_eps(x_t, t, eps)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x0), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), x_t, rtol=1e-9, atol=1e-9)


def test_eps_to_score_is_gaussian_score():
    diffusion = D.GaussianDiffusion.linear(1000)
    x0, eps = _x0(), _normal(4)
    a = diffusion.alpha_bar(200)
    x_t = diffusion.q_sample(x0, 200, eps)
    exact = -(x_t - math.sqrt(a) * x0) / (1 - a)  # grad log N(x_t; sqrt(a)·x0, (1 - a)I)
    torch.testing.assert_close(D.eps_to_score(eps, a), exact)
    torch.testing.assert_close(D.score_to_eps(exact, a), eps)


@pytest.mark.parametrize("level", [2, 10, 700])
def test_posterior_marginalises_to_q(level):
    # If x_k ~ q(x_k|x0) and x_{k-1} ~ q(x_{k-1}|x_k, x0), then x_{k-1} ~ q(x_{k-1}|x0): mean and variance match.
    diffusion = D.GaussianDiffusion.linear(1000)
    i = level - 1
    c1, c2 = diffusion.posterior_mean_coef1[i], diffusion.posterior_mean_coef2[i]
    a, a_prev = diffusion.alpha_bar(level), diffusion.alpha_bar(level - 1)
    assert c1 + c2 * math.sqrt(a) == pytest.approx(math.sqrt(a_prev), rel=1e-12)
    assert c2 ** 2 * (1 - a) + diffusion.posterior_variance[i] == pytest.approx(1 - a_prev, rel=1e-10)
    x0, x_t = _x0(), _normal(5)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, level)
    torch.testing.assert_close(mean, c1 * x0 + c2 * x_t)
    assert log_var == pytest.approx(math.log(var))


def test_learned_range_variance_between_bounds():
    diffusion = D.GaussianDiffusion.cosine(4000, variance="learned_range")
    level = 1000
    lo = diffusion.posterior_log_variance_clipped[level - 1]
    hi = math.log(diffusion.betas[level - 1])
    assert lo < hi
    x = _normal(6)
    out = diffusion.p_mean_variance(_toy_model(), x, level)
    assert out["log_variance"].min() >= lo - 1e-12 and out["log_variance"].max() <= hi + 1e-12
    assert out["log_variance"].max() - out["log_variance"].min() > 0.1 * (hi - lo)  # actually spread out

    def constant_v(value):
        return lambda x, t, y=None: torch.cat([torch.zeros_like(x), torch.full_like(x, value)], dim=1)

    for value, expected in ((-1.0, lo), (1.0, hi)):
        log_var = diffusion.p_mean_variance(constant_v(value), x, level)["log_variance"]
        torch.testing.assert_close(log_var, torch.full_like(x, expected))


def test_fixed_variances_and_first_step_clipping():
    small = D.GaussianDiffusion.linear(1000, variance="fixed_small")
    large = D.GaussianDiffusion.linear(1000, variance="fixed_large")
    x = _normal(7)
    # The first step's posterior variance is 0; its log is taken from the second step (improved-diffusion).
    assert small.posterior_variance[0] == 0.0
    for diffusion in (small, large):
        out = diffusion.p_mean_variance(_toy_model(), x, 1)
        torch.testing.assert_close(out["log_variance"], torch.full_like(x, math.log(small.posterior_variance[1])))
    out = large.p_mean_variance(_toy_model(), x, 500)
    torch.testing.assert_close(out["log_variance"], torch.full_like(x, math.log(large.betas[499])))


def test_clip_denoised():
    diffusion = D.GaussianDiffusion.linear(1000)
    x = 5.0 * _normal(8)
    clipped = diffusion.p_mean_variance(_toy_model(), x, 900, clip_denoised=True)["pred_xstart"]
    raw = diffusion.p_mean_variance(_toy_model(), x, 900, clip_denoised=False)["pred_xstart"]
    assert raw.abs().max() > 1.5
    torch.testing.assert_close(clipped, raw.clamp(-1, 1))


def test_network_sees_time_minus_one_rescaled():
    calls = []
    cifar = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    D.one_shot_denoise(_toy_model(calls), cifar, _normal(9), 1159)
    D.one_shot_denoise(_toy_model(calls), cifar, _normal(9), 1158.5)
    imagenet = D.GaussianDiffusion.linear(1000)
    D.one_shot_denoise(_toy_model(calls), imagenet, _normal(9), 145)
    assert calls == [1158 * 0.25, 1157.5 * 0.25, 144.0]


# ---------------------------------------------------------------------------------------------------------------
# Reverse processes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1159, 1158.5131579884119])
def test_one_shot_with_true_noise_recovers_x0(t):
    diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    x0, noise = _x0(), _normal(10)
    x_t = diffusion.q_sample(x0, t, noise)
    true_noise = lambda x, tt, y=None: torch.cat([noise, torch.zeros_like(noise)], dim=1)  # noqa: E731
    torch.testing.assert_close(D.one_shot_denoise(true_noise, diffusion, x_t, t), x0, rtol=0, atol=1e-12)


def test_float32_inputs_stay_float32():
    diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    x64 = _normal(23)
    x32 = x64.float()
    # Deterministic paths agree with float64 to float32 precision (torch.randn draws differ between dtypes).
    for reverse in (D.one_shot_denoise, lambda *a: D.ddim_reverse(*a, 5)):
        out32, out64 = reverse(_toy_model(), diffusion, x32, 1158.5), reverse(_toy_model(), diffusion, x64, 1158.5)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    assert D.respaced_reverse(_toy_model(), diffusion, x32, 1158.5, 5, generator=gen).dtype == torch.float32
    assert D.reverse_vpsde(_toy_model(), x32, 0.01, generator=gen).dtype == torch.float32


def test_reverse_noise_comes_from_the_generator_whatever_the_precision():
    """A reduced-precision chain (fp16/bf16 on a GPU) draws the same noise as the float32 one, rounded: the draws are
    made in float32 on the generator's device and then moved, so seeds mean the same on every device."""
    x = _normal(5, torch.float32)
    draws = {dtype: D.noise_like(x.to(dtype), torch.Generator().manual_seed(3)) for dtype in
             (torch.float32, torch.float16, torch.bfloat16)}
    assert draws[torch.float16].dtype == torch.float16 and draws[torch.bfloat16].dtype == torch.bfloat16
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(draws[dtype], draws[torch.float32].to(dtype))


def test_respaced_times_densepure_grid():
    assert D.respaced_times(100, 3) == [100.0, 67.0, 33.0, 0.0]
    assert D.respaced_times(12, 12) == [float(k) for k in range(12, -1, -1)]
    t = D.tstar_cosine_closed_form(0.25, 4000)
    grid = D.respaced_times(t, 10)
    assert grid[0] == t and grid[-1] == 0.0 and len(grid) == 11
    assert grid[1:] == [float(round(t - i * t / 10)) for i in range(1, 11)]
    # More steps than time: duplicates are dropped, the grid still decreases strictly to 0.
    assert D.respaced_times(2.7, 100) == [2.7, 2.0, 1.0, 0.0]
    assert D.full_times(3.5) == [3.5, 3.0, 2.0, 1.0, 0.0]


def test_respace_uses_alpha_bar_at_the_grid():
    diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    t = 1158.5
    chain = diffusion.respace([t, 600, 40, 0])
    np.testing.assert_allclose(
        chain.alphas_cumprod, [diffusion.alpha_bar(40), diffusion.alpha_bar(600), D.cosine_alpha_bar(t, 4000)],
        rtol=1e-12)
    np.testing.assert_allclose(chain.betas[1], 1 - diffusion.alpha_bar(600) / diffusion.alpha_bar(40), rtol=1e-12)
    assert [chain.model_timestep(k) for k in (1, 2, 3)] == [39 * 0.25, 599 * 0.25, 1157.5 * 0.25]


def test_respaced_step_matches_hand_posterior():
    # One ancestral step t -> s of the respaced chain, computed by hand from alpha_bar(t), alpha_bar(s).
    diffusion = D.GaussianDiffusion.cosine(4000, variance="fixed_small")
    t, s = 1158.5, 579.0
    a, a_prev = diffusion.alpha_bar(t), diffusion.alpha_bar(s)
    beta = 1 - a / a_prev
    x_t = _normal(11)
    model = _toy_model()
    eps = model(x_t, torch.full((2,), t - 1.0))[:, :3]
    x0 = ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * x_t
    var = beta * (1 - a_prev) / (1 - a)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    chain = diffusion.respace([t, s, 0.0])
    step = chain.p_sample(model, x_t, 2, generator=torch.Generator().manual_seed(3))["sample"]
    torch.testing.assert_close(step, mean + math.sqrt(var) * z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_respaced_with_all_steps_equals_full_reverse(schedule):
    if schedule == "cosine":
        diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
        t = 15
    else:
        diffusion = D.GaussianDiffusion.linear(1000)
        t = 9
    x_t = _normal(12)
    full = D.full_reverse(_toy_model(), diffusion, x_t, t, generator=torch.Generator().manual_seed(5))
    fast = D.respaced_reverse(_toy_model(), diffusion, x_t, t, t, generator=torch.Generator().manual_seed(5))
    other_seed = D.respaced_reverse(_toy_model(), diffusion, x_t, t, t, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(fast, full, rtol=1e-9, atol=1e-9)
    assert (other_seed - full).abs().max() > 1e-3  # the generator really drives the noise


def test_full_reverse_timesteps():
    calls = []
    diffusion = D.GaussianDiffusion.cosine(4000)
    D.full_reverse(_toy_model(calls), diffusion, _normal(13), 4, generator=torch.Generator().manual_seed(0))
    D.full_reverse(_toy_model(calls), diffusion, _normal(13), 3.5, generator=torch.Generator().manual_seed(0))
    assert calls == [3.0, 2.0, 1.0, 0.0, 2.5, 2.0, 1.0, 0.0]


def test_single_step_reverses_equal_one_shot():
    diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    t = 1984.199455867762
    x_t = _normal(14)
    one_shot = D.one_shot_denoise(_toy_model(), diffusion, x_t, t)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(D.respaced_reverse(_toy_model(), diffusion, x_t, t, 1, generator=gen), one_shot)
    torch.testing.assert_close(D.ddim_reverse(_toy_model(), diffusion, x_t, t, 1, eta=0.0), one_shot)
    torch.testing.assert_close(D.ddim_reverse(_toy_model(), diffusion, x_t, t, 1, eta=1.0, generator=gen), one_shot)


def test_point_mass_oracle_chains_recover_the_point():
    diffusion = D.GaussianDiffusion.cosine(4000, rescale_timesteps=True)
    mu = _x0(seed=1)
    t = D.tstar_cosine_closed_form(0.5, 4000)
    x_t = diffusion.q_sample(mu, t, _normal(15))
    oracle = _ddpm_oracle(diffusion, mu)
    gen = torch.Generator().manual_seed(0)
    for out in (
        D.respaced_reverse(oracle, diffusion, x_t, t, 7, generator=gen),
        D.ddim_reverse(oracle, diffusion, x_t, t, 7, eta=0.0),
        D.ddim_reverse(oracle, diffusion, x_t, t, 7, eta=0.5, generator=gen),
    ):
        torch.testing.assert_close(out, mu, rtol=0, atol=1e-6)


def test_ddim_eta0_stays_on_the_deterministic_path():
    # With the point-mass oracle, DDIM(eta=0) keeps eps fixed: every intermediate state is
    # sqrt(a)·mu + sqrt(1-a)·eps0, so the network sees eps0 at every step.
    diffusion = D.GaussianDiffusion.linear(1000)
    mu, eps0 = _x0(seed=2), _normal(16)
    x_t = diffusion.q_sample(mu, 300, eps0)
    seen = []
    oracle = _ddpm_oracle(diffusion, mu)

    def recording(x, t, y=None):
        out = oracle(x, t)
        seen.append(out[:, :3])
        return out

    D.ddim_reverse(recording, diffusion, x_t, 300, 4)
    assert len(seen) == 4
    for eps in seen:
        torch.testing.assert_close(eps, eps0, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_equals_ancestral_with_posterior_variance():
    # eta = 1 makes DDIM's sigma² the posterior variance and its mean the posterior mean (Song et al., §4.1).
    diffusion = D.GaussianDiffusion.cosine(4000, variance="fixed_small", rescale_timesteps=True)
    x_t, t = _normal(21), 700.25
    ddim = D.ddim_reverse(_toy_model(), diffusion, x_t, t, 6, eta=1.0, generator=torch.Generator().manual_seed(4))
    ddpm = D.respaced_reverse(_toy_model(), diffusion, x_t, t, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)
    deterministic = D.ddim_reverse(_toy_model(), diffusion, x_t, t, 6, eta=0.0)
    assert (deterministic - ddpm).abs().max() > 1e-3


def test_time_zero_is_identity_for_every_reverse():
    diffusion = D.GaussianDiffusion.cosine(4000)
    x = 3.0 * _normal(17)  # outside [-1, 1] on purpose: no clipping at t = 0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(D.one_shot_denoise(_toy_model(), diffusion, x, 0), x)
    assert torch.equal(D.respaced_reverse(_toy_model(), diffusion, x, 0, 10, generator=gen), x)
    assert torch.equal(D.full_reverse(_toy_model(), diffusion, x, 0, generator=gen), x)
    assert torch.equal(D.ddim_reverse(_toy_model(), diffusion, x, 0, 10, eta=1.0, generator=gen), x)
    assert torch.equal(D.reverse_vpsde(_toy_model(), x, 0.0, generator=gen), x)


# ---------------------------------------------------------------------------------------------------------------
# VP-SDE
# ---------------------------------------------------------------------------------------------------------------

def test_vpsde_grid_and_timesteps():
    times = D.vpsde_times(0.1)
    assert len(times) - 1 == 100  # DiffPure: t* = 0.1 at dt = 1e-3 is 100 Euler steps
    assert times[0] == 0.1 and times[-1] == 1e-5
    assert [D.vpsde_model_timestep(t) for t in times[:-1]] == [float(k) for k in range(100, 0, -1)]
    # The continuous alpha_bar tracks the discrete linear-1000 table at time N·t.
    table = D.GaussianDiffusion.linear(1000)
    assert D.vpsde_alpha_bar(0.1) == pytest.approx(table.alpha_bar(100), rel=2e-3)
    x0, noise = _x0(), _normal(18)
    torch.testing.assert_close(D.vpsde_q_sample(x0, 0.1, noise), table.q_sample(x0, 100, noise))


def test_vpsde_constants():
    assert D.vpsde_beta(0.0) == pytest.approx(0.1) and D.vpsde_beta(1.0) == pytest.approx(20.0)
    assert D.vpsde_alpha_bar(1.0) == pytest.approx(math.exp(-19.9 / 2 - 0.1))
    # alpha_bar(t) = exp(-integral_0^t beta): its log-derivative is -beta.
    h = 1e-6
    slope = (math.log(D.vpsde_alpha_bar(0.3 + h)) - math.log(D.vpsde_alpha_bar(0.3 - h))) / (2 * h)
    assert slope == pytest.approx(-D.vpsde_beta(0.3), rel=1e-6)


def test_vpsde_reverse_recovers_gaussian_data():
    # Data N(mu, s²I): the true eps is sqrt(1-a)(x - sqrt(a)mu)/(a s² + 1 - a). The exact reverse SDE ends at
    # N(~mu, ~s²); Euler–Maruyama's end state is exactly Gaussian with moments given by the step formula.
    s, t_star = 0.3, 0.1
    mu = _x0(seed=4).repeat(250, 1, 1, 1)  # 24,000 values

    def oracle(x, t, y=None):
        a_t = D.vpsde_alpha_bar(float(t[0]) / 1000)
        eps = math.sqrt(1 - a_t) * (x - math.sqrt(a_t) * mu) / (a_t * s ** 2 + 1 - a_t)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    a = D.vpsde_alpha_bar(t_star)
    x_t = math.sqrt(a) * mu + math.sqrt(a * s ** 2 + 1 - a) * _normal(22, shape=mu.shape)
    out = D.reverse_vpsde(oracle, x_t, t_star, generator=torch.Generator().manual_seed(1))

    kappa, v = math.sqrt(a), a * s ** 2 + 1 - a
    times = D.vpsde_times(t_star)
    for t, t_next in zip(times, times[1:]):
        h, beta, a_t = t - t_next, D.vpsde_beta(t), D.vpsde_alpha_bar(t)
        var_t = a_t * s ** 2 + 1 - a_t
        c = 1 + h * beta * (0.5 - 1 / var_t)
        kappa = c * kappa + h * beta * math.sqrt(a_t) / var_t
        v = c ** 2 * v + beta * h
    assert kappa == pytest.approx(1.0, abs=1e-3)
    assert v == pytest.approx(s ** 2, rel=0.01)  # Euler at dt = 1e-3 is within 1% of the exact reverse SDE
    residual = out - kappa * mu
    n = residual.numel()
    assert abs(residual.mean().item()) < 5 * math.sqrt(v / n)
    assert residual.var().item() == pytest.approx(v, rel=5 * math.sqrt(2 / n))  # 5 standard errors


def test_vpsde_reverse_contracts_to_point_mass():
    # With the point-mass oracle every Euler–Maruyama step is affine in x plus Gaussian noise, so the end state is
    # exactly N(kappa·mu, v): kappa and v follow from the step formula; the samples must show those moments.
    mu = _x0(seed=3).repeat(250, 1, 1, 1)  # 24,000 values
    t_star = 0.1
    a = D.vpsde_alpha_bar(t_star)
    x_t = math.sqrt(a) * mu + math.sqrt(1 - a) * _normal(19, shape=mu.shape)
    oracle = _point_mass_oracle(lambda t_model: D.vpsde_alpha_bar(t_model / 1000), mu)
    out = D.reverse_vpsde(oracle, x_t, t_star, generator=torch.Generator().manual_seed(0))

    kappa, v = math.sqrt(a), 1 - a  # x = kappa·mu + N(0, v)
    times = D.vpsde_times(t_star)
    for t, t_next in zip(times, times[1:]):
        h, beta, a_t = t - t_next, D.vpsde_beta(t), D.vpsde_alpha_bar(t)
        # x + h·beta·(x/2 - (x - sqrt(a_t)·mu)/(1 - a_t)) + sqrt(beta·h)·z
        c = 1 + h * beta * (0.5 - 1 / (1 - a_t))
        kappa = c * kappa + h * beta * math.sqrt(a_t) / (1 - a_t)
        v = c ** 2 * v + beta * h
    assert kappa == pytest.approx(1.0, abs=1e-3)
    # The last step's injected noise, sqrt(beta(1e-3)·1e-3) ≈ 0.011, is what remains (DiffPure's output keeps it).
    assert 0.009 < math.sqrt(v) < 0.015

    residual = out - kappa * mu
    n = residual.numel()
    assert abs(residual.mean().item()) < 5 * math.sqrt(v / n)
    assert residual.var().item() == pytest.approx(v, rel=5 * math.sqrt(2 / n))
    assert (out - mu).abs().mean() < 0.05 * (x_t - mu).abs().mean()


# ---------------------------------------------------------------------------------------------------------------
# sigma -> t*
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tables():
    return {
        "cosine": np.cumprod(1 - D.cosine_betas(4000)),
        "linear": np.cumprod(1 - D.linear_betas(1000)),
    }


@pytest.mark.parametrize("sigma, cosine, linear", [(0.12, 573, 70), (0.25, 1158, 145), (0.5, 1984, 259),
                                                   (1.0, 2809, 396)])
def test_tstar_first_at_least_carlini(tables, sigma, cosine, linear):
    assert D.tstar_first_at_least(tables["cosine"], sigma) == cosine
    assert D.tstar_first_at_least(tables["linear"], sigma) == linear
    # As a time (index + 1), Carlini's rule is the ceiling of DensePure's closed-form time.
    assert cosine + 1 == math.ceil(D.tstar_cosine_closed_form(sigma, 4000))


@pytest.mark.parametrize("sigma, expected", [(0.25, 144), (0.5, 258), (1.0, 396)])
def test_tstar_nearest_densepure(tables, sigma, expected):
    assert D.tstar_nearest(tables["linear"], sigma) == expected


@pytest.mark.parametrize("sigma, expected", [(0.25, 1158.5), (0.5, 1984.2), (1.0, 2810.0)])
def test_tstar_cosine_closed_form(sigma, expected):
    t = D.tstar_cosine_closed_form(sigma, 4000)
    assert t == pytest.approx(expected, abs=0.1)
    # The closed form is the time where the cosine alpha_bar equals 1/(1 + (2σ)²).
    assert D.cosine_alpha_bar(t, 4000) == pytest.approx(1 / (1 + (2 * sigma) ** 2), rel=1e-12)


def test_noise_to_xt_is_a_forward_sample():
    sigma = 0.25
    x01 = imagespace.to_image_space(_x0())
    eps = _normal(20)
    x_t = D.noise_to_xt(x01, eps, sigma)
    a = D.alpha_bar_for_sigma(sigma)
    assert a == pytest.approx(0.8)
    # Adding σ·ε in [0, 1] space then mapping is the same image; with a = 1/(1+4σ²) it is exactly q(x_t|x0) at a.
    torch.testing.assert_close(x_t, math.sqrt(a) * imagespace.to_model_space(x01 + sigma * eps))
    torch.testing.assert_close(x_t, math.sqrt(a) * imagespace.to_model_space(x01) + math.sqrt(1 - a) * eps)
    carlini = D.noise_to_xt(x01, eps, sigma, alpha_bar=0.81)
    torch.testing.assert_close(carlini, 0.9 * (imagespace.to_model_space(x01) + 0.5 * eps))
