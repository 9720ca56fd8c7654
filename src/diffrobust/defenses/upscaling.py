"""Noisy Upscaling (Hönig et al., "Adversarial perturbations cannot reliably protect artists from generative AI"), a
baseline purifier of Pixel is a Barrier: Gaussian noise of standard deviation `sigma` on the image, then Stable
Diffusion's x4 upscaler (diffusers' StableDiffusionUpscalePipeline) at `noise_level`, resized back to the input's
size (attacks_rdc_pdm.md §4: sigma 0.1, noise level 320; the step count and guidance are diffusers' defaults, 75 and
9, UNVERIFIED against the authors' code). A purifier: (x01, generator) -> x01."""

from torch.nn import functional as F

from diffrobust.diffusion import noise_like

UPSCALER_FOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")


class NoisyUpscaling:
    """x + sigma·n (clipped), the x4 upscaler with `prompt`, bicubic back to the input size; 1-channel images are
    repeated to RGB and averaged back."""

    def __init__(self, pipeline, *, prompt="", sigma=0.1, noise_level=320, num_inference_steps=75,
                 guidance_scale=9.0):
        self.pipeline, self.prompt, self.sigma = pipeline, prompt, float(sigma)
        self.noise_level, self.num_inference_steps = int(noise_level), int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)

    def network_evaluations(self):
        return self.num_inference_steps * (2 if self.guidance_scale > 1 else 1)

    def __call__(self, x01, generator=None):
        channels, size = x01.shape[1], x01.shape[-2:]
        rgb = x01.expand(-1, 3, -1, -1) if channels == 1 else x01
        noise = noise_like(rgb, generator)
        noisy = (rgb + self.sigma * noise).clamp(0, 1)
        out = self.pipeline(prompt=[self.prompt] * len(x01), image=noisy, noise_level=self.noise_level,
                            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                            generator=generator, output_type="pt").images
        out = F.interpolate(out.to(x01.device), size=size, mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0, 1)
        return out.mean(1, keepdim=True) if channels == 1 else out


def load_sd_upscaler(folder, *, device="cpu"):
    """StableDiffusionUpscalePipeline from a local stabilityai/stable-diffusion-x4-upscaler folder, component by
    component (no safety checker, no watermarker), offline."""
    from pathlib import Path

    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    missing = [name for name in UPSCALER_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a Stable Diffusion x4 upscaler folder (missing {', '.join(missing)}/); "
                                "see config/checkpoints.yaml stable_diffusion_x4_upscaler")
    pipeline = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        low_res_scheduler=DDPMScheduler.from_pretrained(folder / "low_res_scheduler"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"), max_noise_level=350).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
