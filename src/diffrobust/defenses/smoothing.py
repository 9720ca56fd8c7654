"""Smoothing denoisers (Carlini et al. DDS, DensePure): the purifier randomized smoothing queries.

A purifier maps images in [0, 1] to images in [0, 1]: ``purifier(x01, generator) -> x01``. The t* rule, the reverse
process and its step count are constructor arguments, named as the papers name them, and come from the config.
"""

import torch

from diffrobust import diffusion as dp
from diffrobust import imagespace

TSTAR_RULES = ("first_at_least", "nearest", "cosine_closed_form")
REVERSE_PROCESSES = ("one_shot", "respaced", "full", "ddim")


def tstar_time(schedule, sigma, rule):
    """The diffusion time (module `diffusion`'s convention: time = 0-based table index + 1) matching smoothing σ.

    first_at_least: Carlini et al.; nearest: DensePure on ImageNet (linear schedule); cosine_closed_form: DensePure
    on CIFAR-10 (non-integer time; needs a cosine schedule).
    """
    if rule == "first_at_least":
        return dp.tstar_first_at_least(schedule.alphas_cumprod, sigma) + 1
    if rule == "nearest":
        return dp.tstar_nearest(schedule.alphas_cumprod, sigma) + 1
    if rule == "cosine_closed_form":
        if schedule.alpha_bar_fn is None:
            raise ValueError("tstar_rule 'cosine_closed_form' needs a cosine schedule (improved-diffusion CIFAR-10)")
        return dp.tstar_cosine_closed_form(sigma, schedule.num_levels)
    raise ValueError(f"unknown tstar_rule {rule!r}; choose one of {TSTAR_RULES}")


class SmoothingDenoiser:
    """Denoise an image that already carries smoothing noise: x + σ·ε in [0, 1] (DDS and DensePure).

    In model space the noise is 2σ·ε; scaling by sqrt(alpha_bar) with alpha_bar = 1/(1 + 4σ²) makes
    x_t = sqrt(alpha_bar)(x + 2σε) exactly a sample of q(x_t | x) at that level (DensePure). The network is queried at
    t* from `tstar_rule`; `reverse` is 'one_shot' (Carlini et al.: pred_xstart at t*), 'respaced' (DensePure's fast
    sampling with `num_steps`), 'full' (every step) or 'ddim'.
    """

    def __init__(self, eps_model, schedule, sigma, *, tstar_rule, reverse="one_shot", num_steps=None):
        if reverse not in REVERSE_PROCESSES:
            raise ValueError(f"unknown reverse process {reverse!r}; choose one of {REVERSE_PROCESSES}")
        if reverse in ("respaced", "ddim") and not num_steps:
            raise ValueError(f"reverse process {reverse!r} needs num_steps")
        self.eps_model, self.schedule, self.sigma = eps_model, schedule, float(sigma)
        self.reverse, self.num_steps = reverse, num_steps
        self.t_star = tstar_time(schedule, sigma, tstar_rule)
        self.alpha_bar = dp.alpha_bar_for_sigma(sigma)

    def network_evaluations(self):
        """Network calls per image per reverse run (the cost the papers trade against accuracy)."""
        if self.reverse == "one_shot":
            return 1
        if self.reverse == "full":
            return len(dp.full_times(self.t_star)) - 1
        return len(dp.respaced_times(self.t_star, self.num_steps)) - 1

    def network_evaluations_of_votes(self, votes):
        """Network calls per image of `purify_votes` with `votes` reverse runs."""
        if self.reverse in ("one_shot", "ddim"):
            return self.network_evaluations()  # deterministic: one run serves every vote
        if self.reverse == "respaced":
            return 1 + votes * (self.network_evaluations() - 1)
        return votes * self.network_evaluations()

    def purify_votes(self, x_noisy01, generators):
        """(K, B, ...) purifications, the k-th equal to self(x_noisy01, generators[k]), computed together: the
        deterministic reverse processes run once, DensePure's respaced chain shares its first network call and runs
        the rest as one batch (diffusion.branched_ancestral_chains); the full chain runs vote by vote."""
        if self.reverse in ("one_shot", "ddim"):
            x0 = self(x_noisy01, generators[0])
            return x0.unsqueeze(0).repeat(len(generators), *([1] * x0.dim()))
        if self.reverse == "full":
            return torch.stack([self(x_noisy01, g) for g in generators])
        x_t = imagespace.to_model_space(x_noisy01) * self.alpha_bar ** 0.5
        x0 = dp.respaced_reverse_votes(self.eps_model, self.schedule, x_t, self.t_star, self.num_steps, generators)
        return imagespace.to_image_space(x0).clamp(0, 1)

    def __call__(self, x_noisy01, generator=None):
        # No torch.no_grad() here: a purifier leaves autograd to its caller (attacks backpropagate through it;
        # certification, which needs no gradients, wraps its run in no_grad itself).
        x_t = imagespace.to_model_space(x_noisy01) * self.alpha_bar ** 0.5
        if self.reverse == "one_shot":
            x0 = dp.one_shot_denoise(self.eps_model, self.schedule, x_t, self.t_star)
        elif self.reverse == "respaced":
            x0 = dp.respaced_reverse(self.eps_model, self.schedule, x_t, self.t_star, self.num_steps, generator)
        elif self.reverse == "full":
            x0 = dp.full_reverse(self.eps_model, self.schedule, x_t, self.t_star, generator)
        else:
            x0 = dp.ddim_reverse(self.eps_model, self.schedule, x_t, self.t_star, self.num_steps, generator=generator)
        return imagespace.to_image_space(x0).clamp(0, 1)
