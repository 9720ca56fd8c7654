"""The diffusion process: schedules, q / posterior / p, the reverse processes, and the sigma -> t* rules.

Everything here works on images in the diffusion model's [-1, 1] space (conversions live in `imagespace`).

Networks
--------
A network is any callable ``model(x_t, t_model, y=None) -> tensor``. ``t_model`` is a float tensor of shape [N]
(non-integer values allowed: the ADM timestep embedding is sinusoidal). The output has C channels (eps) or 2C
channels when the variance is learned (first C = eps, last C = the interpolation value v in [-1, 1], as in
improved/guided diffusion). ``y`` is passed only when it is not None.

Time convention (read this before passing a t)
----------------------------------------------
Time counts noise levels so that **time 0 is the clean image**: time t >= 1 is the level of
``alphas_cumprod[t - 1]`` (0-based table index t - 1), and the network is queried at timestep ``t - 1``, the index it
was trained with at that level. This is the convention of the cosine closed form (alpha_bar(t) = f(t/T)/f(0),
whose value at integer t equals ``alphas_cumprod[t - 1]``), of DensePure's full chain
(``for i in reversed(range(round(t))): p_sample(i)``) and of DiffPure's forward step (``a[t - 1]``). With it a
reverse process from time t takes exactly t steps, ends at time 0, and t = 0 is the identity.

The table-based t* rules (`tstar_first_at_least`, `tstar_nearest`) return, as the papers state them, a 0-based
**table index** i; the matching time is i + 1. `tstar_cosine_closed_form` returns a time.

Randomness
----------
Reverse processes draw their noise from an explicit ``torch.Generator`` (DensePure keeps a reverse RNG stream
separate from the smoothing noise; passing the same generator object across calls continues that stream).
``generator=None`` uses torch's global RNG. Nothing here disables autograd: wrap calls in ``torch.no_grad()`` for
inference, leave it on for full-gradient attacks (DiffPure differentiates through its SDE solver).
"""

import math

import numpy as np
import torch
import torch.utils.checkpoint

from diffrobust import imagespace

# improved-diffusion's cosine schedule: alpha_bar(u) = f(u) / f(0) with u = t / T in [0, 1] and
# f(u) = cos²((u + s)/(1 + s)·π/2), s = COSINE_OFFSET.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999

VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------

def linear_betas(num_timesteps):
    """Ho et al.'s linear schedule as improved/guided diffusion extend it to any T (float64, shape [T]).

    diffusers' ``DDPMScheduler(beta_schedule="linear")`` builds the same line in float32, so it is not used here.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def _cosine_f(u):
    return math.cos((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2


def cosine_betas(num_timesteps, max_beta=COSINE_MAX_BETA):
    """improved-diffusion's cosine schedule: beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999), float64, shape [T].

    diffusers' ``betas_for_alpha_bar`` computes the same Python floats but returns them as float32, which does not
    reproduce the float64 table the official code samples with; hence this copy of the formula.
    """
    betas = [
        min(1.0 - _cosine_f((i + 1) / num_timesteps) / _cosine_f(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(t, num_timesteps):
    """Closed-form cosine alpha_bar at (possibly non-integer) time t: f(t/T) / f(0).

    Equals ``alphas_cumprod[t - 1]`` of `cosine_betas` at integer t wherever the 0.999 clip is inactive (all but the
    last step or two of the schedule).
    """
    return _cosine_f(float(t) / num_timesteps) / _cosine_f(0.0)


# ---------------------------------------------------------------------------------------------------------------
# Score <-> eps
# ---------------------------------------------------------------------------------------------------------------

def eps_to_score(eps, alpha_bar):
    """Score of q(x_t) from the network's noise prediction: grad log q(x_t) = -eps / sqrt(1 - alpha_bar)."""
    return -eps / math.sqrt(1.0 - float(alpha_bar))


def score_to_eps(score, alpha_bar):
    """Inverse of `eps_to_score`."""
    return -score * math.sqrt(1.0 - float(alpha_bar))


# ---------------------------------------------------------------------------------------------------------------
# The discrete Gaussian diffusion
# ---------------------------------------------------------------------------------------------------------------

def _is_integer(t):
    return float(t) == math.floor(float(t))


def _call_model(model, x, t_model, y):
    t_batch = torch.full((x.shape[0],), float(t_model), dtype=torch.float32, device=x.device)
    if y is None:
        return model(x, t_batch)
    return model(x, t_batch, y=y)


def _split_output(output, channels):
    """(eps, v or None) from a network output with C or 2C channels."""
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise ValueError(f"network output has {output.shape[1]} channels; expected {channels} or {2 * channels}")


def noise_like(x, generator):
    """Standard normal noise shaped like x, drawn on the generator's device in float32 (float64 for float64 x), then
    moved to x's device and dtype: a CPU generator gives the same draws whatever device and precision the chain runs
    in (drawing with device=x.device would fail for a CPU generator and CUDA x, and fp16 draws round differently)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if generator is None:
        return torch.randn(x.shape, dtype=dtype, device=x.device).to(x.dtype)
    return torch.randn(x.shape, generator=generator, dtype=dtype, device=generator.device).to(x.device, x.dtype)


class GaussianDiffusion:
    """A chain of K noise levels above the clean image, with the q, posterior and p computations of improved-diffusion.

    Level k (1..K) has ``alphas_cumprod[k - 1]``; level 0 is clean (alpha_bar = 1). Step k goes from level k to k - 1
    with ``betas[k - 1]``. On a full schedule, level = time (see the module docstring). A respaced chain
    (`respace`) has fewer levels, each remembering the network timestep of the time it stands for.

    variance: "learned_range" (network outputs 2C channels; log variance = frac·log(beta) + (1 - frac)·clipped
        posterior log variance, frac = (v + 1)/2), "fixed_small" (posterior variance) or "fixed_large" (beta, with
        the first step's value replaced by the second step's posterior variance, as improved-diffusion does).
    rescale_timesteps: pass timesteps to the network as t·1000/T (improved-diffusion's CIFAR-10 model, trained with
        T = 4000, expects this; guided-diffusion's ImageNet model does not).
    alpha_bar_fn: closed form alpha_bar(time) used at non-integer times (`GaussianDiffusion.cosine` sets it).
    model_timesteps: network timestep (before rescaling) of each level; default: level - 1.
    timestep_scale: factor applied to network timesteps; derived from rescale_timesteps when not given.
    """

    def __init__(self, betas, *, variance="learned_range", rescale_timesteps=False, alpha_bar_fn=None,
                 model_timesteps=None, timestep_scale=None):
        if variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_levels = len(betas)
        self.variance = variance
        self.alpha_bar_fn = alpha_bar_fn
        if timestep_scale is None:
            timestep_scale = 1000.0 / self.num_levels if rescale_timesteps else 1.0
        self.timestep_scale = float(timestep_scale)
        if model_timesteps is None:
            model_timesteps = np.arange(self.num_levels, dtype=np.float64)
        self.model_timesteps = np.asarray(model_timesteps, dtype=np.float64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # q(x_{k-1} | x_k, x_0) for step k, stored at index k - 1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance of the first step is 0; improved-diffusion replaces it by the second step's value
        # before taking the log. A one-step chain has no second step: use beta there (the last step adds no noise,
        # so the value is only reported, never sampled with).
        first = self.posterior_variance[1] if self.num_levels > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        fixed_large = np.append(first, betas[1:])
        self._fixed_log_variance = {
            "fixed_small": self.posterior_log_variance_clipped,
            "fixed_large": np.log(fixed_large),
        }

    @classmethod
    def cosine(cls, num_timesteps, **kwargs):
        """improved-diffusion's cosine schedule, with the closed form for non-integer times."""
        return cls(cosine_betas(num_timesteps), alpha_bar_fn=lambda t: cosine_alpha_bar(t, num_timesteps), **kwargs)

    @classmethod
    def linear(cls, num_timesteps, **kwargs):
        """The linear schedule (integer times only)."""
        return cls(linear_betas(num_timesteps), **kwargs)

    # -- levels and timesteps ------------------------------------------------------------------------------------

    def alpha_bar(self, t):
        """alpha_bar at time t: 1 at t = 0, the table at integer t, the closed form (if any) in between."""
        t = float(t)
        if not 0.0 <= t <= self.num_levels:
            raise ValueError(f"time {t} outside [0, {self.num_levels}]")
        if _is_integer(t):
            return 1.0 if t == 0 else float(self.alphas_cumprod[int(t) - 1])
        if self.alpha_bar_fn is None:
            raise ValueError(f"non-integer time {t} needs a schedule with a closed-form alpha_bar (e.g. cosine)")
        return float(self.alpha_bar_fn(t))

    def model_timestep(self, level):
        """What the network receives at integer level `level` (1..K), rescaling included."""
        return self.model_timesteps[int(level) - 1] * self.timestep_scale

    def time_to_model_timestep(self, t):
        """Network timestep for a (possibly non-integer) time t of this schedule: t - 1, clamped at 0, rescaled."""
        return max(float(t) - 1.0, 0.0) * self.timestep_scale

    def _coef(self, value, x):
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)

    # -- q and conversions ---------------------------------------------------------------------------------------

    def q_sample(self, x0, t, noise):
        """Sample q(x_t | x_0) = sqrt(alpha_bar)·x0 + sqrt(1 - alpha_bar)·noise at scalar time t."""
        a = self.alpha_bar(t)
        return self._coef(math.sqrt(a), x0) * x0 + self._coef(math.sqrt(1.0 - a), x0) * noise

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x0 = x_t / sqrt(alpha_bar) - sqrt(1/alpha_bar - 1)·eps (improved-diffusion's order of operations)."""
        a = self.alpha_bar(t)
        return self._coef(math.sqrt(1.0 / a), x_t) * x_t - self._coef(math.sqrt(1.0 / a - 1.0), x_t) * eps

    def predict_eps_from_xstart(self, x_t, t, x0):
        """eps = (x_t / sqrt(alpha_bar) - x0) / sqrt(1/alpha_bar - 1); undefined at t = 0."""
        a = self.alpha_bar(t)
        return (self._coef(math.sqrt(1.0 / a), x_t) * x_t - x0) / self._coef(math.sqrt(1.0 / a - 1.0), x_t)

    def q_posterior_mean_variance(self, x0, x_t, level):
        """q(x_{k-1} | x_k, x_0) at integer level k: (mean, variance, clipped log variance)."""
        i = int(level) - 1
        mean = self._coef(self.posterior_mean_coef1[i], x_t) * x0 + self._coef(self.posterior_mean_coef2[i], x_t) * x_t
        return mean, float(self.posterior_variance[i]), float(self.posterior_log_variance_clipped[i])

    # -- p -------------------------------------------------------------------------------------------------------

    def p_mean_variance(self, model, x_t, level, clip_denoised=True, y=None):
        """The network's p(x_{k-1} | x_k) at integer level k: dict of mean, log_variance, pred_xstart, eps.

        clip_denoised clamps pred_xstart to [-1, 1] before it enters the posterior mean (DensePure and Carlini et al.
        use True throughout).
        """
        i = int(level) - 1
        output = _call_model(model, x_t, self.model_timestep(level), y)
        eps, v = _split_output(output, x_t.shape[1])
        if self.variance == "learned_range":
            if v is None:
                raise ValueError("variance='learned_range' needs a network with 2C output channels")
            min_log = self._coef(self.posterior_log_variance_clipped[i], x_t)
            max_log = self._coef(math.log(self.betas[i]), x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            # A learned-variance network used with a fixed variance: its v channels are ignored (as DiffPure does).
            log_variance = self._coef(self._fixed_log_variance[self.variance][i], x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, level, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, level)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_sample(self, model, x_t, level, generator=None, clip_denoised=True, y=None):
        """One ancestral step from level k to k - 1: mean + exp(log_var/2)·z, no noise on the step to level 0.

        Noise is drawn at every step, the last included (improved-diffusion draws and masks it), so the RNG stream
        advances by the same amount as in the official loops.
        """
        out = self.p_mean_variance(model, x_t, level, clip_denoised=clip_denoised, y=y)
        noise = noise_like(x_t, generator)
        if int(level) == 1:
            sample = out["mean"]
        else:
            sample = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- respacing -----------------------------------------------------------------------------------------------

    def respace(self, times):
        """The chain over the given times (strictly decreasing, ending at 0): one level per nonzero time.

        New betas come from alpha_bar at those times: beta = 1 - alpha_bar(t_i) / alpha_bar(t_{i+1}) for consecutive
        times t_i > t_{i+1} (improved-diffusion's respace.py; DensePure's fast sampler). The network is queried at
        each time's own timestep (time - 1, rescaled by the original T).
        """
        times = [float(t) for t in times]
        if times[-1] != 0.0 or any(a <= b for a, b in zip(times, times[1:])):
            raise ValueError(f"times must decrease strictly to 0, got {times}")
        ascending = times[::-1]  # 0 = t_S < ... < t_0
        alpha_bars = np.array([self.alpha_bar(t) for t in ascending])
        betas = 1.0 - alpha_bars[1:] / alpha_bars[:-1]
        return GaussianDiffusion(
            betas,
            variance=self.variance,
            model_timesteps=[max(t - 1.0, 0.0) for t in ascending[1:]],
            timestep_scale=self.timestep_scale,
        )


# ---------------------------------------------------------------------------------------------------------------
# Reverse processes (all start from x_t at time t and return an estimate of x_0 in [-1, 1] space)
# ---------------------------------------------------------------------------------------------------------------

def one_shot_denoise(model, diffusion, x_t, t, clip_denoised=True, y=None):
    """Carlini et al.'s one-shot denoiser: pred_xstart at time t (non-integer t uses the closed-form alpha_bar).

    The network is queried at timestep t - 1 (see the module docstring). t = 0 returns x_t unchanged.
    """
    if float(t) == 0.0:
        return x_t
    output = _call_model(model, x_t, diffusion.time_to_model_timestep(t), y)
    eps, _ = _split_output(output, x_t.shape[1])
    x0 = diffusion.predict_xstart_from_eps(x_t, t, eps)
    return x0.clamp(-1, 1) if clip_denoised else x0


def respaced_times(t, num_steps):
    """DensePure's fast-sampling grid: t, then round(t - i·t/S) for i = 1..S (the last is 0).

    The first point is t itself, not round(t): x_t is at the noise level alpha_bar(t) (DensePure builds it with
    alpha_bar = 1/(1+4σ²), whose cosine time is non-integer), so the first step must start there. DensePure's code
    rounds the first point as well, misstating the start level by up to half a step. For integer t the grid is exactly
    round(t - i·t/S), i = 0..S. Python's round (half to even) is used, as in DensePure. Points that do not decrease
    strictly (S > t, or a rounded point at or above a non-integer t) are dropped.
    """
    t = float(t)
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    interval = t / num_steps  # DensePure's `inter`, same floating-point order so that .5 ties round alike
    times = [t]
    for i in range(1, num_steps + 1):
        point = float(round(t - i * interval))
        if point < times[-1]:
            times.append(point)
    if times[-1] != 0.0:
        times.append(0.0)
    return times


def full_times(t):
    """Every integer time from t down to 0 (a non-integer t first steps to floor(t))."""
    t = float(t)
    return [t] + [float(k) for k in range(math.ceil(t) - 1, -1, -1)]


def _ancestral_chain(model, chain, x, top_level, generator, clip_denoised, y):
    for level in range(top_level, 0, -1):
        x = chain.p_sample(model, x, level, generator=generator, clip_denoised=clip_denoised, y=y)["sample"]
    return x


def branched_ancestral_chains(model, chain, x, top_level, generators, clip_denoised=True, y=None):
    """K ancestral chains from the same x_t, one per generator: the same samples as `_ancestral_chain` run once per
    generator (each generator draws exactly the noise it would draw alone, step by step), at fewer network calls. All
    chains start from the same x_t, so the first step's network call is the same for every chain: it is made once,
    and the chains branch at its noise draw; the other steps run the K chains as one batch of K·B images.
    Returns (K, B, ...): S steps cost 1 + K·(S - 1) network evaluations per image instead of K·S."""
    votes, batch = len(generators), len(x)

    def step(out, current, level):
        noise = torch.cat([noise_like(current[k * batch:(k + 1) * batch], g) for k, g in enumerate(generators)])
        if int(level) == 1:
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise

    first = chain.p_mean_variance(model, x, top_level, clip_denoised=clip_denoised, y=y)
    repeat = [votes] + [1] * (x.dim() - 1)
    xs = step({key: value.repeat(*repeat) if torch.is_tensor(value) and value.shape[:1] == x.shape[:1] else value
               for key, value in first.items()}, x.repeat(*repeat), top_level)
    ys = None if y is None else y.repeat(votes)
    for level in range(top_level - 1, 0, -1):
        xs = step(chain.p_mean_variance(model, xs, level, clip_denoised=clip_denoised, y=ys), xs, level)
    return xs.view(votes, batch, *x.shape[1:])


def respaced_reverse_votes(model, diffusion, x_t, t, num_steps, generators, clip_denoised=True, y=None):
    """`respaced_reverse` once per generator, branched after the shared first call (branched_ancestral_chains)."""
    if float(t) == 0.0:
        return x_t.unsqueeze(0).repeat(len(generators), *([1] * x_t.dim()))
    chain = diffusion.respace(respaced_times(t, num_steps))
    return branched_ancestral_chains(model, chain, x_t, chain.num_levels, generators, clip_denoised, y)


def respaced_reverse(model, diffusion, x_t, t, num_steps, generator=None, clip_denoised=True, y=None):
    """DensePure's fast sampling: DDPM ancestral steps over `respaced_times(t, num_steps)` with respaced betas."""
    if float(t) == 0.0:
        return x_t
    chain = diffusion.respace(respaced_times(t, num_steps))
    return _ancestral_chain(model, chain, x_t, chain.num_levels, generator, clip_denoised, y)


def full_reverse(model, diffusion, x_t, t, generator=None, clip_denoised=True, y=None):
    """Every DDPM step from time t down to 0 (DensePure's default, Carlini et al.'s multistep option).

    Integer t runs the original schedule's steps t, t-1, ..., 1 (network timesteps t-1, ..., 0). A non-integer t
    first takes one step from t to floor(t) with the respaced beta 1 - alpha_bar(floor t)/alpha_bar(t).
    """
    if float(t) == 0.0:
        return x_t
    diffusion.alpha_bar(t)  # validates t (range; non-integer only with a closed form)
    if _is_integer(t):
        return _ancestral_chain(model, diffusion, x_t, int(t), generator, clip_denoised, y)
    chain = diffusion.respace(full_times(t))
    return _ancestral_chain(model, chain, x_t, chain.num_levels, generator, clip_denoised, y)


def ddim_reverse(model, diffusion, x_t, t, num_steps, eta=0.0, generator=None, clip_denoised=True, y=None):
    """DDIM (Song et al., eq. 12) over `respaced_times(t, num_steps)`; eta = 0 is deterministic.

    As improved-diffusion's ddim_sample: eps is re-derived from the (clipped) pred_xstart, and
    sigma = eta·sqrt((1 - a_prev)/(1 - a))·sqrt(1 - a/a_prev). Noise is drawn only when eta > 0.
    """
    if float(t) == 0.0:
        return x_t
    chain = diffusion.respace(respaced_times(t, num_steps))
    x = x_t
    for level in range(chain.num_levels, 0, -1):
        out = chain.p_mean_variance(model, x, level, clip_denoised=clip_denoised, y=y)
        a = float(chain.alphas_cumprod[level - 1])
        a_prev = float(chain.alphas_cumprod_prev[level - 1])
        eps = (math.sqrt(1.0 / a) * x - out["pred_xstart"]) / math.sqrt(1.0 / a - 1.0)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        x = math.sqrt(a_prev) * out["pred_xstart"] + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if eta > 0 and level > 1:
            x = x + sigma * noise_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------------------------
# DiffPure's VP-SDE
# ---------------------------------------------------------------------------------------------------------------

VPSDE_BETA_MIN = 0.1
VPSDE_BETA_MAX = 20.0
VPSDE_N = 1000
VPSDE_DT = 1e-3
VPSDE_T_END = 1e-5


def vpsde_beta(t, beta_min=VPSDE_BETA_MIN, beta_max=VPSDE_BETA_MAX):
    """beta(t) = beta_min + t·(beta_max - beta_min), t in [0, 1]."""
    return beta_min + t * (beta_max - beta_min)


def vpsde_alpha_bar(t, beta_min=VPSDE_BETA_MIN, beta_max=VPSDE_BETA_MAX):
    """Continuous alpha_bar(t) = exp(-(beta_max - beta_min)·t²/2 - beta_min·t) (DiffPure's alphas_cumprod_cont)."""
    return math.exp(-0.5 * (beta_max - beta_min) * t ** 2 - beta_min * t)


def vpsde_model_timestep(t, num_timesteps=VPSDE_N):
    """Discrete network timestep for continuous t, as DiffPure's RevVPSDE._scale_timesteps: floor(N·t).

    DiffPure does ``(t * N).long()`` in float32; the 1e-6 guard maps grid points k/N to k even when their float
    representation falls just below (float32 arithmetic in DiffPure can then give k - 1 at some steps).
    """
    return float(math.floor(num_timesteps * t + 1e-6))


def vpsde_continuous_timestep(t, num_timesteps=VPSDE_N):
    """score_sde's time label for continuous VP models: (N - 1)·t, not floored (DiffPure's ``t * 999``)."""
    return (num_timesteps - 1) * float(t)


# How a network reads SDE time t: the integer timestep of a discrete-time network (guided-diffusion, the project's
# ADM models) or score_sde's continuous label (NCSN++). The network family says which (models.time_input).
VPSDE_TIME_INPUTS = {"discrete": vpsde_model_timestep, "continuous": vpsde_continuous_timestep}


def vpsde_q_sample(x0, t, noise, num_timesteps=VPSDE_N, beta_min=VPSDE_BETA_MIN, beta_max=VPSDE_BETA_MAX):
    """DiffPure's forward step to t* = t: the discrete table alpha_bar at time N·t (its ``a[t - 1]``).

    The table is cumprod(1 - linspace(beta_min/N, beta_max/N, N)), i.e. the linear-1000 schedule for the defaults.
    N·t must be an integer (DiffPure's t is given in 1/1000 units).
    """
    level = num_timesteps * t
    if abs(level - round(level)) > 1e-6:
        raise ValueError(f"N·t = {level} is not an integer")
    level = int(round(level))
    if level == 0:
        return x0
    betas = np.linspace(beta_min / num_timesteps, beta_max / num_timesteps, num_timesteps, dtype=np.float64)
    a = float(np.prod(1.0 - betas[:level]))
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise


def vpsde_times(t_start, dt=VPSDE_DT, t_end=VPSDE_T_END):
    """Euler–Maruyama grid from t_start down to t_end: fixed steps of dt, the last shortened to land on t_end.

    This is torchsde's fixed-step loop (``next_t = min(t + dt, t1)``) written in forward time, so t* = 0.1 at
    dt = 1e-3 gives 100 steps. t_start <= t_end gives no step.
    """
    if t_start <= t_end:
        return [float(t_start)]
    num_steps = math.ceil((t_start - t_end) / dt - 1e-9)
    return [t_start - k * dt for k in range(num_steps)] + [t_end]


def reverse_vpsde(model, x_t, t_start, generator=None, *, beta_min=VPSDE_BETA_MIN, beta_max=VPSDE_BETA_MAX,
                  num_timesteps=VPSDE_N, dt=VPSDE_DT, t_end=VPSDE_T_END, y=None, time_input="discrete",
                  checkpoint=False):
    """DiffPure: integrate the reverse VP-SDE from t_start to t_end with Euler–Maruyama (torchsde method='euler').

    Reverse SDE in forward time: dx = [-beta/2·x - beta·score] dt + sqrt(beta) dw̄. One step from t to t - h:
        x <- x + h·beta(t)·(x/2 + score(x, t)) + sqrt(beta(t)·h)·z,
    with score = -eps(x, time label) / sqrt(1 - alpha_bar_cont(t)) from an eps network (first C channels when the
    variance is learned), exactly DiffPure's score for both of its networks. `time_input` says how the network reads
    t (VPSDE_TIME_INPUTS): "discrete" floor(N·t) (guided-diffusion, ADM), "continuous" (N - 1)·t (score_sde).

    Gradients: the loop is plain autograd, so backpropagating through it gives the exact gradient of this
    discretised purifier (the `full` gradient mode). `checkpoint=True` recomputes each network call in the backward
    pass instead of storing its activations (memory of one call instead of one per step, for about one extra
    forward per step); the noise z is drawn outside the recomputed part, so the recomputation sees the same z.
    """
    if time_input not in VPSDE_TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; choose one of {sorted(VPSDE_TIME_INPUTS)}")
    timestep = VPSDE_TIME_INPUTS[time_input]
    x = x_t
    times = vpsde_times(float(t_start), dt, t_end)
    for t_now, t_next in zip(times, times[1:]):
        h = t_now - t_next
        beta = vpsde_beta(t_now, beta_min, beta_max)
        t_model = timestep(t_now, num_timesteps)
        if checkpoint and torch.is_grad_enabled():
            output = torch.utils.checkpoint.checkpoint(_call_model, model, x, t_model, y, use_reentrant=False)
        else:
            output = _call_model(model, x, t_model, y)
        eps, _ = _split_output(output, x.shape[1])
        score = eps_to_score(eps, vpsde_alpha_bar(t_now, beta_min, beta_max))
        x = x + h * beta * (0.5 * x + score) + math.sqrt(beta * h) * noise_like(x, generator)
    return x


def vpsde_num_steps(t_start, dt=VPSDE_DT, t_end=VPSDE_T_END):
    """Euler–Maruyama steps (= network calls) of `reverse_vpsde` from t_start."""
    return len(vpsde_times(float(t_start), dt, t_end)) - 1


# ---------------------------------------------------------------------------------------------------------------
# sigma -> t* (sigma is the smoothing noise on the [0, 1] scale; the diffusion sees 2σ in [-1, 1] space)
# ---------------------------------------------------------------------------------------------------------------

def _noise_to_signal(alphas_cumprod):
    return np.sqrt(1.0 / np.asarray(alphas_cumprod, dtype=np.float64) - 1.0)


def tstar_first_at_least(alphas_cumprod, sigma):
    """Carlini et al.: the first 0-based table index i with sqrt(1 - a_i)/sqrt(a_i) >= 2σ (time i + 1).

    Carlini's loop starts checking at i = 1; this checks i = 0 too, which only matters for 2σ below the first
    step's noise-to-signal ratio (σ < 0.005 on linear-1000).
    """
    ratio = _noise_to_signal(alphas_cumprod)
    hits = np.nonzero(ratio >= imagespace.sigma_to_model_space(sigma))[0]
    if len(hits) == 0:
        raise ValueError(f"no timestep reaches noise level 2σ = {imagespace.sigma_to_model_space(sigma)}")
    return int(hits[0])


def tstar_nearest(alphas_cumprod, sigma):
    """DensePure (ImageNet): the 0-based table index i minimising |sqrt(1/a_i - 1) - 2σ| (ties: the smaller i).

    DensePure's loop looks for the crossing and falls back to the last index when there is none (2σ below the
    first ratio); argmin returns 0 there instead.
    """
    ratio = _noise_to_signal(alphas_cumprod)
    return int(np.argmin(np.abs(ratio - imagespace.sigma_to_model_space(sigma))))


def tstar_cosine_closed_form(sigma, num_timesteps):
    """DensePure (CIFAR-10): the non-integer time where the cosine alpha_bar equals 1/(1 + (2σ)²).

    t = T·(1 - 2·1.008·asin(sin(π/(2·1.008)) / sqrt(1 + (2σ)²)) / π), a time in this module's convention.
    """
    s = imagespace.sigma_to_model_space(sigma)
    c = 1.0 + COSINE_OFFSET
    angle = math.asin(math.sin(math.pi / (2.0 * c)) / math.sqrt(1.0 + s ** 2))
    return num_timesteps * (1.0 - 2.0 * c * angle / math.pi)


def alpha_bar_for_sigma(sigma):
    """The noise level of x + 2σ·ε rescaled to unit variance: alpha_bar = 1 / (1 + (2σ)²) (DensePure's `a`)."""
    return 1.0 / (1.0 + imagespace.sigma_to_model_space(sigma) ** 2)


def noise_to_xt(x01, noise, sigma, alpha_bar=None):
    """x_t = sqrt(alpha_bar)·(x_model + 2σ·noise), how DDS/DensePure turn a smoothing sample into a diffusion state.

    x01: clean images in [0, 1]. noise: standard normal ε of the same shape, drawn by the caller from its smoothing
    RNG; σ·ε in [0, 1] space is 2σ·ε in model space. alpha_bar: default `alpha_bar_for_sigma(sigma)`, which makes
    x_t exactly a sample of q(x_t | x_0) at that level (DensePure); Carlini et al. use the table value at t*.
    """
    if alpha_bar is None:
        alpha_bar = alpha_bar_for_sigma(sigma)
    x_noisy = imagespace.to_model_space(x01) + imagespace.sigma_to_model_space(sigma) * noise
    return math.sqrt(float(alpha_bar)) * x_noisy
