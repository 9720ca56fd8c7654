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
from torch.nn import functional as F

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


# The released PDM-Pure (xavihart/PDM-Pure pdm_pure.py through deepfloyd_if's style_transfer and IFStageII): IF's
# respacing "10,0,...,0" of 1000 steps keeps timesteps 0, 11, ..., 99; support_noise_less_qsample_steps 5 noises the
# support image at the kept index 10 - 1 - 5 = 4 (timestep 44) while the loop runs 99, 88, ..., 0.
RELEASED_IF_RESPACING = (10, 0, 0, 0, 0, 0, 0, 0, 0, 0)
RELEASED_IF_NOISE_LESS_STEPS = 5
IF_SCHEDULES = ("released", "diffusers")
# The unconditional embedding of IF (deepfloyd_if/resources, registry deepfloyd_if_stage2_large): T5-XXL of "".
IF_UNCONDITIONAL_EMBEDS_FILE = "zero_t5-v1_1-xxl_vector.npy"


def respaced_timesteps(num_timesteps, section_counts):
    """The timesteps guided-diffusion's (and deepfloyd_if's) `space_timesteps` keeps, ascending: the chain split into
    len(section_counts) sections, each keeping its count evenly spaced (rounded) from its first to its last step."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * k) for k in range(count)]
        start += size
    return sorted(set(kept))


def if_stage2_schedule(name, scheduler, *, strength=0.1, num_inference_steps=100):
    """(noise timestep, descending loop timesteps, conditional rows, low-res noise redrawn at every UNet call) of an
    IF stage II purification schedule.

    "released": pdm_pure.py's (noise at 44, loop 99, 88, ..., 0; IF's style_transfer passes the prompt both as the
    prompt and as the positive prompt, mixer 0.5, so each step averages two conditional rows; IF's SuperResUNetModel
    q-samples the upscaled low-res image with fresh noise in every call and every row). "diffusers":
    IFImg2ImgSuperResolutionPipeline's img2img (the last int(strength * num_inference_steps) of its grid, noise at
    the first: 90, 80, ..., 0 for 0.1 of 100; the paper's described t* = 0.1, 10 steps; one low-res draw)."""
    if name == "released":
        kept = respaced_timesteps(scheduler.config.num_train_timesteps, RELEASED_IF_RESPACING)
        return kept[len(kept) - 1 - RELEASED_IF_NOISE_LESS_STEPS], kept[::-1], 2, True
    if name == "diffusers":
        scheduler.set_timesteps(num_inference_steps)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        timesteps = [int(t) for t in scheduler.timesteps[num_inference_steps - kept:]]
        return timesteps[0], timesteps, 1, False
    raise ValueError(f"IF stage II schedule must be one of {IF_SCHEDULES}, got {name!r}")


def if_guided_prediction(unet, x, t, upscaled_rows, prompt_embeds, negative_prompt_embeds, noise_level,
                         guidance_scale, conditional_rows=1):
    """IF's classifier-free guided output (eps and the learned variance channels) for x at t: one UNet batch of
    `conditional_rows` copies with the prompt and one with the negative (unconditional) embedding, each row with its
    own noised upscaled low-res image (upscaled_rows: (rows * n, 3, H, W)); eps = uncond + g * (mean cond - uncond),
    the variance of the first conditional row (as IF and diffusers take it)."""
    n, rows = len(x), conditional_rows + 1
    embeds = torch.cat([prompt_embeds] * conditional_rows + [negative_prompt_embeds]).to(x.device, x.dtype)
    levels = torch.full((rows * n,), int(noise_level), device=x.device)
    out = unet(torch.cat([torch.cat([x] * rows), upscaled_rows], dim=1), t, encoder_hidden_states=embeds,
               class_labels=levels, return_dict=False)[0]
    eps, variance = out[:, :x.shape[1]], out[:n, x.shape[1]:]
    chunks = eps.chunk(rows)
    conditional = sum(chunks[:-1]) / conditional_rows
    return torch.cat([chunks[-1] + guidance_scale * (conditional - chunks[-1]), variance], dim=1)


@torch.no_grad()
def if_stage2_purify(pipeline, low_res, original, prompt_embeds, negative_prompt_embeds, *, schedule="released",
                     strength=0.1, num_inference_steps=100, guidance_scale=7.0, noise_level=250, generator=None):
    """IF stage II image-to-image super-resolution of `original` ([-1, 1], the UNet's size) conditioned on `low_res`
    ([-1, 1]) with the schedule `schedule` (`if_stage2_schedule`): the pipeline's UNet and schedulers, our loop (the
    diffusers pipeline fixes the noise timestep to its first step and draws the low-res noise once)."""
    scheduler, noising = pipeline.scheduler, pipeline.image_noising_scheduler
    noise_t, timesteps, conditional_rows, redraw = if_stage2_schedule(
        schedule, scheduler, strength=strength, num_inference_steps=num_inference_steps)
    scheduler.set_timesteps(timesteps=timesteps)
    n, rows = len(original), conditional_rows + 1
    x = scheduler.add_noise(original, dl.noise_like(original, generator), torch.tensor([noise_t] * n))
    upscaled = F.interpolate(low_res, original.shape[-2:], mode="bilinear", align_corners=True)
    levels = torch.tensor([int(noise_level)] * n * rows)

    def noised_low_res(batch):
        return noising.add_noise(batch, dl.noise_like(batch, generator), levels[:len(batch)])

    fixed = None if redraw else noised_low_res(upscaled).repeat(rows, 1, 1, 1)
    prompt_embeds = prompt_embeds.expand(n, -1, -1)
    negative_prompt_embeds = negative_prompt_embeds.expand(n, -1, -1)
    for t in scheduler.timesteps:
        upscaled_rows = noised_low_res(upscaled.repeat(rows, 1, 1, 1)) if redraw else fixed
        output = if_guided_prediction(pipeline.unet, x, t, upscaled_rows, prompt_embeds, negative_prompt_embeds,
                                      noise_level, guidance_scale, conditional_rows)
        x = scheduler.step(output, t, x, generator=generator, return_dict=False)[0]
    return x


class IFStageIIPure:
    """PDM-Pure as released: DeepFloyd IF stage II's image-to-image super-resolution from the input's 64 px bicubic
    (the low-res condition) and the input itself at the UNet's resolution, guidance 7 with T5-XXL's "a picture" as
    the prompt and IF's zero_t5 vector as the unconditional embedding, low-res noise level 250, the schedule
    `schedule` (`if_stage2_schedule`: "released" by default; "diffusers" keeps strength / num_inference_steps)
    (attacks_rdc_pdm.md §4). Stage III (the x4 upscaler) is not run: the output is resized back to the input's size.
    Grayscale inputs are repeated to 3 channels and averaged back."""

    def __init__(self, pipeline, prompt_embeds, negative_prompt_embeds, *, schedule="released", strength=0.1,
                 num_inference_steps=100, guidance_scale=7.0, noise_level=250, low_res=64):
        if schedule not in IF_SCHEDULES:
            raise ValueError(f"IF stage II schedule must be one of {IF_SCHEDULES}, got {schedule!r}")
        self.pipeline, self.prompt_embeds, self.negative_prompt_embeds = pipeline, prompt_embeds, negative_prompt_embeds
        self.schedule, self.strength, self.num_inference_steps = schedule, float(strength), int(num_inference_steps)
        self.guidance_scale, self.noise_level, self.low_res = float(guidance_scale), int(noise_level), int(low_res)

    def network_evaluations(self):
        _, timesteps, conditional_rows, _ = if_stage2_schedule(
            self.schedule, self.pipeline.scheduler, strength=self.strength,
            num_inference_steps=self.num_inference_steps)
        return len(timesteps) * (conditional_rows + 1)

    def __call__(self, x01, generator=None):
        channels, size = x01.shape[1], x01.shape[-1]
        rgb = x01.expand(-1, 3, -1, -1) if channels == 1 else x01
        unet_size = int(self.pipeline.unet.config.sample_size)

        def resized(x, to):
            return x if x.shape[-1] == to else F.interpolate(x, size=(to, to), mode="bicubic", antialias=True,
                                                              align_corners=False).clamp(0, 1)

        out = if_stage2_purify(
            self.pipeline, imagespace.to_model_space(resized(rgb, self.low_res)),
            imagespace.to_model_space(resized(rgb, unet_size)), self.prompt_embeds.to(x01.device),
            self.negative_prompt_embeds.to(x01.device), schedule=self.schedule, strength=self.strength,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            noise_level=self.noise_level, generator=generator)
        out = resized(imagespace.to_image_space(out).clamp(0, 1), size)
        return out.mean(1, keepdim=True) if channels == 1 else out


def load_embeds_file(path, width, what):
    """A (1, L, width) float32 embedding from a .npy of shape (L, width) or (1, L, width); one clear error otherwise."""
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} is missing")
    embeds = torch.from_numpy(np.load(path).astype(np.float32))
    embeds = embeds[None] if embeds.ndim == 2 else embeds
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != width:
        raise ValueError(f"{path}: {what} has shape {tuple(embeds.shape)}; expected (L, {width}) (the UNet's "
                         "encoder_hid_dim)")
    return embeds


def load_if_stage2(folder, *, prompt_embeds_file="t5_xxl_a_picture.npy", device="cpu"):
    """(diffusers IFImg2ImgSuperResolutionPipeline, prompt embedding (1, L, D), unconditional embedding (1, L, D))
    from a local IF-II folder (unet/, scheduler/, image_noising_scheduler/, IF's zero_t5 vector; no T5, no safety
    checker, no watermarker), offline. prompt_embeds_file: T5-XXL's embedding of the prompt, a .npy of shape (L, D)
    or (1, L, D), relative to the folder (registry deepfloyd_if_stage2_large: made by hand, see its `manual`)."""
    from pathlib import Path

    from diffusers import DDPMScheduler, IFImg2ImgSuperResolutionPipeline, UNet2DConditionModel

    folder = Path(folder)
    missing = [name for name in ("unet", "scheduler", "image_noising_scheduler") if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a DeepFloyd IF stage II folder (missing {', '.join(missing)}/); see "
                                "config/checkpoints.yaml deepfloyd_if_stage2_large for the by-hand download")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).eval().requires_grad_(False)
    width = int(unet.config.encoder_hid_dim)
    fix = "see config/checkpoints.yaml deepfloyd_if_stage2_large (its `manual` says how to make or fetch it)"
    prompt_embeds = load_embeds_file(
        folder / prompt_embeds_file, width,
        f"the prompt's T5-XXL embedding (config key pixel_barrier.purifiers.pdm_pure_if.prompt_embeds_file); {fix}")
    negative_prompt_embeds = load_embeds_file(folder / IF_UNCONDITIONAL_EMBEDS_FILE, width,
                                              f"IF's unconditional (zero_t5) embedding; {fix}")
    pipeline = IFImg2ImgSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        image_noising_scheduler=DDPMScheduler.from_pretrained(folder / "image_noising_scheduler"),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, prompt_embeds.to(device), negative_prompt_embeds.to(device)
