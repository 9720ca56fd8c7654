"""DiffPure (Nie et al., ICML'22): diffuse the input a little, then run the reverse process back to an image.

A purifier maps images in [0, 1] to images in [0, 1]: ``purifier(x01, generator) -> x01``. Two variants, named as
DiffPure's runners name them:

- ``sde`` (`runners/diffpure_sde.py`): forward to t* with the *discrete* alpha_bar at index t*·N - 1 (DiffPure's
  ``a[t - 1]``), then the reverse VP-SDE (beta 0.1 -> 20) from t* to 1e-5 with Euler–Maruyama at dt (1e-3: 100 steps
  at t* = 0.1), score = -eps/std. Any eps network of the project plugs in; `time_input` says how it reads SDE time
  (floor(N·t) for discrete-time networks, (N - 1)·t for score_sde's continuous NCSN++).
- ``ddpm`` (`runners/diffpure_guided.py`, ImageNet): the same forward step, then the model's own discrete ancestral
  chain from level t*·N down to 0.

DiffPure does not clip the purified image before its classifier, and neither does this purifier (clipping would
zero the gradient wherever it acts): the output can leave [0, 1] by the reverse process's last-step noise.

`rand_t` (DiffPure's ``--rand_t``): the forward noise level is t*·N + an integer offset drawn uniformly from
[-t_delta, t_delta) per call, while the reverse process still starts at t* — as the official runner does (it adds the
offset to the forward step only); recorded in docs/fidelity.md.
"""

import torch

from diffrobust import diffusion as dp
from diffrobust import imagespace

VARIANTS = ("sde", "ddpm")


class DiffPurePurifier:
    """DiffPure's purifier around an eps model ``model(x_t, t_model, y=None)`` (y unused: DiffPure is unconditional).

    t_star: diffusion time in (0, 1] (DiffPure's ``--t`` / 1000, e.g. 0.1 on CIFAR-10 ℓ∞); t_star·N must be an integer.
    variant: "sde" or "ddpm" (see the module docstring); `schedule` (a diffusion.GaussianDiffusion on the model's own
    N-level chain) is needed for "ddpm". dt: the Euler–Maruyama step of "sde". checkpoint: recompute the network calls
    in the backward pass (memory of one call for full-gradient attacks through long chains).
    """

    def __init__(self, eps_model, *, t_star, variant="sde", dt=dp.VPSDE_DT, time_input="discrete", rand_t=False,
                 t_delta=15, schedule=None, num_timesteps=dp.VPSDE_N, beta_min=dp.VPSDE_BETA_MIN,
                 beta_max=dp.VPSDE_BETA_MAX, checkpoint=False):
        if variant not in VARIANTS:
            raise ValueError(f"unknown DiffPure variant {variant!r}; choose one of {VARIANTS}")
        level = t_star * num_timesteps
        if not 0 < t_star <= 1 or abs(level - round(level)) > 1e-6:
            raise ValueError(f"t_star = {t_star}: DiffPure's t* must lie in (0, 1] with t*·{num_timesteps} an integer")
        if variant == "ddpm" and schedule is None:
            raise ValueError("DiffPure's ddpm variant runs the model's own chain: pass its schedule")
        if rand_t and not 0 < t_delta < round(level):
            raise ValueError(f"t_delta = {t_delta} must lie between 0 and t*·N = {round(level)}")
        self.eps_model, self.t_star, self.variant, self.dt = eps_model, float(t_star), variant, float(dt)
        self.time_input, self.rand_t, self.t_delta = time_input, bool(rand_t), int(t_delta)
        self.schedule, self.num_timesteps = schedule, int(num_timesteps)
        self.beta_min, self.beta_max, self.checkpoint = float(beta_min), float(beta_max), bool(checkpoint)
        self.level = int(round(level))

    def network_evaluations(self):
        """Network calls per image per purification."""
        if self.variant == "sde":
            return dp.vpsde_num_steps(self.t_star, self.dt)
        return self.level

    def forward_level(self, generator=None):
        """The forward diffusion level (integer, 1/N units) of one call: t*·N, or with rand_t t*·N + offset."""
        if not self.rand_t:
            return self.level
        offset = int(torch.randint(-self.t_delta, self.t_delta, (1,), generator=generator))
        return self.level + offset

    def __call__(self, x01, generator=None):
        # No torch.no_grad(): attacks backpropagate through the purifier (gradient mode `full`) or replace its
        # backward (`bpda`); evaluation wraps its forwards in no_grad itself.
        x0 = imagespace.to_model_space(x01)
        level = self.forward_level(generator)
        noise = dp.noise_like(x0, generator)
        x_t = dp.vpsde_q_sample(x0, level / self.num_timesteps, noise, self.num_timesteps, self.beta_min,
                                self.beta_max)
        if self.variant == "sde":
            x = dp.reverse_vpsde(self.eps_model, x_t, self.t_star, generator, beta_min=self.beta_min,
                                 beta_max=self.beta_max, num_timesteps=self.num_timesteps, dt=self.dt,
                                 time_input=self.time_input, checkpoint=self.checkpoint)
        else:
            x = dp.full_reverse(self.eps_model, self.schedule, x_t, self.level, generator, clip_denoised=True)
        return imagespace.to_image_space(x)

