"""Likelihood maximization (LM), RDC's purifier (`EDMEulerIntegralLM.likelihood_maximization_T1`, `EDMLM.py`).

A purifier, ``purifier(x01, generator) -> x01``: a few Adam steps on x~ = 2x - 1 that lower the unconditional
denoising loss

    L(x~) = mean_CHW (D(x~ + sigma·eps, sigma) - x~)²,   sigma ~ U[sigma_min, sigma_max], eps ~ N(0, I) per step,

with the target x~ *not* detached (the gradient flows through both D's input and the target), then (x~ + 1)/2
clamped to [0, 1]. RDC's defaults: 5 steps, lr 0.1, sigma ~ U[0.4, 0.6]; its l2 clamp at 2·100 in [-1, 1] units never
binds (a CIFAR-10 image is at most 2·sqrt(3072) = 111 away), so the move is bounded only by Adam's step (about lr per
step and pixel, 0.25 in [0, 1] after 5 steps). `eta` is the paper's bound on the move (in [0, 1] image units, norm
`eta_norm`; which norm the paper's η ablation uses is UNVERIFIED): after every step x~ is projected back onto the
ball of radius 2·eta around the input, as the official `l2_clamp`; None = unbounded.

Adam is written out here (torch.optim.Adam's update, same order of operations): unrolled and differentiable, so that
gradient mode `full` backpropagates through LM (create_graph), the variant RDC's code tried (its `DifferentiableAdam`
import fails). Whether a graph is kept follows the caller: with gradients enabled and an input that requires grad,
the output is a differentiable function of the input; otherwise (evaluation under no_grad, or `bpda` mode, where
`attacks.gradients.BPDAPurifier` gives the identity backward, RDC's choice) LM still takes its own gradients inside
and returns a detached result. RDC = `PurifiedClassifier(LikelihoodMaximizer(...), DiffusionClassifier(...))`.

Draws: RDC calls `set_seed(1)` at every call and runs one image at a time, so every image gets the same sequence of
(sigma, eps) draws. Here `seed` re-seeds a CPU generator at every call (deterministic, batch-independent: each step's
sigma and eps are shared by the images of the batch); `shared_draws=False` draws them per image and step from that
stream instead; `seed=None` draws from the generator the caller passes (a randomized LM).
"""

import math

import torch

from diffrobust import imagespace, seeds

ETA_NORMS = ("l2", "linf")


def _safe_sqrt(v):
    """sqrt with derivative 0 (not inf) at 0, so that a zero gradient entry does not turn the unrolled Adam's
    second-order terms into NaN."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def adam_step(x, grad, m, v, step, *, lr, betas=(0.9, 0.999), eps=1e-8):
    """One step of torch.optim.Adam (no weight decay, no amsgrad) as plain tensor operations: (x, m, v) updated.
    `step` counts from 1."""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    denominator = _safe_sqrt(v) / math.sqrt(1 - beta2 ** step) + eps
    return x - (lr / (1 - beta1 ** step)) * m / denominator, m, v


def project(x, center, radius, norm):
    """x projected onto the ball of `radius` around `center` per image (differentiable), as RDC's l2_clamp."""
    difference = x - center
    if norm == "linf":
        return center + difference.clamp(-radius, radius)
    distance = difference.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
    scale = torch.where(distance > radius, radius / distance.clamp_min(1e-30), torch.ones_like(distance))
    return center + difference * scale


class LikelihoodMaximizer:
    """RDC's likelihood maximization as a purifier (module docstring).

    denoiser: an unconditional denoiser with ``denoise(x_noisy, sigma) -> D`` (`defenses.diffusion_classifier`'s
    adapters: an unconditional EDMDenoiser, or a ChainDenoiser with a null class). steps, lr, sigma_min, sigma_max:
    RDC's 5, 0.1, 0.4, 0.6; betas, adam_eps: torch.optim.Adam's defaults (RDC's). eta, eta_norm: the bound on the
    move (None: unbounded, RDC's code). seed: re-seeded at every call (RDC's set_seed(1)); None: the caller's
    generator. shared_draws: one (sigma, eps) per step for the whole batch (as RDC at batch size 1) or one per image.
    """

    def __init__(self, denoiser, *, steps=5, lr=0.1, sigma_min=0.4, sigma_max=0.6, eta=None, eta_norm="l2",
                 seed=1, shared_draws=True, betas=(0.9, 0.999), adam_eps=1e-8):
        if eta_norm not in ETA_NORMS:
            raise ValueError(f"unknown eta_norm {eta_norm!r}; choose one of {ETA_NORMS}")
        if eta is not None and eta < 0:
            raise ValueError(f"eta must be >= 0 or None, got {eta}")
        if not 0 < sigma_min <= sigma_max or steps < 0:
            raise ValueError(f"need 0 < sigma_min <= sigma_max and steps >= 0, got {sigma_min}, {sigma_max}, {steps}")
        self.denoiser = denoiser
        self.steps, self.lr = int(steps), float(lr)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.eta, self.eta_norm = (None if eta is None else float(eta)), eta_norm
        self.seed = None if seed is None else int(seed)
        self.shared_draws = bool(shared_draws)
        self.betas, self.adam_eps = tuple(float(b) for b in betas), float(adam_eps)

    def network_evaluations(self):
        """Network forward passes per image and call (each followed by one backward pass of the loss)."""
        return self.steps

    def settings(self):
        """What determines the output, for run records."""
        return {"steps": self.steps, "lr": self.lr, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "eta": self.eta, "eta_norm": self.eta_norm, "seed": self.seed, "shared_draws": self.shared_draws,
                "betas": list(self.betas), "adam_eps": self.adam_eps}

    def draws(self, x_shape, dtype, generator=None):
        """[(sigma [N] float64, eps [N, C, H, W])] per step, on the CPU: sigma first, then eps, as RDC draws them."""
        if self.seed is not None:
            generator = seeds.generator(self.seed)
        draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        count = 1 if self.shared_draws else x_shape[0]
        out = []
        for _ in range(self.steps):
            u = torch.rand((count,), generator=generator, dtype=draw_dtype)
            eps = torch.randn((count, *x_shape[1:]), generator=generator, dtype=draw_dtype)
            sigma = (self.sigma_min + (self.sigma_max - self.sigma_min) * u).to(torch.float64)
            out.append((sigma.expand(x_shape[0]), eps.expand(x_shape[0], *x_shape[1:])))
        return out

    def loss(self, x_model, sigma, eps):
        """Sum over images of mean_CHW (D(x~ + sigma·eps, sigma) - x~)², the target not detached (each image's
        gradient is that of RDC's loss at batch size 1)."""
        x_noisy = x_model + sigma.to(x_model.dtype).reshape(-1, 1, 1, 1) * eps
        denoised = self.denoiser.denoise(x_noisy, sigma)
        return ((denoised - x_model) ** 2).flatten(1).mean(dim=1).sum()

    def __call__(self, x01, generator=None):
        differentiable = torch.is_grad_enabled() and x01.requires_grad
        draws = [(s.to(x01.device), e.to(x01.device, x01.dtype))
                 for s, e in self.draws(x01.shape, x01.dtype, generator)]
        with torch.enable_grad():
            start = imagespace.to_model_space(x01 if differentiable else x01.detach())
            x = start if differentiable else start.clone().requires_grad_(True)
            m = v = torch.zeros_like(start)
            for step, (sigma, eps) in enumerate(draws, start=1):
                (grad,) = torch.autograd.grad(self.loss(x, sigma, eps), x, create_graph=differentiable)
                x, m, v = adam_step(x, grad, m, v, step, lr=self.lr, betas=self.betas, eps=self.adam_eps)
                if self.eta is not None:
                    x = project(x, start, imagespace.sigma_to_model_space(self.eta), self.eta_norm)
                if not differentiable:
                    x = x.detach().requires_grad_(True)
        out = imagespace.to_image_space(x).clamp(0, 1)
        return out if differentiable else out.detach()
