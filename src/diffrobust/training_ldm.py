"""Training the mini latent diffusion model inside the DAG: first the VAE, then the latent UNet with its class prompts.

Both loops are `training.run_training` (resumable, seeded per step, loss log). The VAE minimises the pixel MSE of its
reconstruction (in [-1, 1]) plus `kl_weight` times the KL to N(0, I) per latent element (Stable Diffusion's
autoencoder adds a perceptual and an adversarial term; on 32x32 digits plain MSE reconstructs well: the report's
models section shows the reconstructions). The latent scale is then set as SD's 0.18215 was: 1 / std of the
training latents. The UNet learns eps on those latents under SD's scaled-linear schedule, with label dropout to
the null class (the "generic prompt" of the attacks and edits).
"""

import logging

import torch

from diffrobust import imagespace, training
from diffrobust.diffusion import noise_like
from diffrobust.io import atomic_write_text
from diffrobust.networks import ldm as ldm_lib

log = logging.getLogger(__name__)


def _train_split(dataset_dir):
    from diffrobust.data import load_dataset

    return load_dataset(dataset_dir)["train"]


def vae_loss(vae, x01, generator, kl_weight):
    """Reconstruction MSE (in [-1, 1]) of a posterior sample + kl_weight · KL per latent element."""
    x = imagespace.to_model_space(x01)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    reconstruction = vae.decode(z).sample
    kl = posterior.kl().mean() / z[0].numel()
    return (reconstruction - x).pow(2).mean() + kl_weight * kl


def latent_statistics(ldm, x01, batch_size=256):
    """Posterior means and standard deviations of all training images (unscaled), computed once without gradients."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(x01), batch_size):
            posterior = ldm.posterior(x01[start:start + batch_size])
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def unet_loss(ldm, latent_mean, latent_std, labels, generator, label_dropout):
    """eps MSE of the UNet on a sampled, scaled latent at t ~ U{0..T-1}, labels dropped to the null class."""
    z = latent_mean + latent_std * noise_like(latent_mean, generator)
    z = z * ldm.scaling_factor
    labels = training.drop_labels(labels, label_dropout, ldm.prompts.null_class, generator)
    condition = ldm.prompts(labels)
    loss, _, _ = ldm.denoising_loss(z, condition, generator)
    return loss.mean()


MODEL_FOLDER = "model"
LOSS_FILE = "loss.tsv"


def train_mini_ldm(dataset_dir, out_dir, *, architecture, vae_training, unet_training, seed, device="cpu"):
    """Train the mini LDM and write it as a diffusers folder at out_dir/model, the losses of both stages at
    out_dir/loss.tsv (see the module docstring). Resume files live in out_dir/vae_training and out_dir/unet_training.

    architecture: `networks.ldm.build_mini_ldm`'s config. vae_training / unet_training: {steps, batch_size, lr,
    checkpoint_every, log_every} (+ kl_weight for the VAE, label_dropout and ema_decay for the UNet).
    Returns {"vae": TrainingResult, "unet": TrainingResult, "scaling_factor": float}.
    """
    from pathlib import Path

    out_dir = Path(out_dir)
    torch.manual_seed(training.derived_seed(seed, 0, "init"))
    ldm = ldm_lib.build_mini_ldm({**architecture, "num_classes": architecture.get("num_classes", 10)})
    ldm = ldm.to(device)
    split = _train_split(dataset_dir)
    config = {"architecture": architecture, "seed": seed, "dataset": training._dataset_fingerprint(dataset_dir)}

    vae = ldm.vae.train().requires_grad_(True)
    vae_stream = training.BatchStream(split.images, split.labels, vae_training["batch_size"], seed, device)

    def vae_step(step, generator):
        x, _ = vae_stream.batch(step)
        return vae_loss(vae, x, generator, vae_training["kl_weight"])

    vae_result = training.run_training(
        out_dir / "vae_training", config={**config, "stage": "vae", "training": vae_training}, network=vae,
        loss_fn=vae_step, steps=vae_training["steps"], lr_schedule=training.warmup_constant(vae_training["lr"], 20),
        seed=training.derived_seed(seed, 1, "init"), checkpoint_every=vae_training.get("checkpoint_every", 100),
        log_every=vae_training.get("log_every", 10), data_stream=vae_stream, description="train VAE")
    vae.eval().requires_grad_(False)

    latent_mean, latent_std = latent_statistics(ldm, imagespace.uint8_to_float(split.images).to(device))
    scaling_factor = float(1.0 / (latent_mean + latent_std * torch.randn_like(latent_mean)).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log.info("latent scaling factor %.4f (SD v1: 0.18215)", scaling_factor)

    trainable = torch.nn.ModuleDict({"unet": ldm.unet, "prompts": ldm.prompts}).train().requires_grad_(True)
    unet_stream = training.BatchStream(split.images, split.labels, unet_training["batch_size"], seed + 1, device)
    labels = torch.as_tensor(split.labels, dtype=torch.long, device=device)

    def unet_step(step, generator):
        rows = unet_stream.rows(step).to(device)
        y = labels[rows]
        return unet_loss(ldm, latent_mean[rows], latent_std[rows], y, generator, unet_training["label_dropout"])

    unet_result = training.run_training(
        out_dir / "unet_training", config={**config, "stage": "unet", "training": unet_training,
                                           "scaling_factor": scaling_factor},
        network=trainable, loss_fn=unet_step, steps=unet_training["steps"],
        lr_schedule=training.warmup_cosine(unet_training["lr"], 20, unet_training["steps"]),
        seed=training.derived_seed(seed, 2, "init"), ema_decay=unet_training.get("ema_decay"),
        checkpoint_every=unet_training.get("checkpoint_every", 100), log_every=unet_training.get("log_every", 10),
        data_stream=unet_stream, description="train latent UNet")
    if unet_result.ema is not None:
        trainable.load_state_dict(unet_result.ema.state_dict())
    ldm = ldm.to("cpu").eval().requires_grad_(False)
    # what the weights depend on, not the run's seconds or device: a retrained identical model is identical files
    extra = {"architecture": architecture, "vae_training": vae_training, "unet_training": unet_training,
             "seed": seed, "scaling_factor": scaling_factor}
    ldm_lib.save_ldm(out_dir / MODEL_FOLDER, ldm, extra=extra)
    atomic_write_text(out_dir / LOSS_FILE, _stage_losses({"vae": vae_result, "unet": unet_result}))
    return {"ldm": ldm, "vae": vae_result, "unet": unet_result, "scaling_factor": scaling_factor}


def _stage_losses(results):
    """One TSV of both loss logs with a leading `stage` column."""
    lines = []
    for stage, result in results.items():
        header, *rows = result.loss_log.tsv().strip().splitlines()
        if not lines:
            lines.append("stage\t" + header)
        lines += [f"{stage}\t{row}" for row in rows]
    return "\n".join(lines) + "\n"
