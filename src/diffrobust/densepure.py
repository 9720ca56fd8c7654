"""DensePure and Carlini et al. DDS as workflow jobs: one certification shard, gathering, the K-vote merge.

The pieces come from `defenses` (denoiser, K-vote labeler), `certify` (randomized smoothing) and `models` (trained
or official networks). `method` is "dds" (one-shot denoising at t*, one vote) or "densepure" (S-step reverse
from t*, K votes per noise draw on the same smoothing noise).
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch

from diffrobust import certify, data
from diffrobust.defenses import SmoothingDenoiser, VotingLabeler
from diffrobust.io import atomic_path
from diffrobust.models import classifier as as_classifier
from diffrobust.models import eps_model, load_model, load_registry_checkpoint

METHODS = ("dds", "densepure")
log = logging.getLogger(__name__)


def load_source(source):
    """A model from a file the workflow wrote (path ending in .pt) or from config/checkpoints.yaml (a name)."""
    if str(source).endswith(".pt") and Path(source).is_file():
        return load_model(source)
    return load_registry_checkpoint(source)


def shard_indices(subset_spec, split_size, shard, shard_size):
    """Dataset indices of shard `shard`: consecutive blocks of `shard_size` of the configured subset."""
    indices = data.subset_indices(subset_spec, split_size, "densepure")
    block = indices[shard * shard_size:(shard + 1) * shard_size]
    if len(block) == 0:
        raise ValueError(f"shard {shard} is empty: the subset has {len(indices)} images in shards of {shard_size}")
    return block


def num_shards(subset_spec, split_size, shard_size):
    return -(-len(data.subset_indices(subset_spec, split_size, "densepure")) // shard_size)


def build_labeler(method, settings, diffusion_loaded, classifier_loaded, sigma):
    """The base labeler randomized smoothing queries: denoise x + σε, classify; K votes for DensePure."""
    eps = eps_model(diffusion_loaded, unconditional=True)
    if method == "dds":
        denoiser = SmoothingDenoiser(eps, diffusion_loaded.diffusion, sigma, tstar_rule=settings["dds_tstar_rule"],
                                     reverse="one_shot")
        votes = 1
    elif method == "densepure":
        denoiser = SmoothingDenoiser(eps, diffusion_loaded.diffusion, sigma, tstar_rule=settings["tstar_rule"],
                                     reverse=settings["reverse"], num_steps=settings["num_steps"])
        votes = settings["votes"]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return VotingLabeler(denoiser, as_classifier(classifier_loaded), votes), denoiser


def run_shard(*, method, settings, sigma, dataset_dir, subset, shard, diffusion, classifier, work_dir, out_tsv,
              out_labels, progress=True):
    """Certify one shard of images; resumable through `work_dir`; outputs written only when the shard is done.

    work_dir holds one label file per finished image plus the running TSV (certify.certify_shard skips finished
    images on restart). out_tsv gets Cohen's columns; out_labels bundles every image's per-draw labels
    (K x n0 and K x n) for the cheap K-vote merge.
    """
    dataset = data.load_dataset(dataset_dir)
    split = dataset.eval_split
    split_size = dataset.meta.get("num_files", len(split))
    indices = shard_indices(subset, split_size, shard, settings["shard_size"])
    chosen = split.take(indices)
    labeler, denoiser = build_labeler(method, settings, load_source(diffusion), load_source(classifier), sigma)
    work_dir = Path(work_dir)
    finished = sum(certify.label_file_path(work_dir / "labels", i).exists() for i in chosen.indices)
    if finished:
        log.info("resuming: %d of %d images already certified in %s, skipping them", finished, len(indices), work_dir)
    with torch.no_grad():  # certification never needs gradients (and must not switch them off for the caller)
        rows = certify.certify_shard(
            labeler, torch.from_numpy(chosen.images).float() / 255.0, chosen.labels, chosen.indices,
            n0=settings["n0"], n=settings["n"], sigma=sigma, alpha=settings["alpha"], batch_size=settings["batch_size"],
            seed=settings["seed"], num_classes=dataset.meta["num_classes"], out_tsv=work_dir / "rows.tsv",
            out_labels_dir=work_dir / "labels", progress=progress)
    bundle_labels([certify.label_file_path(work_dir / "labels", i) for i in chosen.indices], out_labels)
    certify.write_certification_tsv(rows, out_tsv)
    return {"images": len(rows), "network_evaluations_per_draw": denoiser.network_evaluations() * labeler.votes,
            "t_star": float(denoiser.t_star), "votes": labeler.votes}


def bundle_labels(label_files, out_path):
    """One .npz with every image's idx, label, per-draw labels and seconds (stacked in shard order)."""
    records = [certify.read_label_file(path) for path in label_files]
    arrays = {
        "idx": np.array([r["idx"] for r in records], dtype=np.int64),
        "label": np.array([r["label"] for r in records], dtype=np.int64),
        "labels_n0": np.stack([r["labels_n0"] for r in records]),
        "labels_n": np.stack([r["labels_n"] for r in records]),
        "seconds": np.array([r["seconds"] for r in records], dtype=np.float64),
    }
    with atomic_path(out_path) as temp:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)


def merge_bundles(bundle_paths, k, sigma, alpha, num_classes):
    """Re-certify every image from its stored labels with a majority vote over the first k votes."""
    rows = []
    for path in bundle_paths:
        with np.load(path) as bundle:
            for i in range(len(bundle["idx"])):
                start = time.perf_counter()
                votes_n0 = certify.majority_vote(bundle["labels_n0"][i], k)
                votes_n = certify.majority_vote(bundle["labels_n"][i], k)
                predict, radius, _ = certify.certify_from_labels(votes_n0, votes_n, num_classes, sigma, alpha)
                # seconds: the labeling time of this image scaled to k votes (what a k-vote run would cost)
                seconds = float(bundle["seconds"][i]) * k / bundle["labels_n"].shape[1] + time.perf_counter() - start
                rows.append(certify.row_for(int(bundle["idx"][i]), int(bundle["label"][i]), predict, radius, seconds))
    return rows
