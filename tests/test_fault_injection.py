"""Fault injection over the attack stage (issue 21): a job killed mid-shard, a damaged work batch, a work batch
copied in from another run, a tampered stored set and a changed subset or dataset each end in the set a clean run
makes (every array but the seconds) or in one clear refusal naming the file, never in a set or table built on wrong
data. The stage is tests/tiny_attack.py's (a random small ResNet, eot_pgd of 2-3 steps, 3 batches per shard)."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_attack
from diffrobust.stages import robustness
from tiny_attack import SETTINGS, assert_same_set, read, run

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project and the set a clean run of `standard` makes on shard 0."""
    root = tiny_attack.make_project(tmp_path_factory.mktemp("faults"))
    run(root, root / "clean")
    return root, read(root, root / "clean/shard0.npz")


@pytest.fixture
def counted(monkeypatch):
    """The dataset index of the first image of every batch the attack job computes (not resumes)."""
    real, calls = robustness._attack_batch, []
    monkeypatch.setattr(robustness, "_attack_batch", lambda *a, **k: calls.append(int(a[3][0])) or real(*a, **k))
    return calls


KILLED_JOB = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import tiny_attack
from diffrobust.stages import robustness
real = robustness._attack_batch
def hangs_after_the_first_batch(*args, **kwargs):
    if int(args[3][0]) != 0:
        time.sleep(600)  # the test kills the job here, with batch 0 on disk
    return real(*args, **kwargs)
robustness._attack_batch = hangs_after_the_first_batch
tiny_attack.run(Path({root!r}), Path({out!r}))
"""


def test_a_job_killed_mid_shard_resumes_to_the_clean_set(project, tmp_path, counted):
    root, clean = project
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB.format(tests=str(TESTS), root=str(root),
                                                                     out=str(tmp_path))], env=env)
    first = tmp_path / "work0/batch000000.npz"
    deadline = time.monotonic() + 300
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the second batch's hang
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert first.exists() and not (tmp_path / "shard0.npz").exists()
    assert sorted(p.name for p in (tmp_path / "work0").iterdir()) == ["batch000000.npz", "identity.json"]
    stamp = first.stat().st_mtime_ns
    run(root, tmp_path)
    assert counted == [2, 4]  # only the two unfinished batches ran (batches of 2 of the images 0..5)
    assert first.stat().st_mtime_ns == stamp
    assert_same_set(read(root, tmp_path / "shard0.npz"), clean)


def _finished_run(root, out, **kwargs):
    """A finished run whose output is then removed: what a rerun of the job finds."""
    run(root, out, **kwargs)
    (out / "shard0.npz").unlink()
    return out / "work0"


def test_a_damaged_work_batch_is_moved_aside_and_recomputed(project, tmp_path, counted, caplog):
    root, clean = project
    work = _finished_run(root, tmp_path)
    batch = work / "batch000002.npz"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    counted.clear()
    with caplog.at_level(logging.WARNING):
        run(root, tmp_path)
    assert counted == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(batch) in warnings[0] and "damaged" in warnings[0]
    assert (work / "batch000002.npz.stale").exists()
    assert_same_set(read(root, tmp_path / "shard0.npz"), clean)


@pytest.mark.parametrize("source", ["another attack's batch", "another batch of this run"])
def test_a_foreign_work_batch_is_moved_aside_and_recomputed(project, tmp_path, counted, caplog, source):
    root, clean = project
    work = _finished_run(root, tmp_path / "standard")
    if source == "another attack's batch":  # the probe: bpda_eot's batch 2 copied into standard's work folder
        other = _finished_run(root, tmp_path / "bpda_eot", attack="bpda_eot")
        shutil.copy(other / "batch000002.npz", work / "batch000002.npz")
        reason = "made by another run"
    else:  # same run, other images: batch 0 copied over batch 2
        shutil.copy(work / "batch000000.npz", work / "batch000002.npz")
        reason = "holds the images [0, 1]"
    counted.clear()
    with caplog.at_level(logging.WARNING):
        run(root, tmp_path / "standard")
    assert counted == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "batch000002.npz" in warnings[0] and reason in warnings[0]
    assert_same_set(read(root, tmp_path / "standard/shard0.npz"), clean)


def _tamper(arrays, how, root):
    if how == "x_adv in [-3, 4]":  # the probe's numbers
        arrays["x_adv"] = np.random.default_rng(0).uniform(-3, 4, arrays["x_adv"].shape).astype(np.float32)
    elif how == "x_adv outside the ball, inside [0, 1]":
        arrays["x_adv"] = np.clip(arrays["x_adv"] + 0.2, 0, 1).astype(np.float32)
    elif how == "x_adv not finite":
        arrays["x_adv"][0, 0, 0, 0] = np.nan
    elif how == "labels changed":
        arrays["label"] = (arrays["label"] + 1) % 10
    elif how == "indices changed":
        arrays["idx"] = arrays["idx"][::-1].copy()
    elif how == "another attack's set":
        return dict(np.load(root / "bpda/shard0.npz"))
    elif how == "a row missing":
        arrays["adv_correct"] = arrays["adv_correct"][:-1]
    return arrays


TAMPERINGS = ["x_adv in [-3, 4]", "x_adv outside the ball, inside [0, 1]", "x_adv not finite", "labels changed",
              "indices changed", "another attack's set", "a row missing", "truncated"]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_tampered_stored_set_is_refused_by_the_table(project, tmp_path, how):
    root, _ = project
    if not (root / "bpda/shard0.npz").exists():
        run(root, root / "bpda", attack="bpda_eot")
    stored = tmp_path / "attacks/undefended/standard/linf/shard0.npz"
    stored.parent.mkdir(parents=True)
    if how == "truncated":
        data = (root / "clean/shard0.npz").read_bytes()
        stored.write_bytes(data[: len(data) // 3])
    else:
        np.savez(stored, **_tamper(dict(np.load(root / "clean/shard0.npz")), how, root))
    with pytest.raises(robustness.SetError, match=rf"{stored}.*delete it and rerun the job that makes it"):
        robustness.load_sets(tmp_path, [("undefended", "standard")], [0], "linf", settings=SETTINGS,
                             dataset_dir=root / "mnist")


def test_a_changed_subset_moves_the_work_aside_and_makes_the_new_subsets_set(project, tmp_path):
    root, _ = project
    changed = {"n": 4, "seeds": [1]}  # the probe: "4 outside the linf ball ... a bug of the attack" until deleted
    run(root, tmp_path / "job")
    run(root, tmp_path / "job", subset=changed)
    assert (tmp_path / "job/work0.stale").is_dir()
    run(root, tmp_path / "fresh", subset=changed)
    new = read(root, tmp_path / "job/shard0.npz")
    assert_same_set(new, read(root, tmp_path / "fresh/shard0.npz"))
    assert sorted(new["idx"]) != list(range(4))


def test_a_changed_dataset_moves_the_work_aside(project, tmp_path):
    root, _ = project
    other = tmp_path / "other"
    shutil.copytree(root / "mnist", other / "mnist")
    shutil.copy(root / "classifier.pt", other / "classifier.pt")
    arrays = dict(np.load(other / "mnist/splits.npz"))
    position = int(np.flatnonzero(arrays["test_indices"] == 1)[0])
    arrays["test_images"][position] = 255 - arrays["test_images"][position]  # image 1: same index, same label
    np.savez(other / "mnist/splits.npz", **arrays)
    work = _finished_run(root, tmp_path / "job")
    run(other, tmp_path / "job", classifier=root / "classifier.pt")
    assert (tmp_path / "job/work0.stale").is_dir() and work.is_dir()
    run(other, tmp_path / "fresh")
    assert_same_set(read(other, tmp_path / "job/shard0.npz"), read(other, tmp_path / "fresh/shard0.npz"))
