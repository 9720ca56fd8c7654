"""A tiny attack stage for the attack-state tests (tests/test_attack_state.py, tests/test_fault_injection.py): a
20-image MNIST test split, a random-weight small ResNet saved with `models.save_model`, a `build` that serves it as
every defense, and eot_pgd settings of a few steps, so that one shard of 6 images (3 work batches of 2) takes well
under a second. Imported by the tests and by the subprocess that one of them kills."""

import numpy as np
import torch

from diffrobust import data, models
from diffrobust.networks.classifiers import build_small_resnet
from diffrobust.stages import robustness

PGD = {"method": "eot_pgd", "gradient_mode": "full", "relative_step_size": 0.25, "eot_attack_reps": 1,
       "eot_defense_reps": 1}
SETTINGS = {
    "threats": {"linf": {"eps": 0.1, "large_eps": 0.3}},
    "attacks": {"standard": {**PGD, "steps": 2}, "bpda_eot": {**PGD, "steps": 3}},
    "checks": {"attack": "standard", "iterations_factor": 2},
    "eval_draws": 1, "batch_size": 2, "shard_size": 6, "seed": 0,
}
SUBSET = {"start": 0, "stop": 12}
RESNET = {"family": "small_resnet", "config": {"in_channels": 1, "num_classes": 10, "width": 4, "depth": 8}}


def make_project(root):
    """root/mnist (20 test images) and root/classifier.pt (seeded random weights)."""
    data.prepare_mnist(root / "mnist", test_per_class=2)
    torch.manual_seed(0)
    models.save_model(root / "classifier.pt", build_small_resnet(RESNET["config"]), kind="classifier",
                      architecture=RESNET)
    return root


def build(defense, threat, settings, source_models, device):
    """The classifier of `source_models["classifier"]` as any defense (a stage's `build`)."""
    loaded = models.load_source(source_models["classifier"], device=device)
    return robustness.Built(loaded.network, {"defense": defense}, {"classifier": source_models["classifier"]})


def run(root, out, *, attack="standard", defense="undefended", shard=0, subset=SUBSET, settings=SETTINGS,
        classifier=None):
    """attack_shard of the tiny stage: writes out/shard<shard>.npz, keeps its batches in out/work<shard>."""
    return robustness.attack_shard(build=build, defense=defense, attack=attack, threat="linf", shard=shard,
                                   settings=settings, subset=subset, dataset_dir=root / "mnist",
                                   models={"classifier": str(classifier or root / "classifier.pt")},
                                   out_path=out / f"shard{shard}.npz", work_dir=out / f"work{shard}",
                                   progress=False)


def read(root, paths, settings=SETTINGS, **expected):
    return robustness.read_set([paths] if not isinstance(paths, list) else paths, root / "mnist", threat="linf",
                               settings=settings, **expected)


def assert_same_set(a, b):
    """Two sets hold the same examples and outcomes (every array but the seconds, which are timings)."""
    assert set(a) == set(b)
    for key in a:
        if key == "seconds":
            continue
        if key == "identity":
            assert a[key] == b[key]
        else:
            assert np.array_equal(a[key], b[key]), key
