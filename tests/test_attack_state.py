"""Every reader of a stored adversarial set verifies it the same way (robustness.verify_set via read_set), and the
state of the attack jobs follows the weights and settings of their models, not the timings of their training
(issue 21, items 3, 8 and 9). The stage is tests/tiny_attack.py's."""

import numpy as np
import pytest

import tiny_attack
from diffrobust import models, training
from diffrobust.stages import rdc, robustness
from tiny_attack import SETTINGS, read, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tiny_attack.make_project(tmp_path_factory.mktemp("state"))
    run(root, root / "dc", defense="dc")  # the set RDC's sweep reads: checks.attack against dc
    return root


def _out_of_budget_copy(root, tmp_path):
    """The dc set with values in [-3, 4] written into x_adv (the probe's reproduction)."""
    arrays = dict(np.load(root / "dc/shard0.npz"))
    arrays["x_adv"] = np.random.default_rng(0).uniform(-3, 4, arrays["x_adv"].shape).astype(np.float32)
    path = tmp_path / "attacks/dc/standard/linf/shard0.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **arrays)
    return path


READERS = {
    "sigma sweep": lambda root, path, out: rdc.sigma_sweep(
        threat="linf", settings=SETTINGS, subset=tiny_attack.SUBSET, dataset_dir=root / "mnist", models={},
        set_paths=[path], out_path=out),
    "evaluate": lambda root, path, out: robustness.evaluate_set(
        build=tiny_attack.build, defense="undefended", threat="linf", set_paths=[path], settings=SETTINGS,
        dataset_dir=root / "mnist", models={"classifier": str(root / "classifier.pt")}, out_path=out),
    "table": lambda root, path, out: robustness.load_sets(
        path.parents[4], [("dc", "standard")], [0], "linf", settings=SETTINGS, dataset_dir=root / "mnist"),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_set_outside_its_budget(project, tmp_path, reader):
    tampered = _out_of_budget_copy(project, tmp_path)
    out = tmp_path / "out.tsv"
    with pytest.raises(robustness.SetError, match=rf"{tampered}: x_adv outside \[0, 1\].*delete it and rerun"):
        READERS[reader](project, tampered, out)
    assert not out.exists()


def test_the_untampered_set_reads_back_as_it_was_written(project):
    stored = read(project, project / "dc/shard0.npz", defense="dc", attack="standard")
    assert stored["idx"].tolist() == list(range(6)) and stored["x_adv"].shape == (6, 1, 32, 32)
    assert stored["identity"]["settings"]["eps"] == 0.1 and "indices" not in stored["identity"]["settings"]
    with pytest.raises(robustness.SetError, match="made by another run.*settings.defense"):
        read(project, project / "dc/shard0.npz", defense="undefended")
    with pytest.raises(robustness.SetError, match="made by another run.*settings.eps: 0.1 -> 0.05"):
        read(project, project / "dc/shard0.npz",
             settings={**SETTINGS, "threats": {"linf": {**SETTINGS["threats"]["linf"], "eps": 0.05}}})


def test_a_damaged_transfer_evaluation_is_named(project, tmp_path):
    path = tmp_path / "evaluations/dc/from-undefended/standard/linf.npz"
    robustness.evaluate_set(build=tiny_attack.build, defense="dc", threat="linf",
                            set_paths=[project / "dc/shard0.npz"], settings=SETTINGS,
                            dataset_dir=project / "mnist", models={"classifier": str(project / "classifier.pt")},
                            out_path=path)
    loaded = robustness.load_transfer(tmp_path, "dc", "standard", "linf", dataset_dir=project / "mnist")
    assert loaded["idx"].tolist() == list(range(6))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(robustness.SetError, match=rf"{path}: damaged.*delete it and rerun the evaluate job"):
        robustness.load_transfer(tmp_path, "dc", "standard", "linf", dataset_dir=project / "mnist")


# Retraining a model to the same weights must leave its file, and so the state of every job that read it, as it was.
CLASSIFIER = dict(architecture=tiny_attack.RESNET, epochs=0.004, batch_size=8, lr=0.05, seed=3, augment=True,
                  max_shift=1, log_every=1)
DIFFUSION = dict(architecture={"family": "adm_unet", "config": {"num_channels": 32, "num_res_blocks": 1,
                                                                 "channel_mult": "1", "attention_resolutions": "",
                                                                 "num_heads": 1}},
                 schedule="linear", num_timesteps=50, steps=2, batch_size=4, lr=1e-3, ema_decay=0.9,
                 label_dropout=0.3, seed=0, log_every=1, warmup_steps=1)


def test_two_trainings_with_one_seed_write_byte_identical_model_files(project, tmp_path):
    first = training.train_classifier(project / "mnist", tmp_path / "a", **CLASSIFIER)
    training.train_classifier(project / "mnist", tmp_path / "b", **CLASSIFIER)
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    assert first.extra["device"]["device"] == "cpu" and first.extra["seconds"] >= 0  # the run record's facts
    stored = models.load_model(tmp_path / "a/model.pt").extra
    assert "seconds" not in stored and "device" not in stored and "seconds" not in stored["metrics"]
    training.train_diffusion(project / "mnist", tmp_path / "c", **DIFFUSION)
    training.train_diffusion(project / "mnist", tmp_path / "d", **DIFFUSION)
    assert (tmp_path / "c/model.pt").read_bytes() == (tmp_path / "d/model.pt").read_bytes()


def test_an_attack_resumes_after_its_classifier_is_retrained_to_the_same_weights(project, tmp_path, monkeypatch):
    model = tmp_path / "classifier/model.pt"
    training.train_classifier(project / "mnist", model.parent, **CLASSIFIER)
    real = robustness._attack_batch
    state = {"calls": 0, "stop_after": 2}

    def killed_after_two_batches(*args, **kwargs):
        if state["calls"] == state["stop_after"]:
            raise KeyboardInterrupt("killed")
        state["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(robustness, "_attack_batch", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(project, tmp_path / "job", classifier=model)
    stamp = model.stat().st_mtime_ns
    training.train_classifier(project / "mnist", model.parent, **CLASSIFIER)  # a rerun of the training job
    assert model.stat().st_mtime_ns != stamp
    state.update(calls=0, stop_after=None)
    run(project, tmp_path / "job", classifier=model)
    assert state["calls"] == 1  # the two kept batches were resumed, not recomputed
    assert not (tmp_path / "job/work0.stale").exists()
