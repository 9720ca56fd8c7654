# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Models report
# The diffusion model, RDC's multi-head fine-tune and the base classifier that every defense of this preset is
# built from: training curves, class-conditional samples, one-shot denoising quality against the noise level, and
# the classifier's accuracy on clean inputs and on one-shot denoised noisy inputs (Carlini et al.'s DDS base
# classifier, before any smoothing).
# Where this code departs from the official code, and by how much: `docs/fidelity.md` in the project
# ([on disk](../../../docs/fidelity.md) from this report's folder).
# Figures vary between machines: training is bit-reproducible on one machine and thread count, not across CPUs
# (float rounding); on another machine one-shot accuracy at sigma 0.5 and Table 1 cells moved by up to 0.1. Read
# the numbers with their intervals.
# Every figure is computed by `diffrobust.evaluation` (tested in tests/test_evaluation.py); this notebook only
# displays them.

# %% tags=["parameters"]
preset = "mini"
dataset_dir = "data/datasets/mnist"
diffusion = "results/mini/models/diffusion/model.pt"
multihead = "results/mini/models/multihead/model.pt"
classifier = "results/mini/models/classifier/model.pt"
loss_logs = {"diffusion": "results/mini/models/diffusion/loss.tsv",
             "multihead": "results/mini/models/multihead/loss.tsv",
             "classifier": "results/mini/models/classifier/loss.tsv"}
sigmas = [0.25, 0.5, 1.0]
seed = 0
num_eval = 1000
sample_steps = 50
guidance_scale = 1.0
device = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display

from diffrobust import evaluation, imagespace, training
from diffrobust.data import load_dataset
from diffrobust.device import describe, resolve_device
from diffrobust.models import all_class_eps, eps_model, load_source, num_label_classes

torch.set_grad_enabled(False)
sns.set_theme(style="whitegrid")
device = resolve_device(device)
dataset = load_dataset(dataset_dir)
test = dataset.eval_split
count = min(num_eval, len(test))
images = imagespace.uint8_to_float(torch.from_numpy(test.images[:count])).to(device)
labels = torch.from_numpy(test.labels[:count])
diffusion_model = load_source(diffusion, device=device)
classifier_model = load_source(classifier, device=device).network
uncond_eps = eps_model(diffusion_model, unconditional=diffusion_model.null_class is not None)
schedule = diffusion_model.diffusion
display(Markdown(f"Preset `{preset}`; {count} test images of `{dataset.meta['name']}`; diffusion model "
                 f"`{diffusion}` ({evaluation.network_parameters(diffusion_model.network):,} parameters, "
                 f"{schedule.num_levels} steps); classifier `{classifier}` "
                 f"({evaluation.network_parameters(classifier_model):,} parameters). Networks on "
                 f"`{describe(device)['device']}`."))

# %% [markdown]
# ## Training curves

# %%
curves = [pd.read_csv(path, sep="\t").assign(model=name) for name, path in loss_logs.items()]
if curves:
    frame = pd.concat(curves)
    grid = sns.relplot(data=frame, x="step", y="loss", col="model", kind="line", height=2.6, aspect=1.2,
                       facet_kws={"sharey": False, "sharex": False})
    grid.set(yscale="log")
    plt.show()
    summary = pd.DataFrame.from_dict({name: evaluation.loss_log_summary(path) for name, path in loss_logs.items()},
                                     orient="index")
    display(summary.rename_axis("model").sort_index().round(4))
else:
    display(Markdown("No training logs: this preset's models are downloaded checkpoints."))

# %% [markdown]
# ## Class-conditional samples
# DDIM samples, one row per class, from the conditional model (classifier-free guidance scale shown below).

# %%
classes = num_label_classes(diffusion_model)
generator = torch.Generator().manual_seed(seed)
if classes:
    wanted = np.repeat(np.arange(classes), 8)
    samples = training.sample_class_conditional(diffusion_model, wanted, sample_steps, guidance_scale, generator)
    plt.figure(figsize=(6, 0.75 * classes))
    plt.imshow(training.image_grid(samples, 8).squeeze(), cmap="gray")
    plt.axis("off")
    plt.show()
    agreement = evaluation.accuracy(classifier_model, samples, wanted, batch_size=None)
    # Why samples can look worse than denoising: a sampler starts at t = T, where the signal in x_T is only
    # sqrt(alpha_bar_T) per pixel, and every step writes the network's eps error into x_t. Measured on test images.
    top = schedule.num_levels
    eps_rms = evaluation.eps_error_rms(uncond_eps, schedule, images[:256], top, seed)
    signal = schedule.alpha_bar(top) ** 0.5
    border = evaluation.top_rows_mean(samples)
    display(Markdown(
        f"Guidance scale {guidance_scale}, {sample_steps} DDIM steps. The base classifier labels **{agreement:.0%}** "
        f"of the samples as the class they were drawn for. At t = T = {top} the network's eps error is "
        f"{eps_rms:.3f} rms per pixel against a signal of sqrt(alpha_bar_T) = {signal:.4f}"
        + (f": the error swamps the signal, so the sampler drifts in the first steps and the samples keep a "
           f"grey, textured background (mean of the top three rows {border:.2f}, the data's is "
           f"{evaluation.top_rows_mean(images):.2f}) that the classifier, trained on clean digits, has never "
           "seen. Denoising starts from a real noisy image at t* <= 400 instead, where the prediction is "
           "accurate (next section); longer training shrinks the error at T." if eps_rms > signal else ".")))
else:
    display(Markdown("This diffusion model is unconditional: no class-conditional samples."))

# %% [markdown]
# ## One-shot denoising quality against the noise level
# x_t = q_sample(x, t), then Carlini et al.'s one-shot prediction of x from x_t (unconditional). PSNR in [0, 1] space;
# `sigma` is the smoothing noise on the [0, 1] scale that corresponds to t (sqrt(1 - a_t)/(2 sqrt(a_t))).

# %%
quality = pd.DataFrame(evaluation.denoising_quality(uncond_eps, schedule, images[:256],
                                                    (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7), seed))
fig, ax = plt.subplots(figsize=(6, 3))
sns.lineplot(data=quality.melt(["t", "sigma"], var_name="input", value_name="PSNR (dB)"), x="t", y="PSNR (dB)",
             hue="input", marker="o", ax=ax)
plt.show()
quality.round(3)

# %% [markdown]
# ## Classifier accuracy: clean, noisy, and one-shot denoised
# Smoothing noise x + sigma*eps (sigma on the [0, 1] scale), then the DDS denoiser (t* by Carlini et al.'s
# first-at-least rule, x_t = sqrt(a)(x + 2 sigma eps) with a = 1/(1 + 4 sigma^2)); one noise draw per image.

# %%
rows = evaluation.smoothing_accuracies(classifier_model, uncond_eps, schedule, images, labels, sigmas, seed)
accuracies = pd.DataFrame([{"sigma": row["sigma"], "accuracy": row["accuracy"],
                            "input": row["input"] + ("" if row["t_star"] is None else f" (t* = {row['t_star']})")}
                           for row in rows])[["sigma", "input", "accuracy"]]
display(accuracies.round(4))
at_half = [row for row in rows if row["sigma"] == 0.5 and row["t_star"] is not None]
if at_half:
    value = at_half[0]["accuracy"]
    verdict = "meets" if value >= 0.9 else "falls short of"
    shortfall = "" if value >= 0.9 else (
        " Why: one-shot denoising returns the posterior mean E[x | x_t*], which at sigma = 0.5 (t* = "
        f"{at_half[0]['t_star']}) averages over the "
        "digits consistent with the noisy input: strokes blur and ambiguous digits fade towards each other (PSNR "
        "in the section above). As in Carlini et al., the classifier is trained on clean images only and was "
        "never adapted to such blurred inputs.")
    display(Markdown(f"At sigma = 0.5 one-shot denoising keeps **{value:.1%}** accuracy, which {verdict} "
                     f"the 90% target.{shortfall}"))

# %% [markdown]
# ## Multi-head diffusion (RDC)
# One network pass predicts the noise of every class. Agreement with the conditional model it was fine-tuned from
# (mean squared difference of the predicted noise, per class, at a few noise levels), and the network evaluations
# a diffusion classifier needs per image and timestep.

# %%
if multihead and classes:
    heads_model = load_source(multihead, device=device)
    agreement_rows = evaluation.multihead_agreement(lambda x_t, t: all_class_eps(heads_model, x_t, t),
                                                    lambda x_t, t: all_class_eps(diffusion_model, x_t, t),
                                                    schedule, images[:64], (0.1, 0.3, 0.5), seed)
    display(pd.DataFrame(agreement_rows).round(5))
    display(Markdown(f"Network evaluations per image and timestep: conditional model {classes}, multi-head 1."))
