"""SDEdit (Meng et al.): noise an image part of the way, then denoise it — the edit Pixel-is-a-Barrier evaluates, and
the purifiers built from it (PDM-Pure with a pixel model, LDM-Pure with the latent one).

Latent SDEdit follows diffusers' `StableDiffusionImg2ImgPipeline` exactly (tested against it): a DDIM scheduler built
from the model's own schedule config (SD's steps_offset 1), `num_inference_steps` = 100, strength s keeps the last
int(100·s) steps (s = 0.3: timesteps 291, 281, ..., 1), the latent is a posterior *sample* noised to the first kept
timestep, eta = 0, no classifier-free guidance (Diff-Protect's SDEdit uses none). Diff-Protect's own loop noises to
the next grid point (301 for s = 0.3) before starting at 291: docs/fidelity.md.

Pixel SDEdit runs the project's pixel diffusion chain: DDIM over the same 100-point grid restricted to [0, s·T]
(`diffusion.ddim_reverse`), or DDPM ancestral steps (`respaced_reverse`), which is what DeepFloyd IF's stage II runs
inside PDM-Pure.
"""

import torch

from diffrobust import diffusion as dl
from diffrobust import imagespace

PDM_PURE_VARIANTS = ("paper", "released")
SAMPLERS = ("ddim", "ddpm")


def latent_timesteps(scheduler_config, strength, num_inference_steps):
    """(DDIM scheduler, the timesteps img2img runs for `strength`): the last int(steps·strength) of the grid."""
    from diffusers import DDIMScheduler

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"SDEdit strength must lie in [0, 1], got {strength}")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    return scheduler, scheduler.timesteps[num_inference_steps - kept:]


@torch.no_grad()
def ldm_sdedit(ldm, x01, strength, *, num_inference_steps=100, eta=0.0, generator=None, labels=None):
    """SDEdit of [0, 1] images with a LatentDiffusion, as img2img does it (see the module docstring)."""
    scheduler, timesteps = latent_timesteps(ldm.scheduler.config, strength, num_inference_steps)
    z = ldm.encode(x01, generator=generator)
    if len(timesteps) == 0:
        return ldm.decode(z)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    z = scheduler.add_noise(z, noise, timesteps[:1])
    condition = ldm.condition(len(x01), labels, device=z.device)
    for t in timesteps:
        eps = ldm.eps(z, t, condition)
        z = scheduler.step(eps, t, z, eta=eta, generator=generator).prev_sample
    return ldm.decode(z)


@torch.no_grad()
def pixel_sdedit(eps_model, schedule, x01, strength, *, num_inference_steps=100, sampler="ddim", generator=None,
                 noise_time=None, times=None):
    """SDEdit of [0, 1] images with a pixel diffusion model (an eps model on the chain `schedule`).

    strength s: start at time s·T and take round(s·num_inference_steps) steps down to 0 (DDIM, eta 0, or DDPM
    ancestral). noise_time / times: the released PDM-Pure's schedule, where the image is noised to a lower level
    than the chain starts from (see `PDMPure`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    big_t = schedule.num_levels
    t = round(strength * big_t) if times is None else times[0]
    x0 = imagespace.to_model_space(x01)
    if t == 0:
        return x01
    noise = dl.noise_like(x0, generator)
    x = schedule.q_sample(x0, t if noise_time is None else noise_time, noise)
    if times is not None:
        chain = schedule.respace(times)
        for level in range(chain.num_levels, 0, -1):
            x = chain.p_sample(eps_model, x, level, generator=generator)["sample"]
    else:
        steps = max(1, round(strength * num_inference_steps))
        if sampler == "ddim":
            x = dl.ddim_reverse(eps_model, schedule, x, t, steps, eta=0.0)
        else:
            x = dl.respaced_reverse(eps_model, schedule, x, t, steps, generator=generator)
    return imagespace.to_image_space(x).clamp(0, 1)


def released_pdm_pure_times(num_timesteps=1000):
    """The released pdm_pure.py's chain: IF stage II respaced "10,0,0,0,0,0,0,0,0,0" over 1000 steps keeps
    official timesteps 0, 11, ..., 99 (times 1, 12, ..., 100 here, whose network timestep is time - 1), and
    `support_noise_less_qsample_steps 5` noises the image at official timestep 44 (time 45) while the loop starts at
    99 (attacks_rdc_pdm.md §4). Returns (times of the chain, noise time)."""
    scale = num_timesteps / 1000
    official = [0 + 11 * i for i in range(10)]
    times = [round((k + 1) * scale) for k in reversed(official)] + [0]
    return times, round(45 * scale)


class PDMPure:
    """PDM-Pure: SDEdit with a pixel diffusion model as an off-the-shelf purifier (a purifier: x01 -> x01).

    variant "paper": noise to t* = 0.1·T and denoise in `num_steps` = 10 steps (the paper's description: respaced to
    100 steps, 10 denoising steps), with `sampler` ddpm (IF's) or ddim. variant "released": the schedule the
    released code runs (`released_pdm_pure_times`).
    """

    def __init__(self, eps_model, schedule, *, t_star=0.1, num_steps=10, sampler="ddpm", variant="paper"):
        if variant not in PDM_PURE_VARIANTS:
            raise ValueError(f"PDM-Pure variant must be one of {PDM_PURE_VARIANTS}, got {variant!r}")
        self.eps_model, self.schedule = eps_model, schedule
        self.t_star, self.num_steps, self.sampler, self.variant = float(t_star), int(num_steps), sampler, variant

    def network_evaluations(self):
        return 10 if self.variant == "released" else self.num_steps

    def __call__(self, x01, generator=None):
        if self.variant == "released":
            times, noise_time = released_pdm_pure_times(self.schedule.num_levels)
            return pixel_sdedit(self.eps_model, self.schedule, x01, None, generator=generator, times=times,
                                noise_time=noise_time)
        return pixel_sdedit(self.eps_model, self.schedule, x01, self.t_star,
                            num_inference_steps=round(self.num_steps / self.t_star), sampler=self.sampler,
                            generator=generator)


class LDMPure:
    """LDM-Pure: the same SDEdit with the latent diffusion model (the paper shows it does not purify)."""

    def __init__(self, ldm, *, strength=0.1, num_inference_steps=100):
        self.ldm, self.strength, self.num_inference_steps = ldm, float(strength), int(num_inference_steps)

    def network_evaluations(self):
        return int(self.num_inference_steps * self.strength)

    def __call__(self, x01, generator=None):
        return ldm_sdedit(self.ldm, x01, self.strength, num_inference_steps=self.num_inference_steps,
                          generator=generator)


def tile_starts(size, tile, stride):
    """Top-left offsets of tiles of `tile` pixels every `stride` pixels covering [0, size) (the last tile flush with
    the edge)."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


class GrIDPure:
    """GrIDPure (Zhao et al., CVPR'24; Pixel is a Barrier's strongest baseline): the pixel model's SDEdit on
    overlapping `tile_size` tiles every `stride` pixels at a small t (`t_star`·T, DiffPure-like ancestral steps),
    overlaps averaged, repeated `passes` times, each pass's result blended with the input as
    x ← (1 − γ)·purified + γ·x_input (attacks_rdc_pdm.md §4: tiles 256, stride 128, t = 10/1000, 20 passes, γ 0.1;
    the blend's exact form is UNVERIFIED: docs/fidelity.md)."""

    def __init__(self, eps_model, schedule, *, tile_size=256, stride=128, t_star=0.01, passes=20, gamma=0.1,
                 num_steps=None):
        self.eps_model, self.schedule = eps_model, schedule
        self.tile_size, self.stride, self.t_star = int(tile_size), int(stride), float(t_star)
        self.passes, self.gamma = int(passes), float(gamma)
        self.num_steps = int(num_steps) if num_steps else max(1, round(t_star * schedule.num_levels))

    def network_evaluations(self, image_size):
        tiles = len(tile_starts(image_size, self.tile_size, self.stride)) ** 2
        return self.passes * tiles * self.num_steps

    def purify_once(self, x01, generator):
        size = x01.shape[-1]
        starts = tile_starts(size, self.tile_size, self.stride)
        total, count = torch.zeros_like(x01), torch.zeros_like(x01)
        tile = min(self.tile_size, size)
        for top in starts:
            for left in starts:
                window = (..., slice(top, top + tile), slice(left, left + tile))
                total[window] += pixel_sdedit(self.eps_model, self.schedule, x01[window], self.t_star,
                                              num_inference_steps=round(self.num_steps / self.t_star),
                                              sampler="ddpm", generator=generator)
                count[window] += 1
        return total / count

    def __call__(self, x01, generator=None):
        x = x01
        for _ in range(self.passes):
            x = (1 - self.gamma) * self.purify_once(x, generator) + self.gamma * x01
        return x.clamp(0, 1)
