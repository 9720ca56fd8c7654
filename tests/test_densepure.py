"""DensePure / DDS certification jobs: a shard killed part-way resumes without redoing finished images, and the
K-vote merge re-certifies from the stored labels exactly."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrobust import certify, data, models
from diffrobust import diffusion as dp
from diffrobust.defenses import SmoothingDenoiser
from diffrobust.io import atomic_write_npz
from diffrobust.stages import densepure
from diffrobust.networks.classifiers import build_small_resnet
from helpers import tiny_mnist_project

SETTINGS = {"n0": 4, "n": 48, "alpha": 0.05, "batch_size": 64, "shard_size": 6, "seed": 0, "tstar_rule": "nearest",
            "dds_tstar_rule": "first_at_least", "reverse": "respaced", "num_steps": 2, "votes": 2,
            "vote_ablation": [1, 2], "sigmas": [0.5], "radii": [0.0]}
SUBSET = {"start": 0, "stop": 12, "step": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 20-image MNIST test split and random-weight models (certification does not care how good they are)."""
    return tiny_mnist_project(tmp_path_factory.mktemp("densepure"), attention_resolutions="16")


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


# ---------------------------------------------------------------------------------------------------------------------
# Stale state: every change that alters the labels makes a finished shard recompute; alpha does not.

SMALL = {**SETTINGS, "n0": 2, "n": 6, "batch_size": 8, "shard_size": 2}


def _shard(root, work, *, method="densepure", settings=SMALL, sigma=0.5, dataset="mnist", diffusion="diffusion.pt",
           classifier="classifier.pt", shard=0):
    work = Path(work)
    densepure.run_shard(method=method, settings=settings, sigma=sigma, dataset_dir=root / dataset, subset=SUBSET,
                        shard=shard, diffusion=root / diffusion, classifier=root / classifier, work_dir=work / "work",
                        out_tsv=work / "shard.tsv", out_labels=work / "shard.labels.npz", progress=False)
    with np.load(work / "shard.labels.npz") as bundle:
        labels = (bundle["labels_n0"], bundle["labels_n"])
    return certify.read_certification_tsv(work / "shard.tsv"), labels


@pytest.fixture(scope="module")
def variants(setup):
    """Other model files and a dataset prepared anew (other images at the same indices)."""
    torch.manual_seed(1)
    loaded = models.load_model(setup / "diffusion.pt")
    models.save_model(setup / "diffusion2.pt", models.build_architecture(loaded.architecture), kind="diffusion",
                      architecture=loaded.architecture, diffusion=loaded.diffusion_settings)
    resnet = models.load_model(setup / "classifier.pt")
    models.save_model(setup / "classifier2.pt", build_small_resnet(resnet.architecture["config"]), kind="classifier",
                      architecture=resnet.architecture)
    data.prepare_mnist(setup / "mnist_resplit", test_per_class=2, split_seed=1)
    first = data.load_dataset(setup / "mnist").eval_split.take([0, 1]).images
    assert not np.array_equal(first, data.load_dataset(setup / "mnist_resplit").eval_split.take([0, 1]).images)
    return setup


@pytest.fixture(scope="module")
def finished(variants, tmp_path_factory):
    work = tmp_path_factory.mktemp("finished")
    _shard(variants, work)
    return work


@pytest.mark.parametrize("change", [
    {"method": "dds"},
    {"settings": {**SMALL, "reverse": "ddim"}},
    {"settings": {**SMALL, "num_steps": 1}},
    {"settings": {**SMALL, "tstar_rule": "first_at_least"}},
    {"settings": {**SMALL, "votes": 3}},
    {"diffusion": "diffusion2.pt"},
    {"classifier": "classifier2.pt"},
    {"dataset": "mnist_resplit"},
], ids=["method", "reverse", "num_steps", "tstar_rule", "votes", "diffusion_file", "classifier_file", "dataset"])
def test_a_change_that_alters_the_labels_recomputes_a_finished_shard(variants, finished, tmp_path, caplog, change):
    rerun = tmp_path / "rerun"
    shutil.copytree(finished, rerun)
    with caplog.at_level("WARNING", logger="diffrobust"):
        table, labels = _shard(variants, rerun, **change)
    assert "discarding" in caplog.text or "computed on other pixels" in caplog.text, caplog.text
    fresh_table, fresh_labels = _shard(variants, tmp_path / "fresh", **change)
    assert np.array_equal(labels[0], fresh_labels[0]) and np.array_equal(labels[1], fresh_labels[1])
    assert table[["idx", "label", "predict", "radius"]].equals(fresh_table[["idx", "label", "predict", "radius"]])


def test_an_alpha_change_keeps_the_labels_and_recertifies(variants, finished, tmp_path):
    rerun = tmp_path / "rerun"
    shutil.copytree(finished, rerun)
    stamps = {path.name: path.stat().st_mtime_ns for path in (rerun / "work/labels").glob("*.npz")}
    table, labels = _shard(variants, rerun, settings={**SMALL, "alpha": 0.3})
    assert {path.name: path.stat().st_mtime_ns for path in (rerun / "work/labels").glob("*.npz")} == stamps
    fresh_table, fresh_labels = _shard(variants, tmp_path / "fresh", settings={**SMALL, "alpha": 0.3})
    assert np.array_equal(labels[1], fresh_labels[1])
    assert table[["idx", "predict", "radius"]].equals(fresh_table[["idx", "predict", "radius"]])


def test_merge_refuses_bundles_that_do_not_form_one_table(variants, finished, tmp_path):
    bundle = finished / "shard.labels.npz"
    _shard(variants, tmp_path / "second", shard=1)
    second = tmp_path / "second/shard.labels.npz"
    assert len(densepure.merge_bundles([bundle, second], 2, 0.5, 0.05, 10, method="densepure")) == 4
    _shard(variants, tmp_path / "sigma", sigma=0.25, shard=1)
    _shard(variants, tmp_path / "steps", settings={**SMALL, "num_steps": 1}, shard=1)
    _shard(variants, tmp_path / "dds", method="dds", shard=1)
    refusals = [
        (([bundle, tmp_path / "sigma/shard.labels.npz"], 2, 0.5), "drawn at sigma 0.25, not 0.5"),
        (([bundle, bundle], 2, 0.5), "image 0 appears in"),
        (([bundle], 3, 0.5), "3 votes asked for"),
        (([bundle, tmp_path / "steps/shard.labels.npz"], 2, 0.5), "settings.labeler.num_steps: 2 -> 1"),
        (([bundle, tmp_path / "dds/shard.labels.npz"], 1, 0.5), "holds dds labels, not densepure"),
    ]
    for (paths, k, sigma), message in refusals:
        with pytest.raises(densepure.BundleError, match=re.escape(message)):
            densepure.merge_bundles(paths, k, sigma, 0.05, 10, method="densepure")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffrobust", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_command_line_refuses_out_of_range_values(setup, tmp_path):
    command = _command(setup, tmp_path)
    sigma = command.index("--sigma") + 1
    negative = _cli(*command[3:sigma], "-0.5", *command[sigma + 1:])
    assert negative.returncode == 2 and "densepure.sigmas: -0.5 is less than or equal to the minimum of 0" in negative.stderr
    settings = command.index("--settings") + 1
    alpha_one = _cli(*command[3:settings], json.dumps({**SETTINGS, "alpha": 1}), *command[settings + 1:])
    assert alpha_one.returncode == 2 and "densepure.alpha: 1 is greater than or equal to the maximum of 0.5" in alpha_one.stderr
    whole_float = _cli(*command[3:settings], json.dumps({**SETTINGS, "n": 48.0}), *command[settings + 1:])
    assert whole_float.returncode == 2 and "densepure.n: 48.0 is not of type 'integer'" in whole_float.stderr
    merge = _cli("merge-votes", "--bundles", "x.npz", "--votes", "1", "--sigma", "0.5", "--alpha", "1",
                 "--dataset-dir", setup / "mnist", "--out-tsv", tmp_path / "m.tsv")
    assert merge.returncode == 2 and "densepure.alpha: 1.0 is greater than or equal to the maximum of 0.5" in merge.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "m.tsv").exists()


def test_a_missing_model_gets_the_instruction_not_a_traceback(setup, tmp_path):
    command = _command(setup, tmp_path)
    diffusion = command.index("--diffusion") + 1
    for source, instruction in (("improved_diffusion_cifar10_uncond", "download it with `snakemake --cores 1 data/checkpoints/improved_diffusion_cifar10_uncond/"),
                                ("results/x/model.pt", "model file results/x/model.pt not found. The workflow makes it: run `snakemake --cores all results/x/model.pt`"),
                                ("no_such_checkpoint", "'no_such_checkpoint' is neither a model file nor a checkpoint")):
        result = _cli(*command[3:diffusion], source, *command[diffusion + 1:], cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert instruction in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "shard0.tsv").exists()


def test_networks_run_where_and_how_they_are_told(setup, tmp_path):
    """bf16 autocast runs on the CPU, changes the recorded identity (its labels may differ) and keeps the draws'
    shapes; fp16 on the CPU and CUDA on a machine without it are refused before any work."""
    bf16 = densepure.run_shard(method="dds", settings=SMALL, sigma=0.5, dataset_dir=setup / "mnist", subset=SUBSET,
                               shard=0, diffusion=setup / "diffusion.pt", classifier=setup / "classifier.pt",
                               work_dir=tmp_path / "bf16", out_tsv=tmp_path / "bf16.tsv",
                               out_labels=tmp_path / "bf16.npz", device="cpu", precisions={"diffusion": "bf16"},
                               progress=False)
    assert bf16["device"]["device"] == "cpu" and bf16["device"]["precision"]["diffusion"] == "bf16"
    fp32_table, _ = _shard(setup, tmp_path / "fp32", method="dds")
    assert len(certify.read_certification_tsv(tmp_path / "bf16.tsv")) == len(fp32_table) == 2
    with np.load(tmp_path / "bf16.npz") as bundle:
        assert json.loads(str(bundle["identity"]))["settings"]["labeler"]["precisions"]["diffusion"] == "bf16"
    from diffrobust.device import DeviceError, cuda_available

    with pytest.raises(DeviceError, match="fp16' needs a GPU"):
        densepure.run_shard(method="dds", settings=SMALL, sigma=0.5, dataset_dir=setup / "mnist", subset=SUBSET,
                            shard=0, diffusion=setup / "diffusion.pt", classifier=setup / "classifier.pt",
                            work_dir=tmp_path / "fp16", out_tsv=tmp_path / "fp16.tsv", out_labels=tmp_path / "x.npz",
                            device="cpu", precisions={"classifier": "fp16"}, progress=False)
    # a GPU this machine does not have: any CUDA one on a CPU-only machine, one past the last elsewhere
    missing, message = (f"cuda:{torch.cuda.device_count()}", "GPU(s)") if cuda_available() else ("cuda", "no CUDA GPU")
    result = _cli(*_command(setup, tmp_path)[3:], "--device", missing)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "fp16.tsv").exists() and not (tmp_path / "shard0.tsv").exists()


def test_compiled_networks_are_part_of_the_labels_identity_and_cuda_graphs_are_refused_on_the_cpu(setup, tmp_path):
    from diffrobust.device import DeviceError

    chosen = densepure.method_settings("dds", SMALL)
    eager = densepure.labeler_settings("dds", chosen, {"diffusion": "fp32", "classifier": "fp32"},
                                       {"diffusion": "none", "classifier": "none"})
    # eager runs keep the identity they had before the option existed, so their finished shards stay valid
    assert eager == densepure.labeler_settings("dds", chosen, {"diffusion": "fp32", "classifier": "fp32"})
    compiled = densepure.labeler_settings("dds", chosen, {"diffusion": "fp32", "classifier": "fp32"},
                                          {"diffusion": "default", "classifier": "none"})
    assert compiled["compile"] == {"diffusion": "default"} and "compile" not in eager
    labeler, denoiser = densepure.build_labeler(
        models.load_model(setup / "diffusion.pt"), models.load_model(setup / "classifier.pt"), 0.5, **chosen,
        compiles={"diffusion": "default"})
    assert denoiser.eps_model.compile_mode == "default" and labeler.classifier.compile_mode == "none"
    with pytest.raises(DeviceError, match="models.classifier.compile = 'reduce-overhead' records CUDA graphs"):
        densepure.run_shard(method="dds", settings=SMALL, sigma=0.5, dataset_dir=setup / "mnist", subset=SUBSET,
                            shard=0, diffusion=setup / "diffusion.pt", classifier=setup / "classifier.pt",
                            work_dir=tmp_path / "graphs", out_tsv=tmp_path / "graphs.tsv",
                            out_labels=tmp_path / "graphs.npz", device="cpu",
                            compiles={"classifier": "reduce-overhead"}, progress=False)
    assert not (tmp_path / "graphs").exists() and not (tmp_path / "graphs.tsv").exists()


def test_cost_per_draw_counts_the_reverse_process_the_shard_ran(tmp_path):
    """The diffusion calls per draw come from the denoiser: S for the respaced chain, every step for the full one
    (not S, as a formula from the settings alone would say), times the votes."""
    schedule = dp.GaussianDiffusion.linear(1000)
    label_file = certify.label_file_path(tmp_path, 0)
    atomic_write_npz(label_file, {"idx": 0, "label": 1, "labels_n0": np.zeros((1, 2), np.int16),
                                  "labels_n": np.zeros((1, 4), np.int16), "seconds": 1.0})
    for reverse, steps, expected in (("full", None, 259), ("respaced", 10, 10), ("one_shot", None, 1)):
        denoiser = SmoothingDenoiser(lambda x, t, y=None: x, schedule, 0.5, tstar_rule="nearest", reverse=reverse,
                                     num_steps=steps)
        bundle = tmp_path / f"{reverse}.npz"
        densepure.bundle_labels([label_file], bundle, identity={}, t_star=denoiser.t_star,
                                diffusion_calls_per_run=denoiser.network_evaluations())
        assert densepure.calls_per_draw(bundle, 5) == (expected * 5, 5), reverse
