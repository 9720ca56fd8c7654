"""Protective perturbations (Pixel is a Barrier, Xue & Chen; Diff-Protect's attacks): small ℓ∞ perturbations that an
image owner adds so that diffusion-based editing of the image fails.

Each attack is an *objective* that ℓ∞ PGD minimises (Diff-Protect runs advertorch's `LinfPGDAttack(targeted=True)`,
which minimises the loss it is given; attacks_rdc_pdm.md §4):

| name | objective minimised (per image) | what it attacks |
|---|---|---|
| photoguard_encoder | ‖E(x)‖₂ of the posterior mean (toward the zero latent: MadryLab's PhotoGuard) | the encoder |
| texture_only | ‖E(x) − E(target)‖² (sum over the latent; Diff-Protect's "PhotoGuard" row) | the encoder |
| advdm / advdm_minus | −L_sem / +L_sem, L_sem = ‖ε̂(z_t, t) − ε‖² at t ~ U{0..T−1}, z = E(x) sampled | the UNet through E |
| mist | ‖E(x) − E(target)‖² − rate·L_sem (rate 10⁴) | both |
| sds / sds_minus | the AdvDM objectives, with SDS's gradient: (ε̂ − ε) pulled back through the encoder only | the encoder |
| pixel_advdm / pixel_advdm_minus | −/+ the pixel model's ‖ε̂(x_t, t) − ε‖² | a pixel diffusion model |
| pixel_sds / pixel_sds_minus | the same with SDS's gradient (ε̂ − ε) itself (the pixel model has no encoder) | a pixel model |

Two attacks go by "PhotoGuard": Diff-Protect's README and table run `texture_only` toward Mist's target image under
that name, while MadryLab's PhotoGuard encoder attack pulls the latent toward zero; here they are `texture_only` and
`photoguard_encoder` (PAPER_ROWS maps each attack to the paper's row). The encoder attacks and Mist's textural term
act on the latent only: they have no pixel-space analog (a pixel model has no encoder), so only AdvDM and SDS also run
against the pixel model, as the authors' `pdm_attack` does.

`protect` is the PGD: a uniform random start in the ball (advertorch's default; Diff-Protect's SDS loop starts at x,
`random_start: false` keeps that), steps of a fixed size α along −sign(gradient), projected onto the ball and [0, 1].
Diff-Protect's α is 1/255 (`alpha: 1` in /255 units, configs/attack/base.yaml) at every budget (RELEASED_STEP_SIZE);
`pgd_step` also offers a step relative to ε (the mini presets'). Images are in [0, 1]; the objectives convert to the
models' [−1, 1] inside the LDM (`LatentDiffusion.posterior`).

`stored_images` is how a protected set is stored: exact float32, or Diff-Protect's PNGs (`released_uint8`: its
[−1, 1] -> [0, 255] float32 arithmetic truncated by `astype(uint8)`, which also darkens its clean reference).
"""

from dataclasses import dataclass

import torch

from diffrobust import imagespace
from diffrobust.attacks.budget import check_inside_budget, project
from diffrobust.diffusion import noise_like

LATENT_ATTACKS = ("photoguard_encoder", "texture_only", "advdm", "advdm_minus", "mist", "sds", "sds_minus")
PIXEL_ATTACKS = ("pixel_advdm", "pixel_advdm_minus", "pixel_sds", "pixel_sds_minus")
ATTACKS = LATENT_ATTACKS + PIXEL_ATTACKS
# Attacks whose objective acts on the latent only: no pixel-space analog exists.
ENCODER_ONLY = ("photoguard_encoder", "texture_only", "mist")
MIST_RATE = 1e4
# Diff-Protect's PGD step: `alpha: 1` (/255) in configs/attack/base.yaml, 2/255 in its [-1, 1] units, at every budget.
RELEASED_STEP_SIZE = 1 / 255
# attack -> the row of Pixel is a Barrier's / Diff-Protect's tables it stands for (None: no row of the paper).
PAPER_ROWS = {
    "advdm": "AdvDM",
    "advdm_minus": "AdvDM(-)",
    "sds": "SDS(+)",
    "sds_minus": "SDS(-)",
    "mist": "Mist",
    "texture_only": "PhotoGuard (Diff-Protect's texture_only toward MIST.png)",
    "photoguard_encoder": None,  # MadryLab's encoder attack toward the zero latent: the original PhotoGuard's
    "pixel_advdm": "AdvDM against the PDM (the authors' pdm_attack; row name UNVERIFIED)",
    "pixel_advdm_minus": None,
    "pixel_sds": None,
    "pixel_sds_minus": None,
}
# How a protect job stores its images (pixel_barrier.storage).
STORAGES = ("float32", "released_uint8")


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------

class Objective:
    """A per-image objective that PGD minimises; `gradient` is its gradient unless the attack defines its own."""

    def __call__(self, x01, generator):
        raise NotImplementedError

    def gradient(self, x01, generator):
        x = x01.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self(x, generator).sum(), [x])
        return grad


class PhotoGuardEncoder(Objective):
    """PhotoGuard's encoder attack: push the posterior mean toward the zero latent (‖E(x)‖₂ per image)."""

    def __init__(self, ldm):
        self.ldm = ldm

    def __call__(self, x01, generator):
        return self.ldm.encode(x01).flatten(1).norm(dim=1)


class LatentTexture(Objective):
    """g·‖E(x) − E(target)‖² − rate·L_sem: texture_only (g = 1, rate 0) and Mist (g = 1, rate 10⁴).

    E is the scaled posterior *sample* (Diff-Protect's get_first_stage_encoding), the target's latent drawn once.
    """

    def __init__(self, ldm, target01, *, rate=0.0, sign=1.0):
        self.ldm, self.target01, self.rate, self.sign = ldm, target01, float(rate), float(sign)

    def __call__(self, x01, generator):
        z = self.ldm.encode(x01, generator=generator)
        with torch.no_grad():
            target = self.ldm.encode(self.target01.expand_as(x01), generator=generator)
        texture = (z - target).pow(2).flatten(1).sum(1)
        if self.rate == 0.0:
            return self.sign * texture
        condition = self.ldm.condition(len(x01), device=z.device)
        semantic, _, _ = self.ldm.denoising_loss(z, condition, generator)
        return self.sign * texture - self.rate * semantic


class LatentSemantic(Objective):
    """AdvDM: −g·L_sem on the LDM (g = +1 maximises the eps loss, g = −1 minimises it: AdvDM(−))."""

    def __init__(self, ldm, g=1.0):
        self.ldm, self.g = ldm, float(g)

    def __call__(self, x01, generator):
        z = self.ldm.encode(x01, generator=generator)
        condition = self.ldm.condition(len(x01), device=z.device)
        semantic, _, _ = self.ldm.denoising_loss(z, condition, generator)
        return -self.g * semantic


class LatentSDS(LatentSemantic):
    """SDS(+/−): AdvDM's objective with Diff-Protect's cheaper gradient, (ε̂ − ε) pulled back through the encoder
    only (no UNet Jacobian): ∇ = −g · J_E(x)ᵀ(ε̂ − ε). Stepping along −sign(∇) is Diff-Protect's x + g·sign(J_Eᵀ(ε̂−ε))."""

    def gradient(self, x01, generator):
        return -self.g * sds_pullback(self.ldm, x01, generator)


def sds_pullback(ldm, x01, generator):
    """J_E(x)ᵀ(ε̂ − ε): the encoder's vector-Jacobian product with the UNet's eps error at a random t (the SDS
    gradient, computed as Diff-Protect's ``z.backward(gradient=eps_pred - noise)``)."""
    x = x01.detach().requires_grad_(True)
    z = ldm.encode(x, generator=generator)
    with torch.no_grad():
        condition = ldm.condition(len(x), device=z.device)
        t = torch.randint(0, ldm.num_train_timesteps, (len(z),), generator=generator).to(z.device)
        noise = noise_like(z, generator)
        error = ldm.eps(ldm.q_sample(z, t, noise), t, condition) - noise
    (grad,) = torch.autograd.grad(z, [x], grad_outputs=error)
    return grad


class PixelSemantic(Objective):
    """AdvDM on a pixel diffusion model: −g·‖ε̂(x_t, t) − ε‖² at a random level t of its chain (one t per step for
    the batch: the chain's q_sample takes a scalar time) with fresh noise."""

    def __init__(self, eps_model, schedule, g=1.0):
        self.eps_model, self.schedule, self.g = eps_model, schedule, float(g)

    def _error(self, x01, generator):
        x0 = imagespace.to_model_space(x01)
        level = int(torch.randint(1, self.schedule.num_levels + 1, (1,), generator=generator))
        noise = noise_like(x0, generator)
        x_t = self.schedule.q_sample(x0, level, noise)
        t_model = torch.full((len(x0),), float(self.schedule.model_timestep(level)), device=x0.device)
        eps = self.eps_model(x_t, t_model)
        return eps[:, :x0.shape[1]] - noise

    def __call__(self, x01, generator):
        return -self.g * self._error(x01, generator).pow(2).flatten(1).mean(1)


class PixelSDS(PixelSemantic):
    """SDS on a pixel model: the encoder is the identity, so the gradient is (ε̂ − ε) itself (times −g)."""

    def gradient(self, x01, generator):
        with torch.no_grad():
            return -self.g * self._error(x01, generator)


def objective_for(name, *, ldm=None, pixel_eps_model=None, pixel_schedule=None, target01=None, rate=MIST_RATE):
    """The objective of attack `name` (see the module table) on the given models."""
    if name not in ATTACKS:
        raise ValueError(f"unknown protective attack {name!r}; choose one of {ATTACKS}")
    if name in LATENT_ATTACKS and ldm is None:
        raise ValueError(f"{name} attacks a latent diffusion model: pass ldm")
    if name in PIXEL_ATTACKS and (pixel_eps_model is None or pixel_schedule is None):
        raise ValueError(f"{name} attacks a pixel diffusion model: pass pixel_eps_model and pixel_schedule")
    if name in ("texture_only", "mist") and target01 is None:
        raise ValueError(f"{name} pulls the latent toward a target image: pass target01")
    g = -1.0 if name.endswith("_minus") else 1.0
    if name == "photoguard_encoder":
        return PhotoGuardEncoder(ldm)
    if name == "texture_only":
        return LatentTexture(ldm, target01)
    if name == "mist":
        return LatentTexture(ldm, target01, rate=rate)
    if name.startswith("advdm"):
        return LatentSemantic(ldm, g)
    if name.startswith("sds"):
        return LatentSDS(ldm, g)
    if name.startswith("pixel_advdm"):
        return PixelSemantic(pixel_eps_model, pixel_schedule, g)
    return PixelSDS(pixel_eps_model, pixel_schedule, g)


# ---------------------------------------------------------------------------------------------------------------
# PGD and the random control
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Protection:
    """Protected images and what the attack did: objective per image before and after (averaged over fixed draws)."""

    x_protected: torch.Tensor
    objective_before: torch.Tensor
    objective_after: torch.Tensor


def mean_objective(objective, x01, seed, draws):
    """The objective per image averaged over `draws` fixed random draws (the same draws for every x): a
    low-variance measure of what the attack changed."""
    total = torch.zeros(len(x01), dtype=torch.float64)
    with torch.no_grad():
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed * 1000 + draw)
            total += objective(x01, generator).double().cpu()
    return total / draws


def pgd_step(eps, step_size, relative_step_size):
    """The PGD step at budget `eps`: `step_size` (in [0, 1] image units, Diff-Protect's 1/255 at every budget) or
    `relative_step_size`·ε; exactly one of them is given (the config keys pixel_barrier.step_size and
    pixel_barrier.relative_step_size)."""
    if (step_size is None) == (relative_step_size is None):
        raise ValueError("give exactly one of pixel_barrier.step_size (the step in [0, 1] units; Diff-Protect: 1/255) "
                         f"and pixel_barrier.relative_step_size (step / eps); got {step_size} and {relative_step_size}")
    return float(step_size) if relative_step_size is None else float(relative_step_size) * eps


def protect(objective, x01, *, eps, steps, step=RELEASED_STEP_SIZE, random_start=True, generator=None,
            measure_draws=8, measure_seed=0, progress=None):
    """ℓ∞ PGD minimising `objective` inside the ε-ball around x01 with steps of `step` (see pgd_step) -> Protection
    (checked inside the budget)."""
    generator = generator or torch.Generator().manual_seed(0)
    x01 = x01.detach()
    x_adv = x01.clone()
    if random_start:
        start = (torch.rand(x01.shape, generator=generator, dtype=x01.dtype).to(x01.device) * 2 - 1) * eps
        x_adv = project(x01 + start, x01, "linf", eps)
    for _ in range(steps):
        grad = objective.gradient(x_adv, generator)
        x_adv = project(x_adv.detach() - step * grad.sign(), x01, "linf", eps)
        if progress is not None:
            progress.update(1)
    check_inside_budget(x01, x_adv, "linf", eps, where="protected images")
    return Protection(x_adv, mean_objective(objective, x01, measure_seed, measure_draws),
                      mean_objective(objective, x_adv, measure_seed, measure_draws))


def random_sign_noise(x01, eps, generator):
    """The random control of the same budget: x + ε·s with s uniform in {−1, +1} per pixel, clipped to [0, 1]."""
    signs = torch.randint(0, 2, x01.shape, generator=generator).to(device=x01.device, dtype=x01.dtype) * 2 - 1
    return (x01 + eps * signs).clamp(0, 1)


def latent_distance(ldm, x01, x_other01):
    """‖E(x') − E(x)‖₂ per image on the posterior means: how far a perturbation moves the latent."""
    with torch.no_grad():
        return (ldm.encode(x_other01) - ldm.encode(x01)).flatten(1).norm(dim=1)


def released_uint8(x01):
    """Diff-Protect's stored PNG of images x01 in [0, 1], as uint8: its [−1, 1] image 2x − 1 mapped back by
    clamp((x + 1)/2)·255 in float32 and cast with `astype(uint8)`, which truncates. A perturbation δ is stored within
    [−ε − 1/255, +ε], and a clean image round-trips to one grey level darker wherever v/127.5 − 1 loses a float32 bit
    (values 1..63)."""
    in_model_space = imagespace.to_model_space(x01.to(torch.float32))
    return (((in_model_space + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)


def stored_images(x01, storage):
    """The images a protect job stores (and its edit job reads), in [0, 1]: `float32` keeps them exactly,
    `released_uint8` as Diff-Protect's PNGs hold them (released_uint8 read back)."""
    if storage == "float32":
        return x01
    if storage == "released_uint8":
        return imagespace.uint8_to_float(released_uint8(x01).cpu()).to(x01.device)
    raise ValueError(f"unknown pixel_barrier.storage {storage!r}; choose one of {STORAGES}")
