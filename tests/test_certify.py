"""Randomized smoothing: statistics against reference values, Cohen's published table, soundness on a linear classifier
whose true radius is known, DensePure's vote merge, and sharded runs that resume after a kill."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from scipy.stats import binom, binomtest

from diffrobust import certify as rs

# ---------------------------------------------------------------------------------------------------------------------
# Statistics (reference values: shared/reference/dependencies.md §5, paper_values.md §7)


@pytest.mark.parametrize("n_a, n, expected", [(990, 1000, 0.976036), (100000, 100000, 0.999931), (50, 100, 0.344798)])
def test_lower_confidence_bound_matches_reference(n_a, n, expected):
    assert round(rs.lower_confidence_bound(n_a, n, 0.001), 6) == expected


def test_lower_confidence_bound_is_the_one_sided_exact_bound():
    assert rs.lower_confidence_bound(0, 100, 0.001) == 0.0
    # statsmodels' proportion_confint(alpha=2*alpha, method="beta")[0] is the low end of the two-sided exact interval
    # at confidence 1 - 2*alpha, which scipy's binomtest also gives
    low = binomtest(730, 1000).proportion_ci(1 - 2 * 0.01, "exact").low
    assert rs.lower_confidence_bound(730, 1000, 0.01) == pytest.approx(low, rel=1e-9)


@pytest.mark.parametrize("n, ceiling", [(1000, 2.46), (10000, 3.20), (100000, 3.81)])
def test_max_certifiable_radius(n, ceiling):
    assert round(rs.max_certifiable_radius(1.0, n, 0.001), 2) == ceiling
    # it is what certify returns when every draw agrees
    assert rs.certify_from_labels(np.ones(10, int), np.ones(n, int), 2, 1.0, 0.001)[1] == pytest.approx(
        rs.max_certifiable_radius(1.0, n, 0.001))


def test_max_certifiable_radius_at_sigma_quarter():
    assert round(rs.max_certifiable_radius(0.25, 1000, 0.001), 3) == 0.616


def test_certify_from_labels_counts_and_radius():
    labels_n0 = np.array([2, 1, 1, 2, 0])  # tie between 1 and 2: the smaller class is the guess
    labels_n = np.array([1] * 990 + [2] * 10)
    predict, radius, p_a_lower = rs.certify_from_labels(labels_n0, labels_n, 3, 0.25, 0.001)
    assert predict == 1
    assert round(p_a_lower, 6) == 0.976036
    assert round(radius, 4) == 0.4945  # dependencies.md §5
    # the same counts for class 2 would not certify class 1
    assert rs.certify_from_labels(labels_n0, np.array([2] * 990 + [1] * 10), 3, 0.25, 0.001)[:2] == (-1, 0.0)


def test_certify_from_labels_abstains_below_half():
    predict, radius, p_a_lower = rs.certify_from_labels(np.zeros(10, int), np.array([0] * 50 + [1] * 50), 2, 0.5, 0.001)
    assert (predict, radius) == (-1, 0.0)
    assert round(p_a_lower, 6) == 0.344798


def test_certify_from_labels_votes_over_rows_and_ignores_abstaining_draws():
    # per column the majority of three rows is 0; a -1 draw counts as a draw, never as a vote for a class
    labels_n = np.array([[0, 0, 1, -1], [0, 1, 0, -1], [1, 0, 0, -1]]).repeat(250, axis=1)
    predict, _, p_a_lower = rs.certify_from_labels(np.zeros((3, 4), int), labels_n, 2, 0.5, 0.001)
    assert predict == 0
    assert p_a_lower == pytest.approx(rs.lower_confidence_bound(750, 1000, 0.001))


def test_predict_from_labels_binomial_test():
    assert binomtest(60, 100, 0.5).pvalue == pytest.approx(0.0569, abs=5e-5)
    labels = np.array([1] * 60 + [0] * 40)
    assert rs.predict_from_labels(labels, 0.05) == -1
    assert rs.predict_from_labels(labels, 0.06) == 1
    # the runner-up, not the total, is the comparison: 60 vs 20 (+ 20 elsewhere) is clear
    assert rs.predict_from_labels(np.array([1] * 60 + [0] * 20 + [2] * 20), 0.05) == 1
    assert rs.predict_from_labels(np.full(10, 3), 0.05) == 3  # p = 2 / 2**10
    assert rs.predict_from_labels(np.full(5, 3), 0.05) == -1  # p = 2 / 2**5 = 0.0625: five draws cannot decide


def test_majority_vote_ties_go_to_the_label_voted_first():
    labels = np.array([[2, 0, 5, 7],
                       [1, 0, 4, 7],
                       [1, 3, 4, 2]])
    assert rs.majority_vote(labels).tolist() == [1, 0, 4, 7]
    assert rs.majority_vote(labels, k=2).tolist() == [2, 0, 5, 7]  # 2-vs-1 and 5-vs-4 ties: the first vote wins
    assert rs.majority_vote(labels, k=1).tolist() == [2, 0, 5, 7]
    # DensePure's example: votes 3, 1, 3, 1 -> 3 (the smallest-label rule would say 1)
    assert rs.majority_vote(np.array([[3], [1], [3], [1]])).tolist() == [3]
    with pytest.raises(ValueError):
        rs.majority_vote(labels, k=4)


def test_majority_vote_is_densepure_max_by_count():
    """DensePure's results/merge_results.py: max(votes, key=votes.count), first maximum in vote order."""
    labels = np.random.default_rng(0).integers(0, 4, size=(6, 500)).astype(np.int16)
    expected = [max(column, key=column.count) for column in labels.T.tolist()]
    assert rs.majority_vote(labels).tolist() == expected
    smallest = scipy.stats.mode(labels, axis=0, keepdims=False).mode
    assert not np.array_equal(rs.majority_vote(labels), smallest)  # the two rules do differ on ties


# ---------------------------------------------------------------------------------------------------------------------
# Analysis: Cohen's published table, Carlini's cumulative column, intervals

COHEN_RADII = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def published_rows(markdown):
    """{sigma: [accuracy strings]} and the radii, parsed from Cohen's vary_noise_cifar10.md."""
    lines = [line for line in markdown.splitlines() if line.strip()]
    radii = [float(value) for value in re.findall(r"r = ([0-9.]+)", lines[0])]
    table = {}
    for line in lines[2:]:
        cells = [cell.replace("<b>*</b>", "").strip() for cell in line.split("|")]
        sigma = re.search(r"&sigma; = ([0-9.]+)", cells[0]).group(1)
        table[sigma] = [cell for cell in cells[1:] if cell]
    return radii, table


@pytest.mark.parametrize("sigma", ["0.25", "0.50", "1.00"])
def test_reproduces_cohen_cifar10_table(fixtures_dir, sigma):
    folder = fixtures_dir / "cohen_certify"
    radii, table = published_rows((folder / "vary_noise_cifar10.md").read_text())
    assert radii == COHEN_RADII
    rows = rs.read_certification_tsv(folder / f"cifar10_resnet110_sigma_{sigma}.tsv")
    assert len(rows) == 500
    accuracy = rs.certified_accuracy(rows, radii)
    assert [f"{value:.2f}" for value in accuracy["accuracy"]] == table[sigma]


def test_carlini_cumulative_correct_column_is_read_right(tmp_path):
    rows = pd.DataFrame({"idx": [0, 1, 2, 3, 4], "label": [3, 1, 4, 1, 5], "predict": [3, 2, 4, -1, 5],
                         "radius": [0.6, 0.9, 0.2, 0.0, 0.4], "time": [1.0] * 5})
    rows["correct"] = (rows["predict"] == rows["label"]).cumsum()  # Carlini's certify.py: running total
    path = tmp_path / "carlini.tsv"
    rows[list(rs.TSV_COLUMNS)].to_csv(path, sep="\t", index=False)
    read = rs.read_certification_tsv(path)
    assert read["correct"].tolist() == [1, 0, 1, 0, 1]
    assert rs.certified_accuracy(read, [0.0, 0.3, 0.5])["accuracy"].tolist() == [0.6, 0.4, 0.2]
    # read naively (Cohen's analyze.py), the running total makes image 1 (wrong class, radius 0.9) count
    naive = ((rows["correct"] > 0) & (rows["radius"] >= 0.5)).mean()
    assert naive == 0.4


def test_certified_accuracy_interval_is_clopper_pearson():
    rows = [{"idx": i, "label": 0, "predict": 0 if i < 7 else 1, "radius": 0.1 * i, "time": 0.0} for i in range(20)]
    table = rs.certified_accuracy(rows, [0.0, 0.35, 5.0])
    assert table["certified"].tolist() == [7, 3, 0]
    for certified, low, high in zip(table["certified"], table["ci_low"], table["ci_high"]):
        interval = binomtest(int(certified), 20).proportion_ci(0.95, "exact")
        assert (low, high) == pytest.approx((interval.low, interval.high), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


class RecordingLabeler:
    """Labels by the sign of the first pixel; records every noisy batch; optionally burns its own random stream."""

    def __init__(self, burn=0):
        self.inputs, self.burn = [], burn

    def __call__(self, x_noisy, generator):
        self.inputs.append(x_noisy.clone())
        torch.randn(self.burn, generator=generator)
        return (x_noisy.flatten(1)[:, 0] > 0.5).long()


def test_noise_is_sigma_gaussian_and_independent_of_the_labeler():
    x = torch.full((1, 2, 2), 0.5)
    quiet, greedy = RecordingLabeler(), RecordingLabeler(burn=1000)
    labels = rs.sample_noise_labels(quiet, x, 3000, 0.3, 512, torch.Generator().manual_seed(5))
    rs.sample_noise_labels(greedy, x, 3000, 0.3, 512, torch.Generator().manual_seed(5))
    assert labels.shape == (1, 3000) and labels.dtype == np.int16
    assert all(torch.equal(a, b) for a, b in zip(quiet.inputs, greedy.inputs))
    noise = torch.cat(quiet.inputs) - x
    assert [len(batch) for batch in quiet.inputs] == [512] * 5 + [440]
    assert noise.std().item() == pytest.approx(0.3, rel=0.03)  # sigma, not sigma**2 (0.09)
    assert abs(noise.mean().item()) < 0.01
    assert abs(labels.mean() - 0.5) < 0.05


def test_labeler_from_classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    labeler = rs.labeler_from_classifier(model)
    x = torch.rand(6, 1, 2, 2)
    labels = labeler(x, torch.Generator())
    assert labels.dtype == torch.int64 and labels.shape == (6,) and not labels.requires_grad
    assert torch.equal(labels, model(x).argmax(1))


def test_reverse_seed_changes_the_labeler_stream_not_the_noise():
    def noisy_labeler(x_noisy, generator):
        return (x_noisy.flatten(1)[:, 0] + 0.5 * torch.randn(len(x_noisy), generator=generator) > 0.5).long()

    x = torch.full((1, 2, 2), 0.5)
    first = rs.certify(noisy_labeler, x, 16, 64, 0.25, 0.01, 32, seed=3, index=4, reverse_seed=0)
    again = rs.certify(noisy_labeler, x, 16, 64, 0.25, 0.01, 32, seed=3, index=4, reverse_seed=0)
    other = rs.certify(noisy_labeler, x, 16, 64, 0.25, 0.01, 32, seed=3, index=4, reverse_seed=1)
    assert np.array_equal(first["labels_n"], again["labels_n"])
    assert not np.array_equal(first["labels_n"], other["labels_n"])
    recorders = [RecordingLabeler(), RecordingLabeler(burn=7)]
    for reverse_seed, recorder in enumerate(recorders):
        rs.certify(recorder, x, 16, 64, 0.25, 0.01, 32, seed=3, index=4, reverse_seed=reverse_seed)
    assert all(torch.equal(a, b) for a, b in zip(*(recorder.inputs for recorder in recorders)))
    # the selection (n0) and estimation (n) draws are different noise, and so are two images' draws
    assert not torch.equal(recorders[0].inputs[0][:16], recorders[0].inputs[1][:16])
    another_image = RecordingLabeler()
    rs.certify(another_image, x, 16, 64, 0.25, 0.01, 32, seed=3, index=5)
    assert not torch.equal(recorders[0].inputs[0], another_image.inputs[0])


# ---------------------------------------------------------------------------------------------------------------------
# Soundness: a linear base classifier, whose smoothed classifier is the same half-space rule, so the true radius at x
# is its distance to the boundary, |w.x + b| / |w|.

W = torch.tensor([3.0, 4.0])
B = -float(W @ torch.tensor([0.5, 0.5]))  # boundary through the centre of the unit square


def linear_labeler(x_noisy, generator):
    return (x_noisy.flatten(1) @ W + B > 0).long()


def test_certified_radius_never_exceeds_the_true_radius_more_often_than_alpha():
    sigma, alpha, trials = 0.25, 0.05, 1000
    rng = np.random.default_rng(0)
    failures, certified, true = 0, [], []
    for trial in range(trials):
        # distances where p_A = Phi(d / sigma) lies between 0.54 and 0.93: the bound is often close to p_A
        distance, side = rng.uniform(0.1, 1.5) * sigma, rng.choice([-1, 1])
        x = (torch.tensor([0.5, 0.5]) + side * distance * W / W.norm()).reshape(1, 1, 2)
        out = rs.certify(linear_labeler, x, 32, 200, sigma, alpha, 256, seed=1, index=trial, num_classes=2)
        if out["predict"] != -1:
            # a certificate is wrong if it names the wrong class or claims more than the distance to the boundary
            failures += out["predict"] != int(side > 0) or out["radius"] > distance
        certified.append(out["radius"])
        true.append(distance)
    # Each certificate is wrong with probability <= alpha (Cohen et al. Prop. 2), so failures is stochastically
    # smaller than Binomial(trials, alpha); a sound implementation exceeds its 99.9% quantile (73 of 1000) with
    # probability < 0.001. Using the point estimate instead of the lower bound fails about half the time; using
    # 2*alpha (a two-sided bound misread) fails about 9% of the time, 94 of 1000.
    assert failures <= binom.ppf(0.999, trials, alpha)
    # and the certificates are not vacuous: zero radii would pass the check above trivially
    assert np.mean(certified) > 0.6 * np.mean(true)
    assert failures > 0  # the event is observable at this alpha and n (a check on the test itself)


# ---------------------------------------------------------------------------------------------------------------------
# DensePure votes


def voting_labeler(true_class, k, p_right, num_classes=3):
    """K labels per draw, each right with probability p_right, else another class at random (its own stream only)."""

    def labeler(x_noisy, generator):
        batch = len(x_noisy)
        right = torch.rand((k, batch), generator=generator) < p_right
        wrong = (true_class + 1 + torch.randint(0, num_classes - 1, (k, batch), generator=generator)) % num_classes
        return torch.where(right, torch.full_like(wrong, true_class), wrong)

    return labeler


def test_merging_more_votes_certifies_larger_radii(tmp_path):
    labels = [0, 1, 2, 1]
    files = []
    for index, true_class in enumerate(labels):
        rs.certify_shard(voting_labeler(true_class, k=9, p_right=0.6), torch.zeros(1, 1, 2, 2), [true_class], [index],
                         n0=16, n=300, sigma=0.5, alpha=0.001, batch_size=100, seed=0, num_classes=3,
                         out_tsv=tmp_path / f"shard{index}.tsv", out_labels_dir=tmp_path / "labels", progress=False)
        files.append(rs.label_file_path(tmp_path / "labels", index))
    stored = rs.read_label_file(files[0])
    assert stored["labels_n0"].shape == (9, 16) and stored["labels_n"].shape == (9, 300)
    one, nine = rs.merge_votes(files, 1, 0.5, 0.001, 3), rs.merge_votes(files, 9, 0.5, 0.001, 3)
    # a vote of 9 at 0.6 is right about 73% of the time (plus wrong votes that split), one vote 60%
    assert all(row["correct"] == 1 for row in nine)
    assert all(b["radius"] > a["radius"] for a, b in zip(one, nine))
    # k = 1 is certifying from the first row alone
    for path, row in zip(files, one):
        stored = rs.read_label_file(path)
        predict, radius, _ = rs.certify_from_labels(stored["labels_n0"][0], stored["labels_n"][0], 3, 0.5, 0.001)
        assert (row["predict"], row["radius"]) == (predict, radius)
    with pytest.raises(ValueError):
        rs.merge_votes(files, 10, 0.5, 0.001, 3)
    with pytest.raises(ValueError):
        rs.merge_votes(files, 1, 0.25, 0.001, 3)  # labels were drawn at sigma 0.5


def test_votes_from_separate_reverse_seed_runs_stack(tmp_path):
    images, labels = torch.zeros(2, 1, 2, 2), [0, 1]
    for reverse_seed in (0, 1):
        rs.certify_shard(voting_labeler(0, k=1, p_right=0.6), images, labels, [5, 6], n0=8, n=50, sigma=0.5,
                         alpha=0.01, batch_size=25, seed=2, num_classes=3, reverse_seed=reverse_seed,
                         out_tsv=tmp_path / f"r{reverse_seed}.tsv", out_labels_dir=tmp_path / f"r{reverse_seed}",
                         progress=False)
    pairs = [[tmp_path / f"r{r}" / f"{index:06d}.npz" for r in (0, 1)] for index in (5, 6)]
    stacked = rs._stack_label_files(pairs[0])
    assert stacked["labels_n"].shape == (2, 50)
    assert not np.array_equal(stacked["labels_n"][0], stacked["labels_n"][1])  # independent reverse streams
    both = rs.merge_votes(pairs, 2, 0.5, 0.01, 3)
    assert [row["idx"] for row in both] == [5, 6]
    with pytest.raises(ValueError, match="repeat a reverse seed"):
        rs.merge_votes([[pairs[0][0], pairs[0][0]]], 2, 0.5, 0.01, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded, resumable runs

SHARD_JOB = '''
"""A shard job: a noisy linear labeler on 1x2x2 images; `python job.py OUT KILL_AT_CALL` dies at that labeler call."""
import os
import sys
from pathlib import Path

import torch

from diffrobust.certify import certify_shard

WEIGHTS = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, 1.0], [0.0, -1.0, 2.0]])
IMAGES = torch.rand((6, 1, 2, 2), generator=torch.Generator().manual_seed(11))
LABELS = [0, 1, 2, 0, 1, 2]
INDICES = [0, 20, 40, 60, 80, 100]
SETTINGS = dict(n0=8, n=40, sigma=0.25, alpha=0.01, batch_size=16, seed=7, num_classes=3)
CALLS_PER_IMAGE = 1 + 3  # ceil(8 / 16) + ceil(40 / 16)


class Labeler:
    def __init__(self, kill_at_call=None):
        self.calls, self.kill_at_call = 0, kill_at_call

    def __call__(self, x_noisy, generator):
        self.calls += 1
        if self.calls == self.kill_at_call:
            os._exit(3)  # as a killed job: no cleanup, no flush
        logits = x_noisy.flatten(1) @ WEIGHTS + 0.3 * torch.randn((len(x_noisy), 3), generator=generator)
        return logits.argmax(1)


def run(out, labeler, order=None, **settings):
    order = range(len(INDICES)) if order is None else order
    return certify_shard(labeler, IMAGES[list(order)], [LABELS[i] for i in order], [INDICES[i] for i in order],
                         out_tsv=Path(out) / "certify.tsv", out_labels_dir=Path(out) / "labels",
                         **{**SETTINGS, **settings, "progress": False})


if __name__ == "__main__":
    run(sys.argv[1], Labeler(kill_at_call=int(sys.argv[2])))
'''


@pytest.fixture
def shard_job(tmp_path):
    path = tmp_path / "shard_job.py"
    path.write_text(textwrap.dedent(SHARD_JOB))
    spec = importlib.util.spec_from_file_location("shard_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def without_time(rows):
    return [{key: value for key, value in row.items() if key != "time"} for row in rows]


def stored_labels(out):
    return {path.name: (rs.read_label_file(path)["labels_n0"], rs.read_label_file(path)["labels_n"])
            for path in sorted((out / "labels").glob("*.npz"))}


def test_killed_shard_resumes_without_recomputing(tmp_path, shard_job, repo_root):
    out = tmp_path / "killed"
    finished = 3
    killed = subprocess.run([sys.executable, str(shard_job.path), str(out), str(finished * shard_job.CALLS_PER_IMAGE + 1)],
                            cwd=repo_root, capture_output=True, text=True)
    assert killed.returncode == 3, killed.stderr
    tsv = out / "certify.tsv"
    assert len(tsv.read_text().splitlines()) == 1 + finished
    with open(tsv, "a") as handle:
        handle.write("60\t0\t")  # a torn last line, as if killed mid-write
    mtimes = {path: path.stat().st_mtime_ns for path in (out / "labels").glob("*.npz")}
    assert len(mtimes) == finished

    labeler = shard_job.Labeler()
    rows = shard_job.run(out, labeler)
    assert labeler.calls == (6 - finished) * shard_job.CALLS_PER_IMAGE  # finished images are not recomputed
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    table = rs.read_certification_tsv(tsv)
    assert table["idx"].tolist() == shard_job.INDICES  # one row per image, the torn line gone
    assert table.to_dict("records") == rows

    reference = tmp_path / "uninterrupted"
    expected = shard_job.run(reference, shard_job.Labeler())
    assert without_time(rows) == without_time(expected)
    assert any(row["predict"] != -1 for row in rows) and any(row["radius"] > 0 for row in rows)
    restored, uninterrupted = stored_labels(out), stored_labels(reference)
    assert restored.keys() == uninterrupted.keys()
    assert all(np.array_equal(restored[name][0], uninterrupted[name][0]) and
               np.array_equal(restored[name][1], uninterrupted[name][1]) for name in restored)

    # a finished run does no work
    idle = shard_job.Labeler()
    assert shard_job.run(out, idle) == rows and idle.calls == 0


def test_resume_repairs_rows_and_label_files(tmp_path, shard_job):
    out = tmp_path / "run"
    rows = shard_job.run(out, shard_job.Labeler())
    tsv = out / "certify.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    # the label file of image 20 is lost (its row must go and the image be computed again), and the row of image 80
    # is lost after its label file was written (rebuilt from the file, no labeler call)
    (out / "labels" / "000020.npz").unlink()
    tsv.write_text("".join(line for line in lines if not line.startswith("80\t")))
    labeler = shard_job.Labeler()
    again = shard_job.run(out, labeler)
    assert labeler.calls == shard_job.CALLS_PER_IMAGE
    assert without_time(again) == without_time(rows)
    assert again[4] == rows[4]  # the rebuilt row keeps its recorded time
    table = rs.read_certification_tsv(tsv)
    assert sorted(table["idx"]) == shard_job.INDICES and table["idx"].is_unique


def test_alpha_change_recertifies_from_the_stored_labels(tmp_path, shard_job):
    out = tmp_path / "run"
    strict = shard_job.run(out, shard_job.Labeler())
    stamps = {path: path.stat().st_mtime_ns for path in (out / "labels").glob("*.npz")}
    labeler = shard_job.Labeler()
    loose = shard_job.run(out, labeler, alpha=0.2)
    assert labeler.calls == 0  # alpha does not change the labels: nothing is drawn again
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert without_time(loose) == without_time(shard_job.run(tmp_path / "fresh", shard_job.Labeler(), alpha=0.2))
    certified = [(a["radius"], b["radius"]) for a, b in zip(strict, loose) if a["predict"] >= 0]
    assert certified and all(b > a for a, b in certified)  # a larger alpha certifies larger radii
    assert rs.read_certification_tsv(out / "certify.tsv")["radius"].tolist() == [row["radius"] for row in loose]


@pytest.mark.parametrize("change, why", [
    ({"seed": 8}, "settings.seed: 7 -> 8"),
    ({"batch_size": 5}, "settings.batch_size: 16 -> 5"),
    ({"n": 41}, "settings.n: 40 -> 41"),
    ({"labeler_settings": {"votes": 2}}, "settings.labeler: null -> {\"votes\": 2}"),
])
def test_a_changed_setting_discards_the_stale_labels(tmp_path, shard_job, caplog, change, why):
    out = tmp_path / "run"
    shard_job.run(out, shard_job.Labeler())
    labeler = shard_job.Labeler()
    with caplog.at_level("WARNING", logger="diffrobust"):
        rows = shard_job.run(out, labeler, **change)
    assert labeler.calls > 0 and stored_labels(out)  # everything drawn again
    assert len([record for record in caplog.records if "discarding" in record.getMessage()]) == 1
    assert why in caplog.text and "labels.stale" in caplog.text
    assert (out / "labels.stale").is_dir()  # moved aside, not deleted
    fresh = shard_job.run(tmp_path / "fresh", shard_job.Labeler(), **change)
    assert without_time(rows) == without_time(fresh)
    assert stored_labels(out).keys() == stored_labels(tmp_path / "fresh").keys()
    for name, (n0, n) in stored_labels(out).items():
        assert np.array_equal(n, stored_labels(tmp_path / "fresh")[name][1])


def test_a_changed_input_file_discards_the_stale_labels(tmp_path, shard_job, caplog):
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights of one model")
    shard_job.run(tmp_path / "run", shard_job.Labeler(), inputs={"model": model})
    idle = shard_job.Labeler()
    shard_job.run(tmp_path / "run", idle, inputs={"model": model})
    assert idle.calls == 0
    os.utime(model)  # touched, same bytes (e.g. restored by DVC): rehashed and found equal, the labels are kept
    shard_job.run(tmp_path / "run", idle, inputs={"model": model})
    assert idle.calls == 0
    model.write_bytes(b"weights of a retrained model")
    labeler = shard_job.Labeler()
    with caplog.at_level("WARNING", logger="diffrobust"):
        shard_job.run(tmp_path / "run", labeler, inputs={"model": model})
    assert labeler.calls == 6 * shard_job.CALLS_PER_IMAGE
    assert "inputs.model.0" in caplog.text


def test_damaged_or_foreign_label_files_are_named_and_recomputed(tmp_path, shard_job, caplog):
    out = tmp_path / "run"
    rows = shard_job.run(out, shard_job.Labeler())
    labels = out / "labels"
    truncated = labels / "000040.npz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (labels / "000060.npz").write_bytes((labels / "000000.npz").read_bytes())  # another image's labels
    with open(out / "certify.tsv", "a") as handle:
        handle.write("garbage\tline\n")
    labeler = shard_job.Labeler()
    with caplog.at_level("WARNING", logger="diffrobust"):
        again = shard_job.run(out, labeler)
    assert labeler.calls == 2 * shard_job.CALLS_PER_IMAGE
    assert without_time(again) == without_time(rows)
    assert f"label file {truncated}: unreadable" in caplog.text
    assert "holds the labels of image 0, not 60" in caplog.text
    assert "certify.tsv line 8 unreadable" in caplog.text
    assert sorted(rs.read_certification_tsv(out / "certify.tsv")["idx"]) == shard_job.INDICES  # in finishing order


def test_a_label_file_is_tied_to_the_pixels_of_its_image(tmp_path, shard_job, caplog):
    out = tmp_path / "run"
    shard_job.run(out, shard_job.Labeler())
    labeler = shard_job.Labeler()
    other_pixels = shard_job.IMAGES.clone()
    other_pixels[1] = 1 - other_pixels[1]  # a dataset prepared anew: another image at index 20
    with caplog.at_level("WARNING", logger="diffrobust"):
        certify_shard_args = dict(shard_job.SETTINGS, progress=False)
        rs.certify_shard(labeler, other_pixels, shard_job.LABELS, shard_job.INDICES, out_tsv=out / "certify.tsv",
                         out_labels_dir=out / "labels", **certify_shard_args)
    assert labeler.calls == shard_job.CALLS_PER_IMAGE
    assert "000020.npz: it was computed on other pixels" in caplog.text


@pytest.mark.parametrize("bad, message", [
    ({"sigma": -0.5}, "sigma = -0.5 must be > 0"),
    ({"alpha": 1.0}, "alpha = 1.0 must be in (0, 0.5)"),
    ({"n": 0}, "n = 0 must be an integer >= 1"),
    ({"n0": 6.0}, "n0 = 6.0 must be an integer >= 1"),
])
def test_certify_shard_refuses_settings_out_of_range(tmp_path, shard_job, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        shard_job.run(tmp_path / "run", shard_job.Labeler(), **bad)
    assert not (tmp_path / "run").exists()


def test_same_seed_same_labels_whatever_the_sharding(tmp_path, shard_job):
    whole = shard_job.run(tmp_path / "whole", shard_job.Labeler())
    repeat = shard_job.run(tmp_path / "repeat", shard_job.Labeler())
    # two shards in another order, sharing the label folder, each with its own TSV
    second = shard_job.run(tmp_path / "split", shard_job.Labeler(), order=[5, 3, 4])
    first = rs.certify_shard(shard_job.Labeler(), shard_job.IMAGES[[2, 0, 1]], [2, 0, 1], [40, 0, 20],
                             out_tsv=tmp_path / "split" / "first.tsv", out_labels_dir=tmp_path / "split" / "labels",
                             **shard_job.SETTINGS, progress=False)
    assert without_time(whole) == without_time(repeat)
    by_index = {row["idx"]: row for row in without_time(first + second)}
    assert [by_index[row["idx"]] for row in without_time(whole)] == without_time(whole)
    labels = [stored_labels(tmp_path / name) for name in ("whole", "repeat", "split")]
    assert labels[0].keys() == labels[1].keys() == labels[2].keys() and len(labels[0]) == 6
    for name in labels[0]:
        for other in labels[1:]:
            assert np.array_equal(labels[0][name][0], other[name][0]) and np.array_equal(labels[0][name][1], other[name][1])
    # and another seed gives other draws
    shard_job.run(tmp_path / "other", shard_job.Labeler(), seed=8)
    other = stored_labels(tmp_path / "other")
    assert any(not np.array_equal(labels[0][name][1], other[name][1]) for name in other)


def test_paired_difference_of_certified_accuracy():
    a = [{"idx": i, "label": 0, "predict": p, "radius": r} for i, (p, r) in enumerate([(0, 0.5), (0, 0.3), (1, 0.9), (0, 0.1)])]
    b = [{"idx": i, "label": 0, "predict": p, "radius": r} for i, (p, r) in reversed(list(enumerate([(0, 0.6), (0, 0.1), (0, 0.4), (0, 0.2)])))]
    # at r = 0.25: a certifies images 0, 1 (image 2 is wrong, image 3 too small); b certifies 0 and 2
    paired = rs.paired_certified_difference(a, b, 0.25)
    d = np.array([0.0, -1.0, 1.0, 0.0])
    half = 1.959963984540054 * d.std(ddof=1) / 2
    assert paired["a"] == 0.5 and paired["b"] == 0.5 and paired["difference"] == 0.0 and paired["images"] == 4
    assert paired["ci_low"] == pytest.approx(-half) and paired["ci_high"] == pytest.approx(half)
    assert rs.paired_certified_difference(a, b, 0.0)["difference"] == pytest.approx(0.25)  # b's image 2 is right
    with pytest.raises(ValueError, match="different images"):
        rs.paired_certified_difference(a, b[:3], 0.0)
