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
    noise = dl.noise_like(z, generator)
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


class IFStageIIPure:
    """PDM-Pure as released: DeepFloyd IF stage II's image-to-image super-resolution (diffusers'
    IFImg2ImgSuperResolutionPipeline) from the input's 64 px bicubic (the low-res condition) and the input itself
    at the UNet's resolution, strength 0.1 of 100 steps (timesteps 90 ... 0: 10 steps), guidance 7, noise level 250
    (attacks_rdc_pdm.md §4). The prompt is `prompt_embeds` (T5-XXL's embedding of "a picture", or deepfloyd-if's
    zero_t5 vector; without either, zeros: docs/fidelity.md); the same embedding serves as the negative prompt, so
    guidance leaves the prediction unchanged when they are equal. Stage III (the x4 upscaler) is not run: the output
    is resized back to the input's size. Grayscale inputs are repeated to 3 channels and averaged back."""

    def __init__(self, pipeline, prompt_embeds, *, strength=0.1, num_inference_steps=100, guidance_scale=7.0,
                 noise_level=250, low_res=64):
        self.pipeline, self.prompt_embeds = pipeline, prompt_embeds
        self.strength, self.num_inference_steps = float(strength), int(num_inference_steps)
        self.guidance_scale, self.noise_level, self.low_res = float(guidance_scale), int(noise_level), int(low_res)

    def network_evaluations(self):
        steps = min(int(self.num_inference_steps * self.strength), self.num_inference_steps)
        return steps * (2 if self.guidance_scale > 1 else 1)

    def __call__(self, x01, generator=None):
        from torch.nn import functional as F

        channels, size = x01.shape[1], x01.shape[-1]
        rgb = x01.expand(-1, 3, -1, -1) if channels == 1 else x01
        unet_size = int(self.pipeline.unet.config.sample_size)

        def resized(x, to):
            return x if x.shape[-1] == to else F.interpolate(x, size=(to, to), mode="bicubic", antialias=True,
                                                              align_corners=False).clamp(0, 1)

        embeds = self.prompt_embeds.to(x01.device).expand(len(x01), -1, -1)
        out = self.pipeline(image=imagespace.to_model_space(resized(rgb, self.low_res)),
                            original_image=imagespace.to_model_space(resized(rgb, unet_size)),
                            strength=self.strength, num_inference_steps=self.num_inference_steps,
                            guidance_scale=self.guidance_scale, noise_level=self.noise_level, prompt_embeds=embeds,
                            negative_prompt_embeds=embeds, generator=generator, output_type="pt").images
        out = resized(imagespace.to_image_space(out).clamp(0, 1), size)
        return out.mean(1, keepdim=True) if channels == 1 else out


def load_if_stage2(folder, *, prompt_embeds_file=None, device="cpu"):
    """(diffusers IFImg2ImgSuperResolutionPipeline, prompt embeddings (1, L, D)) from a local IF-II folder (unet/,
    scheduler/, image_noising_scheduler/; no T5, no safety checker, no watermarker), offline. prompt_embeds_file: a
    .npy of shape (L, D) or (1, L, D); None gives zeros (77 tokens) of the UNet's encoder_hid_dim."""
    from pathlib import Path

    import numpy as np
    from diffusers import DDPMScheduler, IFImg2ImgSuperResolutionPipeline, UNet2DConditionModel

    folder = Path(folder)
    missing = [name for name in ("unet", "scheduler", "image_noising_scheduler") if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a DeepFloyd IF stage II folder (missing {', '.join(missing)}/); see "
                                "config/checkpoints.yaml deepfloyd_if_stage2_large for the by-hand download")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).eval().requires_grad_(False)
    pipeline = IFImg2ImgSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        image_noising_scheduler=DDPMScheduler.from_pretrained(folder / "image_noising_scheduler"),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    if prompt_embeds_file:
        embeds = torch.from_numpy(np.load(prompt_embeds_file)).float()
        embeds = embeds[None] if embeds.ndim == 2 else embeds
    else:
        embeds = torch.zeros(1, 77, int(unet.config.encoder_hid_dim))
    return pipeline, embeds
