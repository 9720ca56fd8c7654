"""Pixel is a Barrier (Xue & Chen, arXiv 2404.13320) as workflow jobs: protect, edit and purify, then the claims.

Jobs (one per protective attack, each over every budget of `pixel_barrier.budgets`):

- `protect_job`: the evaluation images protected by one attack (`attacks.protective`), one array per budget, checked
  inside the ℓ∞ ball; the pseudo-attacks ``none`` (the clean images) and ``random`` (±ε sign noise, the control of
  the same budget) are made by the same job so that every later comparison is paired image by image.
- `edit_job`: every protected set edited by SDEdit with the LDM and with the pixel model (PDM) at each strength, and
  purified by each purifier and then edited by the LDM; per image: SSIM and PSNR against the clean image, a feature
  distance on the classifier's penultimate layer and the classifier's accuracy on the edit (does the edit keep the
  digit?). Edits of one image use the same noise whatever the attack (one generator seeded per strength), so the
  differences between sets are the perturbations' and not the sampler's.

`claims` turns the per-image tables into the paper's three claims, each with a paired bootstrap interval and a verdict.

Mist's target image (`pixel_barrier.target.file`, or the registry file `target.checkpoint` names: Diff-Protect's
MIST.png at paper scale; config.resolve_pixel_barrier_target points `file` at it) is part of the identity of the sets
of the attacks that read it
(`config.TARGET_IMAGE_ATTACKS`): the workflow passes its sha256 to their protect and edit jobs; the protect job reads
the file once, refuses other bytes than planned and stores the digest in the set (`target_sha256`), and the edit job
refuses a set made with another target, so a set made with an old target is never edited as if made with the new one.
"""

import functools
import hashlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrobust import imagespace, quality
from diffrobust.attacks import protective
from diffrobust.config import TARGET_IMAGE_ATTACKS, pixel_barrier_target_file
from diffrobust.data import load_dataset, subset_indices
from diffrobust.defenses.sdedit import (GrIDPure, IFStageIIPure, LDMPure, PDMPure, ldm_sdedit, load_if_stage2,
                                        pixel_sdedit)
from diffrobust.defenses.transforms import CropResize, JPEGCompression, identity
from diffrobust.defenses.upscaling import NoisyUpscaling, load_sd_upscaler
from diffrobust.errors import DiffrobustError
from diffrobust.models import eps_model, load_source
from diffrobust.networks.ldm import load_ldm

log = logging.getLogger(__name__)

PSEUDO_ATTACKS = ("none", "random")
EDITORS = ("ldm", "pdm")
PURIFIERS = ("none", "pdm_pure", "pdm_pure_released", "pdm_pure_if", "jpeg", "crop", "ldm_pure", "gridpure",
             "noisy_upscaling")
METRICS = ("ssim", "psnr", "lpips", "feature_distance", "feature_cosine", "correct")
# Set-level distances of the edits' classifier features to the clean images' (with a few dozen images their bias
# dominates: they rank conditions, the per-image METRICS carry the claims).
SET_METRICS = ("set_frechet", "set_kid", "set_fid")
GRID_IMAGES = 4


# ---------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------

def load_models(models, settings, device="cpu"):
    """{"ldm", "pixel_eps", "pixel_schedule", "classifier", "features"} from the stage's model sources: classifier
    may be None; features is the classifier's penultimate layer (models.features "classifier"), an official image
    encoder (e.g. CLIP's), or None."""
    ldm = load_ldm(models["ldm"], prompt=settings.get("prompt"), device=device)
    pixel = load_source(models["pixel"], device=device)
    unconditional = pixel.null_class is not None
    classifier = load_source(models["classifier"], device=device).network if models.get("classifier") else None
    features = models.get("features", "classifier")
    if features == "classifier":
        features = quality.penultimate_features(classifier) if classifier is not None else None
    elif features:
        features = load_source(features, device=device).network
    if_stage2 = None
    if "pdm_pure_if" in settings.get("purifier_list", ()):
        if not models.get("if_stage2"):
            raise ValueError("purifier pdm_pure_if needs DeepFloyd IF stage II: set pixel_barrier.models.if_stage2")
        if_stage2 = load_if_stage2(models["if_stage2"], device=device,
                                   prompt_embeds_file=settings["purifiers"]["pdm_pure_if"].get("prompt_embeds_file"))
    lpips_model = fid_features = None
    if models.get("lpips"):
        from diffrobust.networks.pretrained import load_lpips_alex

        lpips_model = load_lpips_alex(models["lpips"], device=device)
    if models.get("fid_inception"):
        from diffrobust.networks.pretrained import load_fid_inception

        fid_features = load_fid_inception(models["fid_inception"], device=device)
    upscaler = None
    if "noisy_upscaling" in settings.get("purifier_list", ()):
        if not models.get("upscaler"):
            raise ValueError("purifier noisy_upscaling needs the x4 upscaler: set pixel_barrier.models.upscaler")
        upscaler = load_sd_upscaler(models["upscaler"], device=device)
    return {"ldm": ldm, "pixel_eps": eps_model(pixel, unconditional=unconditional), "pixel_schedule": pixel.diffusion,
            "classifier": classifier, "features": features, "if_stage2": if_stage2, "upscaler": upscaler,
            "lpips": lpips_model, "fid_features": fid_features}


def evaluation_images(dataset_dir, subset):
    """(x01, labels, indices) of the stage's subset of the evaluation split."""
    split = load_dataset(dataset_dir).eval_split
    indices = subset_indices(subset, len(split), "subsets.pdm_pure")
    return (imagespace.uint8_to_float(split.images[indices]), torch.as_tensor(split.labels[indices]).long(),
            np.asarray(split.indices[indices]))


def read_target(settings, attack, expected_sha256=None):
    """(bytes, sha256) of the target image file the protect job of `attack` reads, read once so that every budget
    uses the same pixels; (None, None) where it reads no file (another attack, or the checkerboard).
    expected_sha256: the digest the workflow planned the job with (its identity); a file holding other bytes now is
    refused rather than protected with and recorded under that identity."""
    file = pixel_barrier_target_file(settings, attack)
    if file is None:
        return None, None
    try:
        data = Path(file).read_bytes()
    except OSError as error:
        raise DiffrobustError(f"cannot read pixel_barrier.target.file {file} ({error.strerror}): point the config key "
                              "at Mist's target image (or name its registry checkpoint in pixel_barrier.target."
                              "checkpoint and run snakemake, which downloads it), or set both to null for the "
                              "checkerboard") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise DiffrobustError(f"pixel_barrier.target.file {file} changed after the workflow planned this job "
                              f"(sha256 {expected_sha256[:12]}... then, {digest[:12]}... now): run snakemake again, so "
                              f"that the {attack} set is protected with the target the workflow records")
    return data, digest


def check_set_target(set_path, sets, attack, expected_sha256):
    """Refuse a protected set of `attack` made with another target image than the one of sha256 `expected_sha256`
    (None: the job depends on no target file, nothing to check)."""
    if expected_sha256 is None:
        return
    recorded = str(sets["target_sha256"]) if "target_sha256" in sets else None
    if recorded != expected_sha256:
        made_with = f"the target image of sha256 {recorded[:12]}..." if recorded else "no recorded target image"
        raise DiffrobustError(f"{set_path} was made with {made_with}, but pixel_barrier.target.file now holds sha256 "
                              f"{expected_sha256[:12]}...: its {attack} set is not edited as if made with the new "
                              f"target. Delete {set_path} and run snakemake again (its protect job remakes it)")


def target_image(settings, shape, data=None):
    """Mist's target image, bicubic-resized to the images' size as Diff-Protect resizes MIST.png: the file of
    `target.file` (Diff-Protect's MIST.png at paper scale, through target.checkpoint; `data`: its bytes, as read_target
    read them; read from the file when not given), or without one a checkerboard of `target.period`-pixel squares,
    the mini/smoke stand-in (MIST.png is a texture of high-contrast patterns; MNIST is 1-channel)."""
    spec = settings["target"]
    channels, size = shape[-3], shape[-1]
    if spec.get("file"):
        from PIL import Image

        data = Path(spec["file"]).read_bytes() if data is None else data
        image = Image.open(io.BytesIO(data)).convert("RGB" if channels == 3 else "L")
        image = image.resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return imagespace.uint8_to_float(array[None].copy())
    period = int(spec.get("period", 4))
    rows = (torch.arange(size) // period) % 2
    board = (rows[:, None] ^ rows[None, :]).float()
    return board.expand(1, channels, size, size).clone()


def budget_key(index):
    return f"eps{index}"


def in_batches(fn, x01, batch_size, seed):
    """fn(batch, generator) over batches of `batch_size` images, batch b drawing from a generator seeded (seed, b):
    the draws of an image depend on its position and the seed only, not on the set it belongs to."""
    outputs = []
    for b, start in enumerate(range(0, len(x01), batch_size)):
        outputs.append(fn(x01[start:start + batch_size], torch.Generator().manual_seed(seed * 1000 + b)))
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Protection
# ---------------------------------------------------------------------------------------------------------------

def protect_images(attack, x01, settings, models, seed, target01=None):
    """{budget index: (protected images, objective before, after)} for one attack over every budget (target01: Mist's
    target image, for the attacks of TARGET_IMAGE_ATTACKS)."""
    out, batch_size = {}, settings["batch_size"]
    for k, eps in enumerate(settings["budgets"]):
        stream = seed * 100 + k
        if attack == "none":
            out[k] = (x01.clone(), None, None)
            continue
        if attack == "random":
            out[k] = (in_batches(lambda x, g: protective.random_sign_noise(x, eps, g), x01, batch_size, stream),
                      None, None)
            continue
        objective = protective.objective_for(
            attack, ldm=models["ldm"], pixel_eps_model=models["pixel_eps"], pixel_schedule=models["pixel_schedule"],
            target01=target01, rate=settings["mist_rate"])
        random_start = attack not in settings["no_random_start"]
        step = protective.pgd_step(eps, settings["step_size"], settings["relative_step_size"])
        results = []
        with tqdm(total=settings["steps"] * len(range(0, len(x01), batch_size)), desc=f"{attack} eps {eps:g}",
                  mininterval=5.0) as progress:
            def run(x, generator):
                results.append(protective.protect(objective, x, eps=eps, steps=settings["steps"], step=step,
                                                  random_start=random_start, generator=generator,
                                                  measure_draws=settings["measure_draws"], progress=progress))
                return results[-1].x_protected
            protected = in_batches(run, x01, batch_size, stream)
        out[k] = (protected, torch.cat([r.objective_before for r in results]),
                  torch.cat([r.objective_after for r in results]))
    return out


def protect_job(attack, *, settings, subset, models, dataset_dir, device="cpu", seed=0, target_sha256=None):
    """The arrays of one attack's protected sets (see the module docstring); also the latent distance each
    perturbation causes, against the random control's (the encoder-amplification figure), and the sha256 of the
    target image file it read ("" for none; target_sha256: the digest the workflow planned, see read_target).
    The clean and protected images are stored as `settings["storage"]` says (protective.stored_images: exact, or
    Diff-Protect's truncated uint8), and every later measure reads what is stored, as Diff-Protect's evaluation
    reads its PNGs."""
    target_data, target_digest = read_target(settings, attack, target_sha256)
    loaded = load_models(models, settings, device)
    x01, labels, indices = evaluation_images(dataset_dir, subset)
    x01 = x01.to(device)
    target01 = target_image(settings, x01.shape, target_data).to(device) if attack in TARGET_IMAGE_ATTACKS else None
    clock = time.perf_counter()
    protected = protect_images(attack, x01, settings, loaded, seed, target01)
    storage = settings["storage"]
    x_clean = protective.stored_images(x01, storage)
    arrays = {"indices": np.asarray(indices), "labels": labels.numpy(), "x_clean": x_clean.cpu().numpy(),
              "budgets": np.asarray(settings["budgets"], dtype=np.float64), "target_sha256": np.str_(target_digest or ""),
              "storage": np.str_(storage)}
    for k, (x_protected, before, after) in protected.items():
        key = budget_key(k)
        x_protected = protective.stored_images(x_protected.detach(), storage)
        arrays[f"{key}/x"] = x_protected.cpu().numpy().astype(np.float32)
        arrays[f"{key}/latent_distance"] = protective.latent_distance(loaded["ldm"], x_clean, x_protected).cpu().numpy()
        if before is not None:
            arrays[f"{key}/objective_before"] = before.numpy()
            arrays[f"{key}/objective_after"] = after.numpy()
    arrays["seconds"] = np.float64(time.perf_counter() - clock)
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# Editing and purification
# ---------------------------------------------------------------------------------------------------------------

def purifier_for(name, settings, loaded):
    """The purifier `name` of PURIFIERS (a purifier: x01, generator -> x01)."""
    spec = settings["purifiers"].get(name, {})
    if name == "none":
        return identity
    if name in ("pdm_pure", "pdm_pure_released"):
        variant = "released" if name == "pdm_pure_released" else "paper"
        return PDMPure(loaded["pixel_eps"], loaded["pixel_schedule"], variant=variant,
                       **{key: value for key, value in spec.items() if key != "variant"})
    if name == "jpeg":
        return JPEGCompression(**spec)
    if name == "crop":
        return CropResize(**spec)
    if name == "ldm_pure":
        return LDMPure(loaded["ldm"], **spec)
    if name == "pdm_pure_if":
        pipeline, prompt_embeds, negative_prompt_embeds = loaded["if_stage2"]
        return IFStageIIPure(pipeline, prompt_embeds, negative_prompt_embeds,
                             **{key: value for key, value in spec.items() if key != "prompt_embeds_file"})
    if name == "noisy_upscaling":
        return NoisyUpscaling(loaded["upscaler"], prompt=settings.get("prompt") or "", **spec)
    if name == "gridpure":
        return GrIDPure(loaded["pixel_eps"], loaded["pixel_schedule"], **spec)
    raise ValueError(f"unknown purifier {name!r}; choose one of {PURIFIERS}")


def edit(editor, x01, strength, loaded, settings, seed):
    """SDEdit of x01 by the LDM or the PDM at `strength`, with the noise of (seed, strength) (paired across sets)."""
    steps = settings["edit"]["num_inference_steps"]

    def run(x, generator):
        if editor == "ldm":
            return ldm_sdedit(loaded["ldm"], x, strength, num_inference_steps=steps, generator=generator)
        return pixel_sdedit(loaded["pixel_eps"], loaded["pixel_schedule"], x, strength, num_inference_steps=steps,
                            sampler=settings["edit"]["pixel_sampler"], generator=generator)

    return in_batches(run, x01, settings["batch_size"], seed * 1000 + round(strength * 1000))


def image_metrics(edited01, clean01, labels, classifier, features_of, loaded=None, clean_features=None,
                  clean_fid_features=None):
    """Per-image metrics of edits against the clean images (see METRICS), with the set-level Fréchet distance and
    KID of the edits' features to the clean images' (one value per set, repeated on its rows: `SET_METRICS`).
    clean_features / clean_fid_features: the clean images' features, when the caller computed them once for every
    set it measures."""
    rows = {"ssim": quality.ssim(edited01, clean01, grayscale=edited01.shape[1] == 3).numpy(),
            "psnr": np.minimum(quality.psnr(edited01, clean01).numpy(), 100.0)}
    if classifier is not None:
        with torch.no_grad():
            rows["correct"] = (classifier(edited01).argmax(1).cpu() == labels).numpy().astype(np.float64)
    loaded = loaded or {}
    with torch.no_grad():
        if loaded.get("lpips") is not None:
            # LPIPS takes [-1, 1] (Diff-Protect's eval_gen.py feeds it [0, 1]: attacks_rdc_pdm.md §4)
            rgb = [x.expand(-1, 3, -1, -1) for x in (edited01, clean01)]
            rows["lpips"] = loaded["lpips"](rgb[0] * 2 - 1, rgb[1] * 2 - 1).flatten().double().cpu().numpy()
        if loaded.get("fid_features") is not None:
            if clean_fid_features is None:
                clean_fid_features = quality.extract_features(loaded["fid_features"], clean01)
            rows["set_fid"] = quality.frechet_distance(quality.extract_features(loaded["fid_features"], edited01),
                                                       clean_fid_features)
    if features_of is not None:
        with torch.no_grad():
            edited_features = features_of(edited01)
            if clean_features is None:
                clean_features = features_of(clean01)
            rows["feature_cosine"] = quality.cosine_similarity(edited_features, clean_features).numpy()
            rows["feature_distance"] = quality.feature_distance(edited_features, clean_features).numpy()
            rows["set_frechet"] = quality.frechet_distance(edited_features, clean_features)
            rows["set_kid"] = quality.kernel_inception_distance(edited_features, clean_features, subsets=50,
                                                                subset_size=len(clean01)).mean
    return rows


def edit_job(attack, sets, *, settings, models, device="cpu", seed=0):
    """(per-image metrics DataFrame, grid arrays) of one attack's protected sets (`sets`: protect_job's arrays)."""
    import pandas as pd

    loaded = load_models(models, settings, device)
    classifier, extractor = loaded["classifier"], loaded["features"]

    features_of = None if extractor is None else functools.partial(quality.extract_features, extractor)

    x_clean = torch.from_numpy(sets["x_clean"]).to(device)
    labels = torch.from_numpy(sets["labels"])
    # every edit and purification is measured against the same clean images: their features once per job
    clean = {"clean_features": None if features_of is None else features_of(x_clean),
             "clean_fid_features": None if loaded["fid_features"] is None
             else quality.extract_features(loaded["fid_features"], x_clean)}
    budgets = sets["budgets"] if attack != "none" else sets["budgets"][:1]
    frames, grids = [], {"x_clean": sets["x_clean"][:GRID_IMAGES]}
    for k, eps in enumerate(budgets):
        key = budget_key(k)
        x = torch.from_numpy(sets[f"{key}/x"]).to(device)
        grids[f"{key}/x"] = sets[f"{key}/x"][:GRID_IMAGES]
        base = {"attack": attack, "eps": 0.0 if attack == "none" else float(eps)}
        log.info("%s at eps %g: LDM and PDM edits at %s, then %s", attack, base["eps"],
                 settings["edit"]["strengths"], ", ".join(settings["purifier_list"]))

        def add(rows, **labels_of_rows):
            frame = pd.DataFrame(rows)
            frame.insert(0, "image", np.arange(len(frame)))
            for name, value in reversed(list({**base, **labels_of_rows}.items())):
                frame.insert(0, name, value)
            frames.append(frame)

        for editor in EDITORS:
            for strength in settings["edit"]["strengths"]:
                edited = edit(editor, x, strength, loaded, settings, seed)
                add(image_metrics(edited, x_clean, labels, classifier, features_of, loaded, **clean), editor=editor,
                    purifier="none", strength=strength)
                if strength == settings["edit"]["purified_strength"]:
                    grids[f"{key}/{editor}"] = edited[:GRID_IMAGES].cpu().numpy()
        strength = settings["edit"]["purified_strength"]
        for name in settings["purifier_list"]:
            if name == "none":
                continue
            purified = in_batches(purifier_for(name, settings, loaded), x, settings["batch_size"], seed * 1000 + 7)
            edited = edit("ldm", purified, strength, loaded, settings, seed)
            add(image_metrics(edited, x_clean, labels, classifier, features_of, loaded, **clean), editor="ldm", purifier=name,
                strength=strength)
            # the purified images themselves, against the clean ones: how much of the image the purifier keeps
            add(image_metrics(purified, x_clean, labels, classifier, features_of, loaded, **clean), editor="purified", purifier=name,
                strength=0.0)
            grids[f"{key}/purified/{name}"] = edited[:GRID_IMAGES].cpu().numpy()
    table = pd.concat(frames, ignore_index=True)
    return table, {name: np.asarray(value, dtype=np.float32) for name, value in grids.items()}


# ---------------------------------------------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------------------------------------------

def _per_image(table, metric, **where):
    rows = table
    for key, value in where.items():
        rows = rows[np.isclose(rows[key], value)] if isinstance(value, float) else rows[rows[key] == value]
    return rows.sort_values("image")[metric].to_numpy()


def verdict_row(verdict):
    """A ClaimVerdict as flat columns of the claims table."""
    iv = verdict.interval
    return {"label": verdict.label, "difference": verdict.difference, "estimate": iv.estimate, "low": iv.low,
            "high": iv.high, "n_images": iv.n_images, "criterion": verdict.criterion, "verdict": verdict.verdict,
            "sentence": verdict.sentence}


def claims(table, settings, attacks):
    """The three claims per attack and budget -> DataFrame of quality.ClaimVerdict fields.

    1. LDM edits of protected images are worse than of the random control of the same budget (degrades_beyond).
    2. PDM edits of protected images stay within `claims.pdm_margin` of the control's (equivalent_within).
    3. PDM-Pure then the LDM edit is within `claims.restore_margin` of the LDM edit of the clean image.
    All at `edit.purified_strength`, on `claims.metric` (SSIM against the clean image by default), paired over
    images with a bootstrap interval.
    """
    import pandas as pd

    spec = settings["claims"]
    metric, strength = spec["metric"], float(settings["edit"]["purified_strength"])
    higher = metric != "feature_distance"
    rows = []
    clean_ldm = _per_image(table, metric, attack="none", editor="ldm", purifier="none", strength=strength)
    for attack in attacks:
        for eps in settings["budgets"]:
            eps = float(eps)

            def values(name, **where):
                return _per_image(table, metric, attack=name, eps=eps, strength=strength, **where)

            control = {editor: values("random", editor=editor, purifier="none") for editor in EDITORS}
            attacked = {editor: values(attack, editor=editor, purifier="none") for editor in EDITORS}
            common = {"attack": attack, "eps": eps, "metric": metric}
            if attack in protective.LATENT_ATTACKS:
                verdict = quality.degrades_beyond(attacked["ldm"], control["ldm"], higher_is_better=higher,
                                                  label=f"LDM edit {metric}, {attack} at {eps:g}",
                                                  names=(attack, "random"), seed=spec["seed"])
                rows.append({**common, "claim": "ldm_degrades", **verdict_row(verdict)})
            difference = quality.equivalent_within(attacked["pdm"], control["pdm"], spec["pdm_margin"],
                                                   label=f"PDM edit {metric}, {attack} at {eps:g}",
                                                   names=(attack, "random"), seed=spec["seed"])
            rows.append({**common, "claim": "pdm_unaffected", **verdict_row(difference)})
            purified = values(attack, editor="ldm", purifier="pdm_pure")
            restored = quality.equivalent_within(purified, clean_ldm, spec["restore_margin"],
                                                 label=f"PDM-Pure then LDM edit {metric}, {attack} at {eps:g}",
                                                 names=("purified", "clean"), seed=spec["seed"])
            rows.append({**common, "claim": "pdm_pure_restores", **verdict_row(restored)})
    return pd.DataFrame(rows)


def at_budget(verdicts, claim, eps):
    """The rows of one claim at budget `eps` of a `claims` table (the report lists the strongest budget's)."""
    return verdicts[(verdicts["claim"] == claim) & np.isclose(verdicts["eps"], eps)]


# ---------------------------------------------------------------------------------------------------------------
# The report's bar charts
# ---------------------------------------------------------------------------------------------------------------

CHART_SEED = 0  # seaborn's bootstrap of the bars' 95% intervals: seeded, so a re-render draws the same image bytes


def _bars(rows, *, x, y, hue, ax, seed=CHART_SEED):
    """Mean bars of `y` per `x` and `hue` with seaborn's bootstrap 95% interval, its resampling seeded."""
    import seaborn as sns

    return sns.barplot(data=rows, x=x, y=y, hue=hue, ax=ax, errorbar=("ci", 95), seed=seed)


def edit_quality_figure(edits, metric, strength, *, seed=CHART_SEED):
    """The report's chart (a): per editor, `metric` of the edits of protected images at `strength` per attack and
    budget, the clean image's edit as a dashed line. `edits` are the table's rows without a purifier."""
    import matplotlib.pyplot as plt

    at_strength = edits[np.isclose(edits["strength"], strength) & (edits["attack"] != "none")]
    fig, axes = plt.subplots(1, len(EDITORS), figsize=(12, 4), sharey=True)
    for ax, editor in zip(axes, EDITORS):
        _bars(at_strength[at_strength["editor"] == editor], x="attack", y=metric, hue="eps", ax=ax, seed=seed)
        clean = edits[(edits["attack"] == "none") & (edits["editor"] == editor) & np.isclose(edits["strength"], strength)]
        ax.axhline(clean[metric].mean(), color="black", linestyle="--", label="clean")
        ax.set_title(f"{editor.upper()} edit at strength {strength:g}")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(title="eps", fontsize=8)
    fig.tight_layout()
    return fig


def purification_figure(ldm_after, metric, strength, eps, *, seed=CHART_SEED):
    """The report's chart (b): `metric` of the LDM edit after each purifier, per attack, at budget `eps` (the rows
    `ldm_after` already chosen)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    _bars(ldm_after, x="attack", y=metric, hue="purifier", ax=ax, seed=seed)
    ax.set_title(f"LDM edit after each purifier (eps {eps:g}, strength {strength:g})")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The report's protocol rows
# ---------------------------------------------------------------------------------------------------------------

def step_text(settings):
    """The PGD step as the report states it: fixed in /255 units (Diff-Protect's 1/255) or a fraction of eps."""
    if settings.get("relative_step_size") is not None:
        return f"{settings['relative_step_size']:g} eps"
    return f"{settings['step_size'] * 255:.4g}/255 at every budget"


def target_text(settings):
    """Which target image Mist and texture_only pull toward: a registry checkpoint, a file, or the checkerboard."""
    target = settings["target"]
    if target.get("checkpoint"):
        return f"registry {target['checkpoint']} ({target.get('file')})"
    if target.get("file"):
        return f"file {target['file']}"
    return f"checkerboard of {target.get('period', 4)}-pixel squares (the mini/smoke stand-in for MIST.png)"


STORAGE_TEXTS = {
    "float32": "float32 arrays: exact, inside the budget, the clean reference unchanged",
    "released_uint8": "Diff-Protect's astype(uint8) (truncation): delta in [-eps - 1/255, +eps], the clean reference "
                      "one grey level darker at values 1..63",
}


def paper_rows(attacks):
    """attack -> the row of the paper's tables it stands for (protective.PAPER_ROWS), for the report."""
    import pandas as pd

    return pd.DataFrame([{"attack": name, "paper's row": protective.PAPER_ROWS.get(name) or "- (not a row of the paper)"}
                         for name in attacks]).set_index("attack")


PAPER = "Pixel is a Barrier"
REPORT = "pixel_barrier"
CLAIMS = {  # claim -> what it says, as a sentence with {attack}, {eps}, {metric}, {pdm_margin}, {restore_margin}
    "ldm_degrades": "the LDM edit of {attack}-protected images is worse than of the random control (eps {eps:g}, "
                    "{metric})",
    "pdm_unaffected": "the PDM edit of {attack}-protected images stays within ±{pdm_margin:g} of the random "
                      "control's (eps {eps:g}, {metric})",
    "pdm_pure_restores": "PDM-Pure then the LDM edit of {attack}-protected images is within ±{restore_margin:g} of "
                         "the clean image's LDM edit (eps {eps:g}, {metric})",
}


def _set_value(table, metric, **where):
    values = _per_image(table, metric, **where)
    return float(values[0]) if len(values) and np.isfinite(values[0]) else None


def claim_rows(verdicts, table, settings, *, dataset, known):
    """The three claims at the strongest budget (one row per claim and attack, from the `claims` table
    `verdicts`) and the paper's headline number at paper scale, as diffrobust.claims.Claim rows. The paper's metric
    tables are not known (published_values.yaml), so the published column says so and cites the claim."""
    from diffrobust import claims as c

    spec, strongest = settings["claims"], max(float(eps) for eps in settings["budgets"])
    statements = {entry["claim"]: entry for entry in known["pixel_barrier"]["claims"]}
    link = c.anchor(REPORT, "The three claims")
    rows = []
    for claim, sentence in CLAIMS.items():
        entry = statements[claim]
        for row in at_budget(verdicts, claim, strongest).itertuples():
            words = sentence.format(attack=row.attack, eps=row.eps, metric=row.metric,
                                    pdm_margin=spec["pdm_margin"], restore_margin=spec["restore_margin"])
            ours = (f"{row.difference} = {c.interval_text(row.estimate, row.low, row.high, signed=True)} "
                    f"({row.n_images} images, paired bootstrap)")
            rows.append(c.Claim(PAPER, words, f"{c.NOT_KNOWN} (the paper's tables were not readable)",
                                f"{entry['statement']} ({c.provenance(entry)})", ours, row.estimate, row.low,
                                row.high, row.verdict, link))
    return rows + [fid_headline(table, settings, dataset=dataset, known=known)]


def fid_headline(table, settings, *, dataset, known):
    """"Protective perturbations raise the LDM's SDEdit FID by over 100" at paper scale: per latent attack at the
    strongest budget, the set FID of the LDM edits of protected images minus that of the clean images' edits. A
    set-level distance has no per-image interval: holds when every attack raises it by more than the published
    margin, fails when none does, inconclusive otherwise; not run without the FID's Inception features."""
    from diffrobust import claims as c

    headline = known["headlines"]["pixel_fid"]
    claim = f"protective perturbations raise the LDM's SDEdit FID by over {headline['value']:g}"
    published = f"> {headline['value']:g} ({headline['dataset']})"
    link = c.anchor(REPORT, "Set-level distances of the edits to the clean images")
    strength, strongest = float(settings["edit"]["purified_strength"]), max(float(e) for e in settings["budgets"])
    where = {"editor": "ldm", "purifier": "none", "strength": strength}
    clean = _set_value(table, "set_fid", attack="none", **where) if "set_fid" in table.columns else None
    if dataset != headline["dataset"] or clean is None:
        return c.not_run(PAPER, claim, published, c.provenance(headline),
                         f"the paper-scale number is an FID on {headline['dataset']} with Inception features "
                         f"(preset {headline['dataset']})", link)
    attacks = [a for a in dict.fromkeys(table["attack"]) if a in protective.LATENT_ATTACKS]
    rises = {a: _set_value(table, "set_fid", attack=a, eps=strongest, **where) - clean for a in attacks}
    verdict = (c.HOLDS if min(rises.values()) > headline["value"] else
               c.FAILS if max(rises.values()) <= headline["value"] else c.INCONCLUSIVE)
    ours = (f"FID rise over the clean images' LDM edits at eps {strongest:g}: "
            + ", ".join(f"{a} {rise:+.1f}" for a, rise in rises.items()) + " (a set-level distance: no interval)")
    return c.Claim(PAPER, claim, published, c.provenance(headline), ours, min(rises.values()), None, None, verdict,
                   link, headline=True)


def report_claims(parameters, known):
    """The claim rows of Pixel is a Barrier from its report's notebook parameters (notebooks/pixel_barrier.py)."""
    results_dir, settings = parameters["results_dir"], parameters["settings"]
    table = read_tables([f"{results_dir}/edits/{name}.tsv" for name in parameters["sets"]])
    attacks = [name for name in parameters["sets"] if name not in PSEUDO_ATTACKS]
    return claim_rows(claims(table, settings, attacks), table, settings, dataset=parameters["dataset"], known=known)


# ---------------------------------------------------------------------------------------------------------------
# The jobs' files
# ---------------------------------------------------------------------------------------------------------------

def run_protect(attack, *, settings, subset, models, dataset_dir, out, device="cpu", target_sha256=None):
    """protect_job, written atomically to `out` (.npz); returns the run record's summary (with the sha256 of the
    target image file it read, or None)."""
    from diffrobust.io import atomic_write_npz

    arrays = protect_job(attack, settings=settings, subset=subset, models=models, dataset_dir=dataset_dir,
                         device=device, seed=settings["seed"], target_sha256=target_sha256)
    atomic_write_npz(out, arrays)
    summary = {"attack": attack, "images": int(len(arrays["labels"])), "seconds": float(arrays["seconds"]),
               "target_sha256": str(arrays["target_sha256"]) or None}
    for k, eps in enumerate(settings["budgets"]):
        key = budget_key(k)
        summary[f"latent_distance_eps{eps:g}"] = float(arrays[f"{key}/latent_distance"].mean())
        if f"{key}/objective_after" in arrays:
            summary[f"objective_eps{eps:g}"] = [float(arrays[f"{key}/objective_before"].mean()),
                                                float(arrays[f"{key}/objective_after"].mean())]
    return summary


def read_protected(path):
    """A protect job's arrays as a dict (the file closed)."""
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def run_edit(attack, *, settings, models, set_path, out_tsv, out_grid, device="cpu", target_sha256=None):
    """edit_job on the set at `set_path`, its table and grid images written atomically; returns a summary.
    target_sha256: the target image the set must have been made with (check_set_target)."""
    from diffrobust.io import atomic_path, atomic_write_npz

    clock = time.perf_counter()
    sets = read_protected(set_path)
    check_set_target(set_path, sets, attack, target_sha256)
    table, grids = edit_job(attack, sets, settings=settings, models=models, device=device, seed=settings["seed"])
    with atomic_path(out_tsv) as temp:
        table.to_csv(temp, sep="\t", index=False)
    atomic_write_npz(out_grid, grids)
    return {"attack": attack, "rows": int(len(table)), "seconds": time.perf_counter() - clock}


def read_tables(paths):
    """The edit jobs' per-image tables as one DataFrame."""
    import pandas as pd

    return pd.concat([pd.read_csv(path, sep="\t") for path in paths], ignore_index=True)
