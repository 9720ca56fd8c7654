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
from diffrobust.device import OnDevice, check_compile, resolve_device
from diffrobust.device import describe as describe_device
from diffrobust.errors import DiffrobustError
from diffrobust.io import atomic_path
from diffrobust.models import classifier as as_classifier
from diffrobust.models import eps_model, load_source, source_files
from diffrobust.networks.pretrained import set_preprocess
from diffrobust.stages import plan

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
    """Certification shards of the densepure subset (plan.num_shards, the DAG's torch-free definition)."""
    return plan.num_shards(subset_spec, split_size, shard_size, name="densepure")


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


def labeler_settings(method, chosen, precisions, compiles=None):
    """The settings that decide a method's per-draw labels (what a label file's identity records): the method's
    `method_settings`, the networks' precisions, their torch.compile modes where not "none" (compiled kernels round
    differently; eager runs keep the identity they had before the option existed) and the labeler's code version.

    Not included, because labels do not depend on them: alpha (re-certification only), shard_size, radii, the vote
    ablation, the other sigmas (each sigma has its own folders). The models enter the identity as file digests.
    The networks' precisions are included (fp16 changes labels); the device is not (the same seeds give the same
    draws on every device, and a GPU's float rounding changes few labels: `diffrobust gpu-check` measures it), so a
    shard started on one device may be finished on another."""
    compiled = {role: mode for role, mode in (compiles or {}).items() if mode != "none"}
    return {"method": method, **chosen, "precisions": precisions, **({"compile": compiled} if compiled else {}),
            "labeler_version": LABELER_VERSION}


def build_labeler(diffusion_loaded, classifier_loaded, sigma, *, tstar_rule, reverse, num_steps=None, votes=1,
                  classifier_preprocess="carlini", device="cpu", precisions=None, compiles=None):
    """The base labeler randomized smoothing queries: denoise x + σε at the t* of `tstar_rule`, with `reverse`
    (one_shot = DDS; respaced / full / ddim with `num_steps` = DensePure), classify, `votes` runs per draw. The
    networks run on `device` at their `precisions` ({"diffusion": ..., "classifier": ...}, default fp32), through
    torch.compile with their `compiles` modes (same keys, default "none"). Returns (labeler, denoiser)."""
    precisions, compiles = precisions or {}, compiles or {}
    eps = OnDevice(eps_model(diffusion_loaded, unconditional=True), device, precisions.get("diffusion", "fp32"),
                   compiles.get("diffusion", "none"))
    network = set_preprocess(as_classifier(classifier_loaded), classifier_loaded.architecture, classifier_preprocess)
    classify = OnDevice(network, device, precisions.get("classifier", "fp32"), compiles.get("classifier", "none"))
    denoiser = SmoothingDenoiser(eps, diffusion_loaded.diffusion, sigma, tstar_rule=tstar_rule, reverse=reverse,
                                 num_steps=num_steps)
    return VotingLabeler(denoiser, classify, votes), denoiser


def run_shard(*, method, settings, sigma, dataset_dir, subset, shard, diffusion, classifier, work_dir, out_tsv,
              out_labels, device="cpu", precisions=None, compiles=None, progress=True):
    """Certify one shard of images; resumable through `work_dir`; outputs written only when the shard is done.
    The networks and images go to `device` ("auto", "cpu", "cuda[:N]"); `precisions` and `compiles` as in
    `build_labeler`.

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
    compiles = {"diffusion": "none", "classifier": "none", **(compiles or {})}
    for role, mode in compiles.items():  # refused before the models load
        check_compile(mode, device, key=f"models.{role}.compile")
    method_kwargs = method_settings(method, settings)
    labeler, denoiser = build_labeler(load_source(diffusion, device=device), load_source(classifier, device=device),
                                      sigma, **method_kwargs, device=device, precisions=precisions,
                                      compiles=compiles)
    work_dir = Path(work_dir)
    label_settings = labeler_settings(method, method_kwargs, precisions, compiles)
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
            "labels_identity": resumable.identity_digest(identity), "device": describe_device(device, precisions),
            "compile": compiles}


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


# ---------------------------------------------------------------------------------------------------------------
# The claims (DensePure Table 1 and the summary report)
# ---------------------------------------------------------------------------------------------------------------

PAPER = "DensePure / DDS"
REPORT = "densepure_table1"


def merged_table(results_dir, method, sigma, k):
    """The merged certification table of `method` at `sigma` with `k` votes under `results_dir`
    (results/<preset>/densepure), as certify.read_certification_tsv reads it."""
    return certify.read_certification_tsv(f"{results_dir}/{method}/sigma{sigma}/votes{k}.tsv")


def comparison(table, sigmas, radii, votes):
    """DensePure (K = `votes`) minus DDS in certified accuracy per sigma and radius on the same images, with the
    paired 95% interval of certify.paired_certified_difference. `table(method, sigma, k)` gives a merged table.
    Rows: sigma, radius, a (DDS), b (DensePure), difference, ci_low, ci_high, images."""
    return [{"sigma": sigma, "radius": radius,
             **certify.paired_certified_difference(table("dds", sigma, 1), table("densepure", sigma, votes), radius)}
            for sigma in sigmas for radius in radii]


def correct_by_either(dds, dense):
    """Per image of two merged tables on the same images (paired by idx): classified correctly (predict == label, not
    abstained) by DDS or by DensePure, the evidence a comparison of their certified accuracies rests on (0 >= 0 on
    images that neither gets right says nothing)."""
    import pandas as pd

    a, b = (pd.DataFrame(rows).set_index("idx") for rows in (dds, dense))
    b = b.loc[a.index]
    return ((a["predict"] == a["label"]) | (b["predict"] == b["label"])).to_numpy()


def _certified(frame, radius, order):
    frame = frame.set_index("idx").loc[order]
    return ((frame["predict"] == frame["label"]) & (frame["radius"] >= radius)).to_numpy(dtype=float)


def mean_gain(table, sigmas, radii, votes):
    """DensePure minus DDS averaged over every sigma and radius of the table: per image, the mean of its certified
    outcomes over the cells, then attacks.masking.paired_difference over images ({'difference', 'ci_low', ...})."""
    from diffrobust.attacks.masking import paired_difference

    order = table("dds", sigmas[0], 1)["idx"].to_numpy()
    cells = [(_certified(table("dds", sigma, 1), radius, order),
              _certified(table("densepure", sigma, votes), radius, order)) for sigma in sigmas for radius in radii]
    return paired_difference(np.mean([a for a, _ in cells], axis=0), np.mean([b for _, b in cells], axis=0))


def _published_cell(paper, sigma, radius):
    """DensePure's published certified accuracy at (sigma, radius), or None (published_values.yaml entries)."""
    for entry in (paper or {}).get("entries", []):
        if entry["method"] == "densepure" and entry["sigma"] == sigma and radius in entry["values"]:
            return entry
    return None


def claims(table, *, sigmas, radii, votes, n, alpha, dataset, known):
    """The claims of DensePure Table 1 as diffrobust.claims.Claim rows: DensePure >= DDS in every cell (holds when
    the paired interval is >= 0, fails when it is below 0, inconclusive beyond the largest radius N draws can
    certify), and the headline numbers at paper scale: DensePure's average gain and Carlini et al.'s 71%."""
    from diffrobust import claims as c

    paper = known["densepure_table1"].get(dataset)
    cells_unknown = paper["unknown"] if paper else (f"no published values for {dataset} (the papers evaluate "
                                                    "CIFAR-10 and ImageNet)")
    gain = known["headlines"]["densepure"]
    ceiling = certify.max_certifiable_radius(1.0, n, alpha)
    link = c.anchor(REPORT, "Does DensePure match or beat DDS?")
    rows = []
    for row in comparison(table, sigmas, radii, votes):
        sigma, radius = row["sigma"], row["radius"]
        entry = _published_cell(paper, sigma, radius)
        ours = (f"DensePure {row['b']:.3f} − DDS {row['a']:.3f} = "
                f"{c.interval_text(row['difference'], row['ci_low'], row['ci_high'], signed=True)} "
                f"({row['images']} images, paired)")
        if radius > ceiling * sigma:
            verdict = c.INCONCLUSIVE
            ours += f"; no radius above {ceiling * sigma:.2f} can be certified with N = {n}"
        else:
            verdict = c.at_least(row["ci_low"], row["ci_high"])
        verdict, ours = c.on_evidence(verdict, ours, {"DensePure or DDS": correct_by_either(
            table("dds", sigma, 1), table("densepure", sigma, votes))})
        rows.append(c.Claim(
            PAPER, f"DensePure (K = {votes}) ≥ DDS in certified accuracy at sigma {sigma:g}, radius {radius:g}",
            f"DensePure {entry['values'][radius]}" if entry else c.NOT_KNOWN,
            f"claim: {c.provenance(gain)} ('consistently better'); cell: "
            + (c.provenance(entry) if entry else cells_unknown),
            ours, row["difference"], row["ci_low"], row["ci_high"], verdict, link))
    return rows + headline_claims(table, sigmas=sigmas, radii=radii, votes=votes, dataset=dataset, known=known)


def headline_claims(table, *, sigmas, radii, votes, dataset, known):
    """DensePure's "+7% on average" (ImageNet) and Carlini et al.'s 71% certified at radius 0.5 (ImageNet) at paper
    scale: holds when the published value lies inside our 95% interval; not run on any other dataset."""
    from diffrobust import claims as c

    gain = known["headlines"]["densepure"]
    dds = next(e for e in known["densepure_table1"][gain["dataset"]]["entries"] if e.get("headline"))
    radius, value = next(iter(dds["values"].items()))
    link = c.anchor(REPORT, "Table 1 (ours)")
    gain_claim = f"DensePure improves certified accuracy over existing methods by {gain['value']:.0%} on average"
    dds_claim = f"DDS (Carlini et al.) certifies {value:.0%} of ImageNet at l2 radius {radius:g} (best sigma)"
    published = {"gain": f"+{gain['value']:.2f} ({gain['dataset']})", "dds": f"{value:.2f} ({gain['dataset']})"}
    if dataset != gain["dataset"]:
        why = f"the paper-scale number is for {gain['dataset']} (preset {gain['dataset']})"
        return [c.not_run(PAPER, gain_claim, published["gain"], c.provenance(gain), why, link),
                c.not_run(PAPER, dds_claim, published["dds"], c.provenance(dds), why, link)]
    mean = mean_gain(table, sigmas, radii, votes)
    best = max((certify.certified_accuracy(table("dds", sigma, 1), [radius]).iloc[0] for sigma in sigmas),
               key=lambda row: row["accuracy"])
    return [
        c.Claim(PAPER, gain_claim, published["gain"], c.provenance(gain) + "; ours is against DDS only, averaged "
                "over every sigma and radius of Table 1",
                f"DensePure − DDS = {c.interval_text(mean['difference'], mean['ci_low'], mean['ci_high'], True)} "
                f"({mean['images']} images, paired)", mean["difference"], mean["ci_low"], mean["ci_high"],
                c.reproduces(gain["value"], mean["ci_low"], mean["ci_high"]), link, headline=True),
        c.Claim(PAPER, dds_claim, published["dds"], c.provenance(dds),
                f"DDS {c.interval_text(best['accuracy'], best['ci_low'], best['ci_high'])} at radius {radius:g} "
                f"({int(best['images'])} images, the best of sigma {', '.join(f'{s:g}' for s in sigmas)})",
                best["accuracy"], best["ci_low"], best["ci_high"],
                c.reproduces(value, best["ci_low"], best["ci_high"]), link, headline=True)]


def report_claims(parameters, known):
    """The claim rows of DensePure Table 1 from that report's notebook parameters (notebooks/densepure_table1.py)."""
    return claims(lambda method, sigma, k: merged_table(parameters["results_dir"], method, sigma, k),
                  sigmas=parameters["sigmas"], radii=parameters["radii"], votes=parameters["votes"],
                  n=parameters["settings"]["n"], alpha=parameters["settings"]["alpha"],
                  dataset=parameters["dataset"], known=known)
