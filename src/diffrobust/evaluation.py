"""Quality measures of trained models, as `notebooks/models_report` shows them: accuracy, PSNR, one-shot denoising
against the noise level, the classifier behind denoised smoothing noise, the eps error at the top of the chain and
the multi-head model's agreement with its teacher.

Every function returns plain numbers or lists of row dicts (the notebook makes the tables). Images are [0, 1]
tensors (N x C x H x W) on any device; the networks run where their inputs are, every random draw comes from a CPU
generator seeded as documented and is moved there (a seed means the same draws on every device), and results come
back on the CPU.
"""

import csv
import math
from pathlib import Path

import torch

from diffrobust import diffusion as dp
from diffrobust import imagespace, quality
from diffrobust.defenses import SmoothingDenoiser


def _normal(shape, seed, like):
    """Standard normal draws of `shape` from a CPU generator seeded `seed`, moved to `like`'s device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


# --- classifiers ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(classify, images01, batch_size=250):
    """Top-1 labels (CPU, int64) of a [0, 1] -> logits classifier, in batches of `batch_size` (None: one batch)."""
    chunks = [images01] if batch_size is None else images01.split(batch_size)
    return torch.cat([classify(chunk).argmax(1).cpu() for chunk in chunks])


def accuracy(classify, images01, labels, batch_size=250):
    """Fraction of `images01` whose predicted label equals `labels` (a tensor or array, any device)."""
    labels = torch.as_tensor(labels).cpu()
    if len(labels) != len(images01):
        raise ValueError(f"{len(images01)} images but {len(labels)} labels")
    return (predict(classify, images01, batch_size) == labels).float().mean().item()


# --- image quality -------------------------------------------------------------------------------------------------

def psnr(images, references, peak=1.0, min_mse=1e-10):
    """Mean over images of the per-image PSNR in dB (`quality.psnr`; the mean of the dB values, not the PSNR of the
    mean MSE); an MSE below `min_mse` counts as `min_mse` (identical images: 100 dB at peak 1, not inf)."""
    return quality.psnr(images, references, peak).clamp_max(10 * math.log10(peak ** 2 / min_mse)).mean().item()


def top_rows_mean(images01, rows=3):
    """Mean of the top `rows` pixel rows of every image: the background level (MNIST's is black)."""
    return images01[..., :rows, :].mean().item()


# --- diffusion models ----------------------------------------------------------------------------------------------

def smoothing_sigma(schedule, t):
    """The smoothing noise, on the [0, 1] scale, that time t of the chain corresponds to: sqrt(1 - a)/(2 sqrt(a))
    with a = alpha_bar(t) (the inverse of DensePure's a = 1/(1 + 4 sigma²))."""
    a = schedule.alpha_bar(t)
    return ((1 - a) / a) ** 0.5 / 2


def _model_timesteps(schedule, t, like):
    return torch.full((len(like),), float(schedule.time_to_model_timestep(t)), device=like.device)


@torch.no_grad()
def eps_error_rms(eps, schedule, images01, t, seed):
    """Root mean square, over every pixel of every image, of eps(x_t, t) - noise, where x_t = q_sample(x, t, noise)
    and the noise is drawn from a CPU generator seeded `seed` (unconditional `eps(x_t, t_model)`)."""
    x_model = imagespace.to_model_space(images01)
    noise = _normal(x_model.shape, seed, x_model)
    x_t = schedule.q_sample(x_model, t, noise)
    return (eps(x_t, _model_timesteps(schedule, t, x_t)) - noise).pow(2).mean().sqrt().item()


def denoising_times(schedule, fractions):
    """Times max(1, round(f·T)) for fractions f of the chain's T levels."""
    return [max(1, round(fraction * schedule.num_levels)) for fraction in fractions]


@torch.no_grad()
def denoising_quality(eps, schedule, images01, fractions, seed):
    """Carlini et al.'s one-shot denoiser against the noise level: one row per time t = `denoising_times`.

    x_t = q_sample(x, t, noise) with noise from a CPU generator seeded seed + t; each row has t, the smoothing sigma
    of t (`smoothing_sigma`), the PSNR of the one-shot prediction of x from x_t, and the PSNR of the noisy input
    itself, x_t / sqrt(alpha_bar) mapped back to [0, 1] and clipped (dB, `psnr`)."""
    x_model = imagespace.to_model_space(images01)
    rows = []
    for t in denoising_times(schedule, fractions):
        x_t = schedule.q_sample(x_model, t, _normal(x_model.shape, seed + t, x_model))
        x0 = dp.one_shot_denoise(eps, schedule, x_t, t)
        a = schedule.alpha_bar(t)
        rows.append({"t": t, "sigma": smoothing_sigma(schedule, t),
                     "PSNR denoised (dB)": psnr(imagespace.to_image_space(x0), images01),
                     "PSNR noisy (dB)": psnr(imagespace.to_image_space(x_t / a ** 0.5).clamp(0, 1), images01)})
    return rows


@torch.no_grad()
def smoothing_accuracies(classify, eps, schedule, images01, labels, sigmas, seed, tstar_rule="first_at_least",
                         batch_size=250):
    """The base classifier's accuracy on clean images, on x + sigma·noise (clipped to [0, 1]) and on its one-shot
    DDS denoising (`SmoothingDenoiser`, t* by `tstar_rule`): one row {"sigma", "input", "accuracy", "t_star"} for
    the clean images (sigma 0), then a noisy and a denoised row per sigma. The noise is one draw per image from a
    CPU generator seeded seed + 1, the same draw for every sigma."""
    rows = [{"sigma": 0.0, "input": "clean", "accuracy": accuracy(classify, images01, labels, batch_size),
             "t_star": None}]
    for sigma in sigmas:
        noisy = images01 + sigma * _normal(images01.shape, seed + 1, images01)
        denoiser = SmoothingDenoiser(eps, schedule, sigma, tstar_rule=tstar_rule)
        chunks = [noisy] if batch_size is None else noisy.split(batch_size)
        denoised = torch.cat([denoiser(chunk) for chunk in chunks])
        rows.append({"sigma": sigma, "input": "noisy", "t_star": None,
                     "accuracy": accuracy(classify, noisy.clamp(0, 1), labels, batch_size)})
        rows.append({"sigma": sigma, "input": "one-shot denoised", "t_star": denoiser.t_star,
                     "accuracy": accuracy(classify, denoised, labels, batch_size)})
    return rows


@torch.no_grad()
def multihead_agreement(heads_eps, conditional_eps, schedule, images01, fractions, seed=0):
    """How closely a multi-head model's heads match the conditional model it was distilled from: one row per time
    t = round(f·T) with the mean squared difference of the predicted noise over every class, pixel and image, and
    the conditional prediction's mean square for scale. heads_eps and conditional_eps map (x_t, t_model) to every
    class's eps, [N, K, C_out, H, W] (`models.all_class_eps`); only the first C (eps) channels are compared. x_t is
    q_sample(x, t, noise) with noise from a CPU generator seeded seed + t."""
    x_model = imagespace.to_model_space(images01)
    channels = x_model.shape[1]
    rows = []
    for fraction in fractions:
        t = round(fraction * schedule.num_levels)
        x_t = schedule.q_sample(x_model, t, _normal(x_model.shape, seed + t, x_model))
        t_model = _model_timesteps(schedule, t, x_t)
        heads = heads_eps(x_t, t_model)[:, :, :channels]
        conditional = conditional_eps(x_t, t_model)[:, :, :channels]
        rows.append({"t": t, "MSE(multi-head, conditional)": ((heads - conditional) ** 2).mean().item(),
                     "MSE(conditional, 0) for scale": (conditional ** 2).mean().item()})
    return rows


# --- training logs -------------------------------------------------------------------------------------------------

def loss_log_summary(path):
    """{"steps", "final_loss", "seconds"} of a training job's loss.tsv (`training.LossLog`): the last logged step,
    the mean loss of the last logged interval and the cumulative training seconds."""
    with open(Path(path), newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no logged steps")
    last = rows[-1]
    return {"steps": int(last["step"]), "final_loss": float(last["loss"]), "seconds": float(last["seconds"])}


def network_parameters(network):
    """Number of parameters of a network (every tensor, trainable or not)."""
    return sum(parameter.numel() for parameter in network.parameters())


__all__ = ["predict", "accuracy", "psnr", "top_rows_mean", "smoothing_sigma", "eps_error_rms", "denoising_times",
           "denoising_quality", "smoothing_accuracies", "multihead_agreement", "loss_log_summary",
           "network_parameters"]
