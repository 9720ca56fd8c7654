"""PGD adversarial training (Madry et al.; `training.train_adversarial`, RDC's adversarial-training baseline) on a
tiny linearly separable toy: the PGD examples it trains on stay in their ball, a killed job resumes to the same
weights, the model is more robust under PGD than the plainly trained one, and the config and command around it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffrobust import cli, data, models, training
from diffrobust.attacks import pgd
from diffrobust.attacks.budget import check_inside_budget
from diffrobust.config import ConfigError, load_config
from helpers import Interrupted, interrupt_at, write_toy_dataset

BAR, BACKGROUND = (0.75, 1.0), (0.0, 0.35)


def bars(count, seed):
    """8x8 digits of two classes: a bright 6x2 bar at columns 1-2 (class 0) or 5-6 (class 1) on a dim noisy
    background. Linearly separable with an l-inf margin: bar pixels >= 0.75, background <= 0.35, so a classifier
    that reads only the bars stays right up to eps 0.2, while one that also leans on background pixels does not."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.uniform(*BACKGROUND, size=(count, 1, 8, 8))
    for i, label in enumerate(labels):
        columns = slice(1, 3) if label == 0 else slice(5, 7)
        images[i, 0, 1:7, columns] = rng.uniform(*BAR, size=(6, 2))
    return (images * 255).round().astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("bars"), bars, (("train", 64, 0), ("test", 64, 1)),
                             {"name": "bars", "num_classes": 2, "class_names": ["left", "right"]})


CLASSIFIER = dict(architecture={"family": "small_resnet", "config": {"width": 4, "depth": 8}}, batch_size=16,
                  lr=0.05, seed=0, augment="none", log_every=1)
PGD = dict(eps=0.15, step_size=0.05, steps=5)


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def losses(out_dir):
    """(step, loss) rows of loss.tsv (its seconds column is wall time)."""
    lines = (out_dir / training.LOSS_FILE).read_text().splitlines()[1:]
    return [tuple(line.split("\t")[:2]) for line in lines]


def test_pgd_stays_in_the_ball_and_the_image_range():
    torch.manual_seed(0)
    network = models.build_architecture({"family": "small_resnet",
                                         "config": {"in_channels": 1, "num_classes": 2, "width": 4}}).eval()
    x = torch.rand(6, 1, 8, 8)
    x[:, :, :2] = 0.0  # pixels at the edge of [0, 1]: the ball must be clipped there
    x[:, :, -2:] = 1.0
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    for threat, eps, step_size in (("linf", 0.1, 0.04), ("l2", 0.5, 0.2)):
        start = pgd.uniform_in_ball(x, threat, eps, torch.Generator().manual_seed(1))
        check_inside_budget(x, start, threat, eps, where=f"{threat} random start")
        x_adv = pgd.pgd(network, x, y, threat=threat, eps=eps, steps=4, step_size=step_size,
                        generator=torch.Generator().manual_seed(1))
        norms = check_inside_budget(x, x_adv, threat, eps, where=f"{threat} PGD")
        assert norms.min() > eps / 2  # it moved: 4 steps of eps/2.5 from a random start reach the boundary
        assert all(p.grad is None for p in network.parameters())  # input gradients only
    again = pgd.pgd(network, x, y, threat="linf", eps=0.1, steps=4, step_size=0.04,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, pgd.pgd(network, x, y, threat="linf", eps=0.1, steps=4, step_size=0.04,
                                      generator=torch.Generator().manual_seed(1)))
    no_start = pgd.pgd(network, x, y, threat="linf", eps=0.1, steps=0, step_size=0.04, random_start=False)
    assert torch.equal(no_start, x)


@pytest.mark.parametrize("threat, eps, fraction", [("linf", 0.15, 1.0), ("l2", 0.6, 1.0), ("linf", 0.15, 0.5)])
def test_the_batches_it_trains_on_are_pgd_examples_inside_the_ball(toy_dir, tmp_path, monkeypatch, threat, eps,
                                                                    fraction):
    seen = []
    original = training.adversarial_batch

    def spy(network, x01, labels, settings, generator):
        out = original(network, x01, labels, settings, generator)
        assert network.training  # back in training mode for the step
        seen.append((x01.clone(), out.clone()))
        return out

    monkeypatch.setattr(training, "adversarial_batch", spy)
    training.train_adversarial(toy_dir, tmp_path, epochs=1, threat=threat, eps=eps, step_size=eps / 3, steps=3,
                               adversarial_fraction=fraction, **CLASSIFIER)
    assert len(seen) == 4  # 64 images / 16 per step
    attacked = round(fraction * 16)
    for clean, trained_on in seen:
        norms = check_inside_budget(clean, trained_on, threat, eps, where="training batch")
        assert (norms[:attacked] > eps / 2).all()  # the attacked share moved ...
        assert torch.equal(trained_on[attacked:], clean[attacked:])  # ... and the rest is the clean batch


def test_a_killed_adversarial_job_resumes_to_the_uninterrupted_weights(toy_dir, tmp_path):
    settings = dict(epochs=2, checkpoint_every=3, **PGD, **CLASSIFIER)  # 8 steps
    whole = training.train_adversarial(toy_dir, tmp_path / "whole", **settings)
    out = tmp_path / "killed"
    script = (f"import os, torch\nfrom diffrobust import training\ntorch.set_num_threads({torch.get_num_threads()})\n"
              "def stop(step):\n    if step == 5:\n        os._exit(17)  # no cleanup: as a killed job\n"
              f"training.train_adversarial({str(toy_dir)!r}, {str(out)!r}, on_step=stop, **{settings!r})\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert completed.returncode == 17, completed.stderr
    assert not (out / training.MODEL_FILE).exists()
    assert torch.load(out / training.RESUME_FILE, weights_only=True)["step"] == 3

    resumed = training.train_adversarial(toy_dir, out, **settings)
    assert_same_weights(resumed.network, whole.network)  # batch-norm statistics and momentum included
    assert losses(out) == losses(tmp_path / "whole")
    metrics = json.loads((out / training.METRICS_FILE).read_text())
    assert metrics["test_pgd_accuracy"] == whole.extra["metrics"]["test_pgd_accuracy"]
    assert metrics["pgd"] == {"threat": "linf", "eps": 0.15, "step_size": 0.05, "steps": 5, "random_start": True,
                              "adversarial_fraction": 1.0}
    assert not (out / training.RESUME_FILE).exists()


def test_a_plain_resume_file_is_not_continued_adversarially(toy_dir, tmp_path, caplog):
    with pytest.raises(Interrupted):
        training.train_classifier(toy_dir, tmp_path, epochs=2, checkpoint_every=2, on_step=interrupt_at(3),
                                  **CLASSIFIER)
    with pytest.raises(Interrupted), caplog.at_level("WARNING", logger="diffrobust"):
        training.train_adversarial(toy_dir, tmp_path, epochs=2, checkpoint_every=2, on_step=interrupt_at(1),
                                   **PGD, **CLASSIFIER)
    assert "ignoring resume file" in caplog.text and "adversarial" in caplog.text


def test_adversarial_training_is_more_robust_under_pgd_than_plain_training(toy_dir, tmp_path):
    test = data.load_dataset(toy_dir)["test"]
    attack = training.adversarial_settings(eps=0.15, step_size=0.04, steps=20)  # stronger than the training's
    rows = {}
    for name, train in (("plain", training.train_classifier), ("adversarial", training.train_adversarial)):
        extra = PGD if name == "adversarial" else {}
        network = models.classifier(train(toy_dir, tmp_path / name, epochs=6, **extra, **CLASSIFIER))
        rows[name] = {"clean": training.accuracy(network, test.images, test.labels),
                      "pgd": training.pgd_accuracy(network, test.images, test.labels, attack,
                                                   torch.Generator().manual_seed(0)),
                      "large": training.pgd_accuracy(network, test.images, test.labels,
                                                     {**attack, "eps": 0.5, "step_size": 0.1},
                                                     torch.Generator().manual_seed(0))}
    # measured (one thread, seed 0): plain 1.0 clean, 0.50 under PGD-20; adversarial 1.0 and 1.0 (seeds 1-3 of
    # both trainings: plain 0.52-0.70, adversarial 1.0)
    assert rows["plain"]["clean"] >= 0.95 and rows["adversarial"]["clean"] >= 0.95
    assert rows["adversarial"]["pgd"] >= 0.9, rows
    assert rows["plain"]["pgd"] <= 0.75, rows
    # the attack is not the weak point: at eps 0.5 the bars can be swapped and both models fall
    assert rows["plain"]["large"] <= 0.1 and rows["adversarial"]["large"] <= 0.1, rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adversarial_training_on_cuda_is_deterministic(toy_dir, tmp_path):
    first = training.train_adversarial(toy_dir, tmp_path / "a", epochs=1, device="cuda", **PGD, **CLASSIFIER)
    again = training.train_adversarial(toy_dir, tmp_path / "b", epochs=1, device="cuda", **PGD, **CLASSIFIER)
    assert_same_weights(first.network, again.network)
    assert first.extra["device"]["device"] == "cuda:0"
    assert first.extra["metrics"]["test_pgd_accuracy"] == again.extra["metrics"]["test_pgd_accuracy"]


def test_the_pgd_block_is_checked():
    assert training.adversarial_settings() == training.ADVERSARIAL_DEFAULTS
    for bad in ({"eps": 0.0}, {"steps": 0}, {"adversarial_fraction": 1.5}, {"threat": "l1"}, {"stepz": 3}):
        with pytest.raises(ValueError):
            training.adversarial_settings(**bad)


def test_the_command_trains_adversarially_and_records_the_metrics(toy_dir, tmp_path):
    settings = {"architecture": CLASSIFIER["architecture"],
                "training": {"epochs": 0.5, "batch_size": 16, "lr": 0.05, "augment": True, "threat": "linf", "eps": 0.1,
                             "step_size": 0.05, "steps": 2, "random_start": True, "adversarial_fraction": 1.0}}
    assert cli.main(["train-classifier", "--adversarial", "--dataset-dir", str(toy_dir), "--out-dir",
                     str(tmp_path / "model"), "--settings", json.dumps(settings), "--device", "cpu",
                     "--run-record", str(tmp_path / "run.json")]) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["config"]["adversarial"] is True
    assert 0.0 <= record["metrics"]["test_pgd_accuracy"] <= record["metrics"]["test_accuracy"] + 0.1
    loaded = models.load_model(tmp_path / "model" / training.MODEL_FILE)
    assert loaded.kind == "classifier" and loaded.extra["training"]["adversarial"]["eps"] == 0.1


def test_the_config_trains_it_on_mnist_only():
    assert load_config({"preset": "mini"})["models"]["adversarial"]["source"] == "train"
    assert load_config({"preset": "smoke"})["models"]["adversarial"]["training"]["steps"] == 2
    assert load_config({"preset": "cifar10"})["models"]["adversarial"]["source"] is None
    with pytest.raises(ConfigError, match="Wang2023Better_WRN-70-16.*name them in 'rdc.models.adversarial'"):
        load_config({"preset": "cifar10", "models": {"adversarial": {"source": "train"}}})
    with pytest.raises(ConfigError, match="neither 'train' nor a checkpoint"):
        load_config({"preset": "mini", "models": {"adversarial": {"source": "Wang2023Better_WRN-70-16"}}})
    with pytest.raises(ConfigError, match="models.adversarial.training.adversarial_fraction"):
        load_config({"preset": "mini", "models": {"adversarial": {"training": {"adversarial_fraction": 2}}}})
