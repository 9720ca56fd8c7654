"""Latent diffusion models (Stable Diffusion's layout) through diffusers: the networks Pixel-is-a-Barrier attacks.

A latent diffusion model (LDM) is a VAE (`AutoencoderKL`) whose latents a conditional UNet (`UNet2DConditionModel`)
denoises. Both scales use the same layout on disk, a diffusers folder with `vae/`, `unet/` and `scheduler/`
sub-folders (what `StableDiffusionImg2ImgPipeline.save_pretrained` writes), and differ only in the "prompt":

- paper scale: Stable Diffusion v1.x with its CLIP text encoder (`text_encoder/`, `tokenizer/`); every image gets
  one text prompt, as Diff-Protect uses them ("a photo", "a painting", ...).
- mini: a small VAE (1 -> 4x8x8 latents) and UNet trained in the DAG on MNIST digits, whose "prompt" is a learned
  class-embedding table (`class_prompts/`), one row per digit plus a null row (label dropout trained it as "no
  label"), so the attacks and edits run with the null row as Diff-Protect runs with a generic prompt.

`LatentDiffusion` is what attacks, edits and purifiers use: `encode` (the scaled latent, the posterior mean or a
sample), `decode`, `condition`, `eps` and the training loss `denoising_loss` (AdvDM's "semantic loss"). Images at its
boundary are in [0, 1]; the [-1, 1] conversion is `imagespace`'s.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from diffrobust import imagespace
from diffrobust.errors import DiffrobustError
from diffrobust.diffusion import noise_like

SUBFOLDERS = ("vae", "unet", "scheduler")
CLASS_PROMPTS = "class_prompts"
TEXT_PROMPTS = ("text_encoder", "tokenizer")
# Stable Diffusion v1's training schedule (its scheduler_config.json); the mini LDM uses it too.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


class LDMError(DiffrobustError, ValueError):
    """A latent-diffusion folder that cannot be used, with what to do about it."""


class ClassPrompts(nn.Module):
    """The mini LDM's prompt encoder: a learned (num_classes + 1) x tokens x dim table; row num_classes is null."""

    def __init__(self, num_classes, tokens, dim):
        super().__init__()
        self.num_classes, self.tokens, self.dim = int(num_classes), int(tokens), int(dim)
        self.table = nn.Embedding(self.num_classes + 1, self.tokens * self.dim)
        nn.init.normal_(self.table.weight, std=1.0)

    @property
    def null_class(self):
        return self.num_classes

    def forward(self, labels):
        return self.table(labels).view(len(labels), self.tokens, self.dim)

    def config(self):
        return {"num_classes": self.num_classes, "tokens": self.tokens, "dim": self.dim}


class TextPrompts(nn.Module):
    """Stable Diffusion's prompt encoder: CLIP text embeddings of one prompt, computed once and repeated."""

    def __init__(self, text_encoder, tokenizer, prompt):
        super().__init__()
        tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        with torch.no_grad():
            embedding = text_encoder(tokens.input_ids)[0]
        self.prompt = prompt
        self.register_buffer("embedding", embedding)

    def forward(self, labels):
        return self.embedding.expand(len(labels), -1, -1)


class LatentDiffusion(nn.Module):
    """A VAE, a latent UNet, its training schedule and a prompt encoder, behind the calls the attacks need.

    vae: diffusers AutoencoderKL (its config's `scaling_factor` scales latents as SD's 0.18215 does);
    unet: UNet2DConditionModel predicting eps; schedule: a diffusers scheduler (its betas define q);
    prompts: ClassPrompts or TextPrompts. The networks are frozen in eval mode: attacks differentiate through
    them with respect to the image only.
    """

    def __init__(self, vae, unet, scheduler, prompts):
        super().__init__()
        self.vae, self.unet, self.prompts = vae, unet, prompts
        self.scheduler = scheduler
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(torch.float32).clone())
        self.eval().requires_grad_(False)

    @property
    def scaling_factor(self):
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self):
        return len(self.alphas_cumprod)

    @property
    def image_channels(self):
        return int(self.vae.config.in_channels)

    def posterior(self, x01):
        """The VAE's posterior q(z | x) (a DiagonalGaussianDistribution) of [0, 1] images, unscaled."""
        return self.vae.encode(imagespace.to_model_space(x01)).latent_dist

    def encode(self, x01, generator=None):
        """Scaled latents: the posterior mean (generator None) or a sample from it (as img2img does)."""
        posterior = self.posterior(x01)
        z = posterior.mean if generator is None else posterior.sample(generator=generator)
        return z * self.scaling_factor

    def decode(self, z):
        """Scaled latents -> [0, 1] images (clipped, as every pipeline's postprocessing clips)."""
        return imagespace.to_image_space(self.vae.decode(z / self.scaling_factor).sample).clamp(0, 1)

    def condition(self, batch_size, labels=None, device=None):
        """Encoder hidden states for a batch: the given class labels, or the null class / the text prompt."""
        if labels is None:
            fill = self.prompts.null_class if isinstance(self.prompts, ClassPrompts) else 0
            labels = torch.full((batch_size,), fill, dtype=torch.long)
        return self.prompts(labels.to(device or self.alphas_cumprod.device))

    def eps(self, z_t, t, condition):
        """The UNet's eps prediction at integer timestep(s) t (0..T-1)."""
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(len(z_t))
        return self.unet(z_t, t, encoder_hidden_states=condition).sample

    def q_sample(self, z0, t, noise):
        """q(z_t | z_0) at integer timesteps t (a tensor of shape (B,) or a scalar)."""
        a = self.alphas_cumprod.to(z0.device)[torch.as_tensor(t, device=z0.device)]
        a = a.reshape(-1, *([1] * (z0.ndim - 1))) if a.ndim else a
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def denoising_loss(self, z0, condition, generator, t=None):
        """Per-image mean squared eps error at t ~ U{0..T-1} with one noise draw: LDM training's L_simple, which
        AdvDM maximises as its "semantic loss". Returns (loss per image, t, noise)."""
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
        noise = noise_like(z0, generator)
        eps = self.eps(self.q_sample(z0, t, noise), t, condition)
        return (eps - noise).pow(2).flatten(1).mean(1), t, noise


# ---------------------------------------------------------------------------------------------------------------
# Building, saving and loading
# ---------------------------------------------------------------------------------------------------------------

def build_mini_ldm(config):
    """Untrained mini LDM from a config dict: {"image_channels", "image_size", "latent_channels", "vae_channels",
    "unet_channels", "cross_attention_levels", "num_classes", "prompt_tokens", "cross_attention_dim",
    "norm_num_groups", "attention_head_dim"}.

    The VAE halves the resolution once per block after the first (3 blocks: 32 -> 8). The UNet's levels listed in
    `cross_attention_levels` (default: the last, lowest-resolution one; the mid block always has it) carry
    (self- and cross-) attention, the others are plain ResNet levels: at the 8x8 level attention cost half of
    every UNet call (64 tokens) for a 1-token prompt.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    vae_channels, unet_channels = tuple(config["vae_channels"]), tuple(config["unet_channels"])
    groups = int(config.get("norm_num_groups", 16))
    vae = AutoencoderKL(
        in_channels=config["image_channels"], out_channels=config["image_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=vae_channels,
        layers_per_block=1, latent_channels=config["latent_channels"], norm_num_groups=groups,
        sample_size=config["image_size"], mid_block_add_attention=False, scaling_factor=1.0)
    latent_size = config["image_size"] // 2 ** (len(vae_channels) - 1)
    attention = set(config.get("cross_attention_levels", [len(unet_channels) - 1]))
    down = tuple("CrossAttnDownBlock2D" if level in attention else "DownBlock2D" for level in range(len(unet_channels)))
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=config["latent_channels"], out_channels=config["latent_channels"],
        down_block_types=down, up_block_types=up,
        block_out_channels=unet_channels, layers_per_block=1, cross_attention_dim=config["cross_attention_dim"],
        norm_num_groups=groups, attention_head_dim=int(config.get("attention_head_dim", 8)))
    prompts = ClassPrompts(config["num_classes"], config.get("prompt_tokens", 1), config["cross_attention_dim"])
    return LatentDiffusion(vae, unet, DDIMScheduler(**SD_SCHEDULE), prompts)


def save_ldm(folder, ldm, extra=None):
    """Write `ldm` as a diffusers folder (vae/, unet/, scheduler/, class_prompts/ or the text encoder), atomically:
    everything goes to a temporary folder next to `folder`, renamed into place at the end."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        ldm.vae.save_pretrained(temp / "vae")
        ldm.unet.save_pretrained(temp / "unet")
        ldm.scheduler.save_pretrained(temp / "scheduler")
        if isinstance(ldm.prompts, ClassPrompts):
            (temp / CLASS_PROMPTS).mkdir()
            (temp / CLASS_PROMPTS / "config.json").write_text(json.dumps(ldm.prompts.config(), indent=2))
            save_file({"table": ldm.prompts.table.weight.detach().cpu().contiguous()},
                      temp / CLASS_PROMPTS / "table.safetensors")
        else:
            raise LDMError("save_ldm writes the mini LDM; a text-prompt LDM is read from its own diffusers folder")
        (temp / "diffrobust.json").write_text(json.dumps({"kind": "latent_diffusion", "extra": extra or {}},
                                                          indent=2, sort_keys=True, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        temp.rename(folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _missing(folder, names):
    return [name for name in names if not (Path(folder) / name).is_dir()]


def load_ldm(folder, *, prompt=None, device="cpu", dtype=torch.float32):
    """Read a diffusers LDM folder (the mini LDM the DAG trains, or Stable Diffusion's) -> LatentDiffusion.

    prompt: the text prompt of a text-conditioned model (required there, refused for a class-prompt model).
    Offline only: nothing is fetched. The scheduler is read as the training schedule (SD ships a PNDM config;
    only its betas matter here: edits build their own DDIM scheduler from the same config).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    missing = _missing(folder, SUBFOLDERS)
    if missing:
        raise LDMError(f"{folder}: not a latent-diffusion folder (missing {', '.join(missing)}/); for Stable Diffusion "
                       "put the diffusers layout there (see config/checkpoints.yaml), for mini run the DAG's "
                       "train_ldm job")
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    if (folder / CLASS_PROMPTS).is_dir():
        if prompt is not None:
            raise LDMError(f"{folder}: a class-prompt LDM takes no text prompt (got {prompt!r})")
        from safetensors.torch import load_file

        config = json.loads((folder / CLASS_PROMPTS / "config.json").read_text())
        prompts = ClassPrompts(**config)
        prompts.table.weight.data.copy_(load_file(folder / CLASS_PROMPTS / "table.safetensors")["table"])
    else:
        missing = _missing(folder, TEXT_PROMPTS)
        if missing:
            raise LDMError(f"{folder}: no class_prompts/ and no {', '.join(missing)}/: a text-conditioned LDM needs "
                           "its CLIP text encoder and tokenizer (see config/checkpoints.yaml)")
        if prompt is None:
            raise LDMError(f"{folder}: a text-conditioned LDM needs a prompt (config pixel_barrier.ldm.prompt)")
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        prompts = TextPrompts(text_encoder, tokenizer, prompt)
    return LatentDiffusion(vae, unet, scheduler, prompts).to(device)


def read_extra(folder):
    """The `extra` dict save_ldm recorded (training settings, digests); {} for folders from elsewhere."""
    record = Path(folder) / "diffrobust.json"
    return json.loads(record.read_text())["extra"] if record.is_file() else {}
