"""Randomized smoothing (Cohen et al. 2019, `locuslab/smoothing` `core.py`), generalised for DensePure's votes.

Conventions
-----------
- Images are float tensors in [0, 1], shape (N, C, H, W) (one image: (C, H, W)). The smoothing noise is sigma * N(0, I)
  added in that [0, 1] space, as in Cohen's `Smooth._sample_noise`; any rescaling (e.g. to [-1, 1] for a diffusion
  model) belongs to the base labeler.
- A *base labeler* is a callable `labeler(x_noisy, generator) -> LongTensor` returning either shape (B,), one label per
  noisy image, or (K, B), K labels per noisy image (DensePure: K reverse-diffusion runs with different reverse seeds on
  the SAME noisy input). `generator` is the labeler's own torch.Generator (CPU): a labeler that needs randomness must
  draw it from there, so that its results are reproducible and the smoothing noise does not depend on it. A labeler
  that needs a generator on another device can seed one from `generator.initial_seed()`.
- A negative label means the base labeler abstained on that draw: it counts as a draw but never as a vote for a class.
- The label of every noise draw is stored (int16, shape (K, num)), so DensePure's merge over any K' <= K votes and
  re-certification at another alpha are cheap and need no model.

Noise seeds derive from (seed, dataset index) only, so each image's draws are reproducible and do not depend on how the
images are sharded or ordered. The n0 (selection) and n (estimation) draws come from separate streams, as Cohen's
certify requires them to be independent. The draws do depend on `batch_size` (the noise is drawn one batch at a time).
"""

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrobust import resumable, seeds
from diffrobust.io import atomic_write_npz, atomic_write_text

log = logging.getLogger(__name__)

ABSTAIN = -1
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
TSV_HEADER = "\t".join(TSV_COLUMNS) + "\n"

# Streams derived from (seed, index): tags keep them apart (fixed-length spawn keys never collide).
_NOISE_N0, _NOISE_N, _LABELER_N0, _LABELER_N = range(4)
# Version of how label files are made from the settings (noise streams, file layout): part of every run's identity.
LABELS_VERSION = 2
# What must match for two runs to have drawn the same noise (so their label rows stack into votes).
_NOISE_KEYS = ("idx", "sigma", "n0", "n", "seed", "batch_size")


# ---------------------------------------------------------------------------------------------------------------------
# Base labelers and sampling


def labeler_from_classifier(model):
    """Wrap an images -> logits module into a base labeler with one label per image (argmax, no gradient)."""

    def labeler(x_noisy, generator=None):
        with torch.no_grad():
            return model(x_noisy).argmax(dim=1)

    return labeler


def _as_label_rows(labels):
    """Labeler output as a (K, B) int64 tensor on the CPU."""
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if labels.ndim == 1:
        labels = labels[None]
    if labels.ndim != 2:
        raise ValueError(f"a labeler must return labels of shape (B,) or (K, B), got {tuple(labels.shape)}")
    return labels


def sample_noise_labels(labeler, x, num, sigma, batch_size, generator, labeler_generator=None):
    """Labels of `num` noisy copies x + sigma * N(0, I): an int16 array (K, num), one column per noise draw.

    The noise comes from `generator` only (drawn on the generator's device, then moved to x's device: with a CPU
    generator the draws are the same whatever device the labeler runs on); the labeler gets `labeler_generator`, by
    default one derived from `generator`'s seed. So the noise is identical whatever the labeler does with its own stream, which
    is what lets DensePure vote over reverse seeds on the same noisy inputs."""
    x = torch.as_tensor(x)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if labeler_generator is None:
        labeler_generator = seeds.generator(generator.initial_seed(), 0, _LABELER_N0, 0)
    batches = []
    remaining = num
    while remaining > 0:
        this_batch = min(batch_size, remaining)
        noise = torch.randn((this_batch, *x.shape), generator=generator, device=generator.device, dtype=x.dtype)
        labels = _as_label_rows(labeler(x[None] + sigma * noise.to(x.device), labeler_generator))
        if labels.shape[1] != this_batch or (batches and labels.shape[0] != batches[0].shape[0]):
            raise ValueError(f"labeler returned labels of shape {tuple(labels.shape)} for a batch of {this_batch}")
        batches.append(labels)
        remaining -= this_batch
    labels = torch.cat(batches, dim=1).numpy() if batches else np.zeros((1, 0), dtype=np.int64)
    if labels.size and (labels.min() < np.iinfo(np.int16).min or labels.max() > np.iinfo(np.int16).max):
        raise ValueError("labels do not fit in int16")
    return labels.astype(np.int16)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def majority_vote(labels, k=None):
    """Per noise draw (column), the most frequent label over the first `k` rows (all rows by default).

    Ties go to the tied label that appears first in vote (reverse-seed) order: DensePure's `results/merge_results.py`
    takes `max(votes, key=votes.count)`, e.g. votes 3, 1, 3, 1 -> 3. A 1-D array is taken as a single vote per draw
    and returned as is."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    if k is not None:
        if not 1 <= k <= labels.shape[0]:
            raise ValueError(f"k = {k} votes asked for, {labels.shape[0]} stored")
        labels = labels[:k]
    # K is small (tens), so counting every row's label among all rows, O(K^2 * num), is cheap and needs no table of
    # classes (ImageNet has 1000); one row at a time keeps the memory at K * num.
    counts = np.stack([(labels == row).sum(axis=0) for row in labels])
    first_winner = np.argmax(counts == counts.max(axis=0), axis=0)  # argmax: the first row holding a top count
    return labels[first_winner, np.arange(labels.shape[1])]


def class_counts(votes, num_classes=None):
    """How many draws voted for each class; negative (abstaining) votes are not counted."""
    votes = np.asarray(votes).astype(np.int64).ravel()
    votes = votes[votes >= 0]
    if num_classes is None:
        num_classes = int(votes.max()) + 1 if votes.size else 1
    if votes.size and votes.max() >= num_classes:
        raise ValueError(f"label {votes.max()} out of range for {num_classes} classes")
    return np.bincount(votes, minlength=num_classes)


def lower_confidence_bound(n_a, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n trials.

    Equals Cohen's `proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0]` from statsmodels."""
    from scipy.stats import beta

    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def clopper_pearson_interval(k, n, confidence=0.95):
    """Two-sided exact (Clopper-Pearson) interval for k successes in n trials."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def certify_from_labels(labels_n0, labels_n, num_classes, sigma, alpha):
    """Cohen's CERTIFY from stored labels: (prediction, radius, p_a_lower); (-1, 0.0, p_a_lower) means abstain.

    Labels are one vote per draw (num,) or (K, num), in which case the majority vote per draw is taken first. The
    guess c_hat is the most frequent class over the n0 selection draws (ties to the smallest class); p_A's lower bound
    comes from the n independent estimation draws. `num_classes` may be None (then taken from the labels)."""
    from scipy.stats import norm

    selection = class_counts(majority_vote(labels_n0), num_classes)
    votes_n = majority_vote(labels_n)
    c_hat = int(np.argmax(selection))  # argmax returns the first maximum: the smallest class
    n_a = int(np.sum(votes_n == c_hat))
    p_a_lower = lower_confidence_bound(n_a, votes_n.size, alpha)
    if p_a_lower < 0.5:
        return ABSTAIN, 0.0, p_a_lower
    return c_hat, float(sigma * norm.ppf(p_a_lower)), p_a_lower


def predict_from_labels(labels, alpha, num_classes=None):
    """Cohen's PREDICT from stored labels: the top class, or -1 when a two-sided binomial test cannot tell it from the
    runner-up at level alpha (`binomtest(c1, c1 + c2, 0.5).pvalue`; SciPy 1.17 no longer has `binom_test`)."""
    from scipy.stats import binomtest

    counts = class_counts(majority_vote(labels), num_classes)
    counts = np.pad(counts, (0, max(0, 2 - counts.size)))
    top = int(np.argmax(counts))
    c1 = int(counts[top])
    c2 = int(np.max(np.delete(counts, top)))
    if c1 + c2 == 0 or binomtest(c1, c1 + c2, 0.5).pvalue > alpha:
        return ABSTAIN
    return top


def max_certifiable_radius(sigma, n, alpha):
    """The largest radius CERTIFY can return: all n draws agree, p_A lower bound = alpha^(1/n)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


# ---------------------------------------------------------------------------------------------------------------------
# One image


def certify(labeler, x, n0, n, sigma, alpha, batch_size, seed, index=0, reverse_seed=0, num_classes=None):
    """Certify one image (C, H, W): a dict with predict, radius, p_a_lower and the label arrays labels_n0 (K, n0)
    and labels_n (K, n).

    The noise streams derive from (seed, index) and the labeler's from (seed, index, reverse_seed): runs with
    different reverse seeds see the same noisy inputs, so their label rows can be stacked into votes afterwards."""
    noise_n0, noise_n = (seeds.generator(seed, index, stream, 0) for stream in (_NOISE_N0, _NOISE_N))
    labeler_n0, labeler_n = (seeds.generator(seed, index, stream, reverse_seed)
                             for stream in (_LABELER_N0, _LABELER_N))
    labels_n0 = sample_noise_labels(labeler, x, n0, sigma, batch_size, noise_n0, labeler_n0)
    labels_n = sample_noise_labels(labeler, x, n, sigma, batch_size, noise_n, labeler_n)
    predict, radius, p_a_lower = certify_from_labels(labels_n0, labels_n, num_classes, sigma, alpha)
    return {"predict": predict, "radius": radius, "p_a_lower": p_a_lower, "labels_n0": labels_n0, "labels_n": labels_n}


# ---------------------------------------------------------------------------------------------------------------------
# Sharded, resumable runs


def label_file_path(out_labels_dir, index):
    return Path(out_labels_dir) / f"{int(index):06d}.npz"


def format_row(row):
    """One TSV line. The radius is written with full precision, so rows read back equal the rows computed."""
    return (f"{int(row['idx'])}\t{int(row['label'])}\t{int(row['predict'])}\t{float(row['radius'])!r}\t"
            f"{int(row['correct'])}\t{float(row['time']):.3f}\n")


def parse_row(line):
    idx, label, predict, radius, correct, seconds = line.rstrip("\n").split("\t")
    return {"idx": int(idx), "label": int(label), "predict": int(predict), "radius": float(radius),
            "correct": int(correct), "time": float(seconds)}


def row_for(idx, label, predict, radius, seconds):
    """A result row; `correct` is this image's own 0/1, not the running total that Carlini's certify.py writes."""
    return parse_row(format_row({"idx": idx, "label": label, "predict": predict, "radius": radius,
                                 "correct": int(predict == label), "time": seconds}))


def write_certification_tsv(rows, path):
    """Write rows (dicts with Cohen's columns) as a TSV, atomically."""
    atomic_write_text(path, TSV_HEADER + "".join(format_row(row) for row in rows))


def _rebuild_tsv(out_tsv, rows):
    """Rewrite the running TSV with the rows of the finished images (atomically), naming any line of the old file
    that could not be read.

    The rows come from the label files (the state that counts), so a torn last line (killed mid-write), a garbage
    line or a row of another run cannot leak into the results; rows of other images stay out too."""
    out_tsv = Path(out_tsv)
    if out_tsv.is_file():
        lines = out_tsv.read_text(errors="replace").split("\n")
        if lines and lines[0] + "\n" != TSV_HEADER:
            log.warning("%s: no certification header; rebuilding it from the label files", out_tsv)
        for number, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                parse_row(line)
            except ValueError as error:
                log.warning("%s line %d unreadable (%r: %s); dropped, the image's row is rebuilt from its label file "
                            "or the image certified again", out_tsv, number, line[:60], error)
    atomic_write_text(out_tsv, TSV_HEADER + "".join(format_row(row) for row in rows))


def _append_row(out_tsv, row):
    with open(out_tsv, "a") as handle:
        handle.write(format_row(row))
        handle.flush()
        os.fsync(handle.fileno())


def read_label_file(path):
    """One image's stored labels and run settings (0-d arrays come back as Python scalars)."""
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    return {key: value if value.ndim else value.item() for key, value in arrays.items()}


def _usable_label_file(path, index, label, image_digest, identity, n0, n):
    """(stored record, None) if the label file at `path` is complete and belongs to this image (index, true label,
    pixels) and this run, else (None, why not). A missing file is (None, None)."""
    if not path.exists():
        return None, None
    try:
        stored = read_label_file(path)
        shapes = (stored["labels_n0"].shape[1:], stored["labels_n"].shape[1:])
        owner = (stored["idx"], stored["image"], stored["identity"], stored["label"])
    except Exception as error:  # truncated or damaged: zipfile, numpy and pickle errors all mean "unreadable"
        return None, f"unreadable ({type(error).__name__}: {error})"
    if owner[0] != index:
        return None, f"it holds the labels of image {owner[0]}, not {index}"
    if owner[1] != image_digest or owner[3] != label:
        return None, "it was computed on other pixels at this index (the dataset was prepared anew)"
    if owner[2] != identity["digest"]:
        return None, "it was written by another run (other settings, models or code)"
    if shapes != ((n0,), (n,)):
        return None, f"its label arrays have {shapes[0][0]} and {shapes[1][0]} draws, not {n0} and {n}"
    return stored, None


def check_run_settings(*, n0, n, sigma, alpha, batch_size):
    """Refuse settings that would make CERTIFY write nonsense (negative radii, inf, nan) instead of an error."""
    problems = []
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        problems.append(f"sigma = {sigma!r} must be > 0")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 0.5):
        problems.append(f"alpha = {alpha!r} must be in (0, 0.5)")
    for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{name} = {value!r} must be an integer >= 1")
    if problems:
        raise ValueError("certification settings out of range: " + "; ".join(problems))


def certify_shard(labeler, images, labels, indices, *, n0, n, sigma, alpha, batch_size, seed, num_classes,
                  out_tsv, out_labels_dir, reverse_seed=0, labeler_settings=None, inputs=None, progress=True):
    """Certify `images` (N, C, H, W) with true `labels`, whose dataset indices are `indices`; resumable.

    For each image: its label arrays go to `out_labels_dir/<index>.npz` (atomically), then one row with Cohen's columns
    `idx label predict radius correct time` is appended to `out_tsv`. One TSV per concurrently running shard; shards
    may share the label folder. Returns the rows, in input order.

    Resuming: the label folder is claimed with the run's identity (`resumable.claim_folder`): the noise settings
    (sigma, n0, n, seed, reverse seed, batch size), `labeler_settings` (everything that decides the labeler's
    labels: method, reverse process, steps, votes, code version) and the sha256 of the `inputs` files ({role:
    paths}: the models). State of another identity is moved aside and recomputed. A label file is reused only if it
    is readable and belongs to its image (index and pixels) and to this run; its row is then recomputed from the
    stored labels at the current alpha (alpha does not change labels), with no labeler call."""
    check_run_settings(n0=n0, n=n, sigma=sigma, alpha=alpha, batch_size=batch_size)
    run = {"sigma": float(sigma), "n0": int(n0), "n": int(n), "seed": int(seed), "reverse_seed": int(reverse_seed),
           "batch_size": int(batch_size)}
    identity = resumable.claim_folder(out_labels_dir, job="certify_labels", version=LABELS_VERSION,
                                      settings={**run, "labeler": labeler_settings}, inputs=inputs,
                                      what="per-image label files")
    images = torch.as_tensor(images)
    rows, todo = {}, []
    for image, label, index in zip(images, labels, indices):
        index, label = int(index), int(label)
        path = label_file_path(out_labels_dir, index)
        image_digest = resumable.array_digest(image.detach().cpu().numpy())
        stored, problem = _usable_label_file(path, index, label, image_digest, identity, n0, n)
        if problem:
            log.warning("label file %s: %s; certifying image %d again", path, problem, index)
        if stored is None:
            todo.append((image, label, index, image_digest))
            continue
        predict, radius, _ = certify_from_labels(stored["labels_n0"], stored["labels_n"], num_classes, sigma, alpha)
        rows[index] = row_for(index, label, predict, radius, stored["seconds"])
    if rows:
        log.info("resuming: %d of %d images already certified in %s, skipping them", len(rows), len(indices),
                 out_labels_dir)
    _rebuild_tsv(out_tsv, [rows[int(index)] for index in indices if int(index) in rows])
    bar = tqdm(total=len(indices), initial=len(rows), disable=not progress, desc="certify", unit="image")
    for image, label, index, image_digest in todo:
        started = time.perf_counter()
        result = certify(labeler, image, n0, n, sigma, alpha, batch_size, seed, index=index,
                         reverse_seed=reverse_seed, num_classes=num_classes)
        seconds = time.perf_counter() - started
        atomic_write_npz(label_file_path(out_labels_dir, index),
                         {"idx": index, "label": label, "image": image_digest, "identity": identity["digest"],
                          "labels_n0": result["labels_n0"], "labels_n": result["labels_n"], "seconds": seconds,
                          **run})
        rows[index] = row_for(index, label, result["predict"], result["radius"], seconds)
        _append_row(out_tsv, rows[index])
        bar.update()
    bar.close()
    return [rows[int(index)] for index in indices]


def _stack_label_files(paths):
    """One image's label files from runs with different reverse seeds, stacked along the vote axis."""
    stored = [read_label_file(path) for path in paths]
    first = stored[0]
    for other, path in zip(stored[1:], paths[1:]):
        if any(other[key] != first[key] for key in _NOISE_KEYS):
            raise ValueError(f"{path} does not hold the same image and noise as {paths[0]}")
    if len({entry["reverse_seed"] for entry in stored}) != len(stored):
        raise ValueError(f"label files {list(map(str, paths))} repeat a reverse seed: their votes are not independent")
    return {**first,
            "labels_n0": np.concatenate([entry["labels_n0"] for entry in stored]),
            "labels_n": np.concatenate([entry["labels_n"] for entry in stored]),
            "seconds": sum(entry["seconds"] for entry in stored)}


def merge_records(records, k, sigma, alpha, num_classes):
    """DensePure's merge: re-certify every image from its stored labels with a majority vote over the first k vote
    rows per noise draw, without a model; k = 1 is Carlini's DDS (one reverse run). The one K-vote merge of the
    project (label files and shard bundles both come here).

    records: per image, a dict with idx, label, labels_n0 (K, n0), labels_n (K, n) and seconds (the labeling time
    of all K stored votes). The `time` column is that time scaled to k votes: what a k-vote run would have cost."""
    rows = []
    for record in records:
        stored_votes = record["labels_n"].shape[0]
        votes_n0 = majority_vote(record["labels_n0"], k)
        votes_n = majority_vote(record["labels_n"], k)
        predict, radius, _ = certify_from_labels(votes_n0, votes_n, num_classes, sigma, alpha)
        rows.append(row_for(record["idx"], record["label"], predict, radius,
                            float(record["seconds"]) * k / stored_votes))
    return rows


def merge_votes(label_files, k, sigma, alpha, num_classes):
    """`merge_records` over label files: each entry of `label_files` is one image's .npz, or a list of them (runs
    with different reverse seeds, stacked in that order)."""
    records = []
    for entry in label_files:
        stored = _stack_label_files([entry] if isinstance(entry, (str, os.PathLike)) else list(entry))
        if not math.isclose(stored["sigma"], sigma):
            raise ValueError(f"image {stored['idx']}: labels drawn at sigma {stored['sigma']}, not {sigma}")
        records.append(stored)
    return merge_records(records, k, sigma, alpha, num_classes)


# ---------------------------------------------------------------------------------------------------------------------
# Analysis


def read_certification_tsv(path):
    """A certification TSV as a DataFrame, with `correct` recomputed as (predict == label).

    Carlini et al.'s certify.py writes the running total of correct predictions into `correct`, so reading that column
    as is (as Cohen's analyze.py does) would count every row after the first correct one; recomputing reads both
    Cohen's and Carlini's files right."""
    import pandas as pd

    frame = pd.read_csv(path, sep="\t")
    frame["correct"] = (frame["predict"] == frame["label"]).astype(int)
    return frame


def paired_certified_difference(rows_a, rows_b, radius, confidence=0.95):
    """Certified accuracy of b minus that of a at `radius`, on the same images (paired by idx), with a normal
    interval over images: mean of the per-image differences d_i = [b certified] - [a certified] +- z * sd(d)/sqrt(m).

    Returns {"a", "b", "difference", "ci_low", "ci_high", "images"}; the interval is nan for a single image."""
    import pandas as pd
    from scipy.stats import norm

    a, b = (pd.DataFrame(rows).set_index("idx") for rows in (rows_a, rows_b))
    if sorted(a.index) != sorted(b.index):
        raise ValueError("the two tables certify different images; pair them on the same subset")
    b = b.loc[a.index]
    certified = [((t["predict"] == t["label"]) & (t["radius"] >= radius)).astype(float) for t in (a, b)]
    diff = certified[1] - certified[0]
    images = len(diff)
    half = norm.ppf(0.5 + confidence / 2) * diff.std(ddof=1) / math.sqrt(images) if images > 1 else float("nan")
    return {"a": float(certified[0].mean()), "b": float(certified[1].mean()), "difference": float(diff.mean()),
            "ci_low": float(diff.mean() - half), "ci_high": float(diff.mean() + half), "images": images}


def certified_accuracy(rows, radii, confidence=0.95):
    """Cohen's ApproximateAccuracy: per radius r, the fraction of images with a correct prediction certified at
    radius >= r, with a two-sided Clopper-Pearson interval over images.

    `rows` is a DataFrame or a list of row dicts; correctness is taken from predict == label, never from a stored
    `correct` column (see read_certification_tsv)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    correct = (frame["predict"] == frame["label"]).to_numpy()
    radius = frame["radius"].to_numpy(dtype=float)
    table = []
    for r in radii:
        certified = int(np.sum(correct & (radius >= r)))
        low, high = clopper_pearson_interval(certified, len(frame), confidence)
        table.append({"radius": r, "accuracy": certified / len(frame), "certified": certified, "images": len(frame),
                      "ci_low": low, "ci_high": high})
    return pd.DataFrame(table)
