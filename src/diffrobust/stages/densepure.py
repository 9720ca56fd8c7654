"""DensePure and Carlini et al. DDS as workflow jobs: one certification shard, gathering, the K-vote merge.

The pieces come from `defenses` (denoiser, K-vote labeler), `certify` (randomized smoothing) and `models` (trained
or official networks). `method` is "dds" (one-shot denoising at t*, one vote) or "densepure" (S-step reverse
from t*, K votes per noise draw on the same smoothing noise).
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from diffrobust import certify, data, imagespace, resumable
from diffrobust.defenses import SmoothingDenoiser, VotingLabeler
from diffrobust.device import OnDevice, resolve_device
from diffrobust.device import describe as describe_device
from diffrobust.errors import DiffrobustError
from diffrobust.io import atomic_path
from diffrobust.models import classifier as as_classifier
from diffrobust.models import eps_model, load_source, source_files
from diffrobust.networks.pretrained import set_preprocess

METHODS = ("dds", "densepure")
# Version of the labeler's algorithm (denoiser, reverse processes, vote streams): part of the label files'
# identity. Bump it when a change to defenses/diffusion would give other labels for the same settings and models.
LABELER_VERSION = 2  # 2: vote streams from diffrobust.seeds
log = logging.getLogger(__name__)


class BundleError(DiffrobustError, ValueError):
    """Label bundles that cannot be merged into one table (mixed runs, repeated images, too few votes)."""


def shard_indices(subset_spec, split_size, shard, shard_size):
    """Dataset indices of shard `shard`: consecutive blocks of `shard_size` of the configured subset."""
    indices = data.subset_indices(subset_spec, split_size, "densepure")
    block = indices[shard * shard_size:(shard + 1) * shard_size]
    if len(block) == 0:
        raise ValueError(f"shard {shard} is empty: the subset has {len(indices)} images in shards of {shard_size}")
    return block


def num_shards(subset_spec, split_size, shard_size):
    return -(-len(data.subset_indices(subset_spec, split_size, "densepure")) // shard_size)


def method_settings(method, settings):
    """What a method takes from the densepure config block, as `build_labeler`'s keyword arguments, named as the
    papers name them: DDS is one-shot denoising at Carlini et al.'s t* with one vote; DensePure its reverse process
    from its t* with K votes. Both rows share the classifier preprocessing."""
    if method == "dds":
        chosen = {"tstar_rule": settings["dds_tstar_rule"], "reverse": "one_shot", "num_steps": None, "votes": 1}
    elif method == "densepure":
        chosen = {key: settings[key] for key in ("tstar_rule", "reverse", "num_steps", "votes")}
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return {**chosen, "classifier_preprocess": settings.get("classifier_preprocess", "carlini")}


def labeler_settings(method, chosen, precisions):
    """The settings that decide a method's per-draw labels (what a label file's identity records): the method's
    `method_settings`, the networks' precisions and the labeler's code version.

    Not included, because labels do not depend on them: alpha (re-certification only), shard_size, radii, the vote
    ablation, the other sigmas (each sigma has its own folders). The models enter the identity as file digests.
    The networks' precisions are included (fp16 changes labels); the device is not (the same seeds give the same
    draws on every device, and a GPU's float rounding changes few labels: `diffrobust gpu-check` measures it), so a
    shard started on one device may be finished on another."""
    return {"method": method, **chosen, "precisions": precisions, "labeler_version": LABELER_VERSION}


def build_labeler(diffusion_loaded, classifier_loaded, sigma, *, tstar_rule, reverse, num_steps=None, votes=1,
                  classifier_preprocess="carlini", device="cpu", precisions=None):
    """The base labeler randomized smoothing queries: denoise x + σε at the t* of `tstar_rule`, with `reverse`
    (one_shot = DDS; respaced / full / ddim with `num_steps` = DensePure), classify, `votes` runs per draw. The
    networks run on `device` at their `precisions` ({"diffusion": ..., "classifier": ...}, default fp32).
    Returns (labeler, denoiser)."""
    precisions = precisions or {}
    eps = OnDevice(eps_model(diffusion_loaded, unconditional=True), device, precisions.get("diffusion", "fp32"))
    network = set_preprocess(as_classifier(classifier_loaded), classifier_loaded.architecture, classifier_preprocess)
    classify = OnDevice(network, device, precisions.get("classifier", "fp32"))
    denoiser = SmoothingDenoiser(eps, diffusion_loaded.diffusion, sigma, tstar_rule=tstar_rule, reverse=reverse,
                                 num_steps=num_steps)
    return VotingLabeler(denoiser, classify, votes), denoiser


def run_shard(*, method, settings, sigma, dataset_dir, subset, shard, diffusion, classifier, work_dir, out_tsv,
              out_labels, device="cpu", precisions=None, progress=True):
    """Certify one shard of images; resumable through `work_dir`; outputs written only when the shard is done.
    The networks and images go to `device` ("auto", "cpu", "cuda[:N]"); `precisions` as in `build_labeler`.

    work_dir holds one label file per finished image plus the running TSV (certify.certify_shard skips finished
    images on restart). out_tsv gets Cohen's columns; out_labels bundles every image's per-draw labels
    (K x n0 and K x n) for the cheap K-vote merge.
    """
    dataset = data.load_dataset(dataset_dir)
    split = dataset.eval_split
    split_size = dataset.meta.get("num_files", len(split))
    indices = shard_indices(subset, split_size, shard, settings["shard_size"])
    chosen = split.take(indices)
    certify.check_run_settings(n0=settings["n0"], n=settings["n"], sigma=sigma, alpha=settings["alpha"],
                               batch_size=settings["batch_size"])
    device = resolve_device(device)
    precisions = {"diffusion": "fp32", "classifier": "fp32", **(precisions or {})}
    method_kwargs = method_settings(method, settings)
    labeler, denoiser = build_labeler(load_source(diffusion, device=device), load_source(classifier, device=device),
                                      sigma, **method_kwargs, device=device, precisions=precisions)
    work_dir = Path(work_dir)
    label_settings = labeler_settings(method, method_kwargs, precisions)
    inputs = {"diffusion": source_files(diffusion), "classifier": source_files(classifier)}
    with torch.no_grad():  # certification never needs gradients (and must not switch them off for the caller)
        rows = certify.certify_shard(
            labeler, imagespace.uint8_to_float(torch.from_numpy(chosen.images)).to(device), chosen.labels,
            chosen.indices,
            n0=settings["n0"], n=settings["n"], sigma=sigma, alpha=settings["alpha"], batch_size=settings["batch_size"],
            seed=settings["seed"], num_classes=dataset.meta["num_classes"], out_tsv=work_dir / "rows.tsv",
            out_labels_dir=work_dir / "labels", labeler_settings=label_settings, inputs=inputs, progress=progress)
    identity = resumable.read_identity(work_dir / "labels")["identity"]  # what certify_shard claimed the folder with
    bundle_labels([certify.label_file_path(work_dir / "labels", i) for i in chosen.indices], out_labels,
                  identity=identity, diffusion_calls_per_run=denoiser.network_evaluations(), t_star=denoiser.t_star)
    certify.write_certification_tsv(rows, out_tsv)
    return {"images": len(rows), "network_evaluations_per_draw": denoiser.network_evaluations() * labeler.votes,
            "t_star": float(denoiser.t_star), "votes": labeler.votes,
            "labels_identity": resumable.identity_digest(identity), "device": describe_device(device, precisions)}


def bundle_labels(label_files, out_path, identity=None, diffusion_calls_per_run=None, t_star=None):
    """One .npz with every image's idx, label, per-draw labels and seconds (stacked in shard order), the identity
    of the run that made them (sigma, method and every setting that decides the labels; JSON), and its cost: the
    diffusion-network calls of one reverse run and the t* it started from."""
    records = [certify.read_label_file(path) for path in label_files]
    arrays = {
        "identity": json.dumps(identity, sort_keys=True),
        "diffusion_calls_per_run": np.int64(-1 if diffusion_calls_per_run is None else diffusion_calls_per_run),
        "t_star": np.float64(np.nan if t_star is None else t_star),
        "idx": np.array([r["idx"] for r in records], dtype=np.int64),
        "label": np.array([r["label"] for r in records], dtype=np.int64),
        "labels_n0": np.stack([r["labels_n0"] for r in records]),
        "labels_n": np.stack([r["labels_n"] for r in records]),
        "seconds": np.array([r["seconds"] for r in records], dtype=np.float64),
    }
    with atomic_path(out_path) as temp:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)


def read_bundle(path):
    """A shard bundle, read once: its identity (a dict; BundleError for bundles without one) and its per-image
    records, as `certify.merge_records` takes them."""
    with np.load(path) as bundle:
        if "identity" not in bundle.files:
            raise BundleError(f"{path} records no identity (written by an older version): rerun its certify_shard job")
        records = [{"idx": int(bundle["idx"][i]), "label": int(bundle["label"][i]),
                    "labels_n0": bundle["labels_n0"][i], "labels_n": bundle["labels_n"][i],
                    "seconds": float(bundle["seconds"][i])} for i in range(len(bundle["idx"]))]
        return {"path": path, "identity": json.loads(str(bundle["identity"])), "records": records}


def check_bundles(bundles, k, sigma, method=None):
    """Refuse to merge bundles (as `read_bundle` gives them) that do not form one table: other sigmas or methods,
    mixed settings or models, an image stored twice, or fewer stored votes than k."""
    if not isinstance(k, int) or k < 1:
        raise BundleError(f"votes = {k!r}: the merge needs k >= 1")
    first, seen = bundles[0], {}
    for bundle in bundles:
        path, identity = bundle["path"], bundle["identity"]
        settings = identity["settings"]
        if not math.isclose(settings["sigma"], sigma):
            raise BundleError(f"{path} holds labels drawn at sigma {settings['sigma']}, not {sigma}")
        if method is not None and settings["labeler"]["method"] != method:
            raise BundleError(f"{path} holds {settings['labeler']['method']} labels, not {method}")
        if identity != first["identity"]:
            raise BundleError(f"{path} was made by another run than {first['path']} "
                              f"({'; '.join(resumable.differences(first['identity'], identity)[:4])}): rerun the "
                              "stale shards")
        stored_votes = min(record["labels_n"].shape[0] for record in bundle["records"])
        if k > stored_votes:
            raise BundleError(f"{k} votes asked for, {path} stores {stored_votes}: raise densepure.votes and rerun")
        for record in bundle["records"]:
            if record["idx"] in seen:
                raise BundleError(f"image {record['idx']} appears in {seen[record['idx']]} and in {path}: a bundle "
                                  "is repeated or two shards overlap")
            seen[record["idx"]] = path


def merge_bundles(bundle_paths, k, sigma, alpha, num_classes, method=None):
    """Re-certify every image of the bundles with a majority vote over the first k votes (`certify.merge_records`,
    after `check_bundles`); each bundle is read once."""
    bundles = [read_bundle(path) for path in bundle_paths]
    check_bundles(bundles, k, sigma, method)
    return certify.merge_records([record for bundle in bundles for record in bundle["records"]], k, sigma, alpha,
                                 num_classes)


def calls_per_draw(bundle_path, k):
    """Network calls per noise draw of a k-vote certification from a shard bundle: (diffusion, classifier). Each of
    the k votes is one reverse run (its diffusion calls, as the denoiser counted them for the reverse process and t*
    the shard used: S for respaced and DDIM, every step for the full chain, 1 for DDS) and one classifier call."""
    with np.load(bundle_path) as bundle:
        per_run = int(bundle["diffusion_calls_per_run"])
    if per_run < 1:
        raise BundleError(f"{bundle_path} records no network calls (written by an older version): rerun its shard")
    return per_run * k, k
