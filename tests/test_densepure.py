"""DensePure / DDS certification jobs: a shard killed part-way resumes without redoing finished images, and the
K-vote merge re-certifies from the stored labels exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrobust import certify, data, densepure, models
from diffrobust.networks.classifiers import build_small_resnet

SETTINGS = {"n0": 4, "n": 48, "alpha": 0.05, "batch_size": 64, "shard_size": 6, "seed": 0, "tstar_rule": "nearest",
            "dds_tstar_rule": "first_at_least", "reverse": "respaced", "num_steps": 2, "votes": 2,
            "vote_ablation": [1, 2], "sigmas": [0.5], "radii": [0.0]}
SUBSET = {"start": 0, "stop": 12, "step": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 20-image MNIST test split and random-weight models (certification does not care how good they are)."""
    root = tmp_path_factory.mktemp("densepure")
    data.prepare_mnist(root / "mnist", test_per_class=2)
    torch.manual_seed(0)
    unet = {"family": "adm_unet", "config": {"in_channels": 1, "image_size": 32, "num_channels": 32,
                                             "num_res_blocks": 1, "channel_mult": "1,1", "attention_resolutions": "16",
                                             "num_head_channels": 32, "class_cond": True, "num_classes": 11}}
    models.save_model(root / "diffusion.pt", models.build_architecture(unet), kind="diffusion", architecture=unet,
                      diffusion=models.diffusion_settings("linear", 1000, null_class=10))
    resnet = {"family": "small_resnet", "config": {"in_channels": 1, "num_classes": 10, "width": 8, "depth": 8}}
    models.save_model(root / "classifier.pt", build_small_resnet(resnet["config"]), kind="classifier",
                      architecture=resnet)
    return root


def _command(root, out):
    return [sys.executable, "-m", "diffrobust", "certify-shard", "--method", "densepure", "--sigma", "0.5",
            "--shard", "0", "--settings", json.dumps(SETTINGS), "--subset", json.dumps(SUBSET),
            "--dataset-dir", str(root / "mnist"), "--diffusion", str(root / "diffusion.pt"),
            "--classifier", str(root / "classifier.pt"), "--work-dir", str(out / "work"),
            "--out-tsv", str(out / "shard0.tsv"), "--out-labels", str(out / "shard0.labels.npz")]


def _data_rows(path):
    return max(0, len(Path(path).read_text().splitlines()) - 1) if Path(path).exists() else 0


def test_killed_shard_resumes_after_its_finished_images(setup, tmp_path):
    out = tmp_path / "killed"
    job = subprocess.Popen(_command(setup, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _data_rows(out / "work/rows.tsv") < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = _data_rows(out / "work/rows.tsv")
    assert 2 <= finished < 6, "the job must be killed part-way"
    assert not (out / "shard0.tsv").exists() and not (out / "shard0.labels.npz").exists()
    label_files = sorted((out / "work/labels").glob("*.npz"))
    stamps = {path.name: path.stat().st_mtime_ns for path in label_files}

    rerun = subprocess.run(_command(setup, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(label_files)} of 6 images already certified" in rerun.stderr
    for path in label_files:  # finished images were not recomputed
        assert path.stat().st_mtime_ns == stamps[path.name]
    rows = certify.read_certification_tsv(out / "shard0.tsv")
    assert list(rows.idx) == list(range(6))

    # the same shard run without interruption gives the same certificates
    clean = tmp_path / "clean"
    assert subprocess.run(_command(setup, clean), capture_output=True).returncode == 0
    reference = certify.read_certification_tsv(clean / "shard0.tsv")
    assert rows[["idx", "predict", "radius"]].equals(reference[["idx", "predict", "radius"]])


def test_merge_with_all_votes_reproduces_the_shard_and_fewer_votes_differ_only_by_vote(setup, tmp_path):
    densepure.run_shard(method="densepure", settings={**SETTINGS, "shard_size": 3}, sigma=0.5,
                        dataset_dir=setup / "mnist", subset=SUBSET, shard=1, diffusion=setup / "diffusion.pt",
                        classifier=setup / "classifier.pt", work_dir=tmp_path / "work", out_tsv=tmp_path / "s.tsv",
                        out_labels=tmp_path / "s.npz", progress=False)
    shard = certify.read_certification_tsv(tmp_path / "s.tsv")
    assert list(shard.idx) == [3, 4, 5]
    merged = densepure.merge_bundles([tmp_path / "s.npz"], 2, 0.5, SETTINGS["alpha"], 10)
    assert [(r["idx"], r["predict"], r["radius"]) for r in merged] == list(
        zip(shard.idx, shard.predict, shard.radius))
    with np.load(tmp_path / "s.npz") as bundle:
        assert bundle["labels_n"].shape == (3, 2, SETTINGS["n"])  # images x votes x draws
        first_vote = bundle["labels_n"][:, 0]
    single = densepure.merge_bundles([tmp_path / "s.npz"], 1, 0.5, SETTINGS["alpha"], 10)
    for row, votes in zip(single, first_vote):
        counts = np.bincount(votes, minlength=10)
        assert row["predict"] in (-1, int(np.argmax(counts)))


def test_shards_partition_the_subset():
    spec = {"start": 0, "stop": 1000, "step": 20}
    assert densepure.num_shards(spec, 1000, 25) == 2
    blocks = [densepure.shard_indices(spec, 1000, s, 25) for s in range(2)]
    assert np.array_equal(np.concatenate(blocks), np.arange(0, 1000, 20))
    with pytest.raises(ValueError, match="shard 2 is empty"):
        densepure.shard_indices(spec, 1000, 2, 25)
