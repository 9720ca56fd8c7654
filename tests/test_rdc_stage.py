"""The RDC table's jobs: every defense builds and classifies, the attack policy of the config, the sigma-point sweep,
and the config rules that keep the two attack stages apart."""

import json

import pytest
import torch

from diffrobust import config as cfg
from diffrobust import models, training
from diffrobust.errors import DiffrobustError
from diffrobust.stages import rdc, robustness
from helpers import tiny_mnist_project

SETTINGS = {
    "threats": {"linf": {"eps": 0.1, "large_eps": 0.4}},
    "defenses": ["undefended", "dc", "rdc", "dc_multihead", "rdc_multihead"],
    "all_attacks_on": ["undefended"],
    "dc": {"sigma_steps": 3, "chunk_size": 64, "checkpoint": False, "seed": 0},
    "multihead_dc": {"sigma_grid": "vp", "timesteps": [0, 500, 999], "seed": 0},
    "lm": {"steps": 2, "lr": 0.01},
    "attacks": {"apgd_dlr": {"method": "autoattack", "version": "custom", "attacks": ["apgd-dlr"],
                             "gradient_mode": "bpda", "n_iter": 2, "n_restarts": 1},
                "rdc_standard": {"method": "autoattack", "version": "standard", "gradient_mode": "bpda", "n_iter": 2,
                                 "n_target_classes": 2, "n_queries": 3}},
    "checks": {"attack": "apgd_dlr", "iterations_factor": 2},
    "sweep": {"points": [1, 2], "threat": "linf"},
    "eval_draws": 1, "batch_size": 4, "shard_size": 4, "seed": 0,
}
SUBSET = {"start": 0, "stop": 4}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tiny_mnist_project(tmp_path_factory.mktemp("rdc"), attention_resolutions="")
    conditional = models.load_model(root / "diffusion.pt")
    network, architecture = training.multihead_from_conditional(conditional.network, 10, fold_label=10)
    settings = {**conditional.diffusion_settings, "null_class": None}
    models.save_model(root / "multihead.pt", network, kind="multihead_diffusion", architecture=architecture,
                      diffusion=settings, extra={"num_classes": 10})
    sources = {"classifier": str(root / "classifier.pt"), "conditional": str(root / "diffusion.pt"),
               "unconditional": str(root / "diffusion.pt"), "multihead": str(root / "multihead.pt")}
    return root, sources


def test_every_defense_builds_and_classifies_deterministically(project):
    root, sources = project
    x = torch.rand(2, 1, 32, 32)
    for defense in SETTINGS["defenses"]:
        built = rdc.build(defense, "linf", SETTINGS, sources, "cpu")
        with torch.no_grad():
            first, second = built.model(x), built.model(x)
        assert first.shape == (2, 10), defense
        assert torch.equal(first, second), defense  # deterministic for a given seed (as the official RDC)
        assert set(built.inputs) == set(rdc.ROLES[defense])
    # network evaluations per forward: 2 sigma points x 10 classes; multi-head 3 levels; LM adds its 2 steps
    assert rdc.build("dc", "linf", SETTINGS, sources, "cpu").network_calls == 20
    assert rdc.build("rdc_multihead", "linf", SETTINGS, sources, "cpu").network_calls == 3 + 2


def test_the_adversarial_baseline_is_the_checkpoint_of_the_attacks_threat(project, tmp_path):
    """At paper scale RDC compares with RobustBench's l-inf checkpoint under l-inf attacks and its l2 one under l2
    attacks: `rdc.models.adversarial` may name one source per threat, and each job loads its threat's."""
    root, sources = project
    from diffrobust.networks.classifiers import build_small_resnet

    per_threat = {}
    for seed, threat in enumerate(("linf", "l2"), start=1):
        torch.manual_seed(seed)
        architecture = {"family": "small_resnet", "config": {"in_channels": 1, "num_classes": 10, "width": 8,
                                                             "depth": 8}}
        per_threat[threat] = str(tmp_path / f"adversarial_{threat}.pt")
        models.save_model(per_threat[threat], build_small_resnet(architecture["config"]), kind="classifier",
                          architecture=architecture)
    sources = {**sources, "adversarial": per_threat}
    x = torch.rand(2, 1, 32, 32)
    logits = {}
    for threat in ("linf", "l2"):
        built = rdc.build("adversarial", threat, SETTINGS, sources, "cpu")
        assert [str(path) for path in built.inputs["adversarial"]] == [per_threat[threat]]
        with torch.no_grad():
            logits[threat] = built.model(x)
            expected = models.load_model(per_threat[threat]).network(x)
        assert torch.equal(logits[threat], expected)
    assert (logits["linf"] - logits["l2"]).abs().max() > 1e-3  # two different networks
    with pytest.raises(DiffrobustError, match="no model source for threat 'l2'.*name only linf"):
        rdc.build("adversarial", "l2", SETTINGS, {**sources, "adversarial": {"linf": per_threat["linf"]}}, "cpu")


def test_the_cifar10_preset_takes_robustbench_wang2023_per_threat():
    config = cfg.load_config({"preset": "cifar10"})
    assert config["rdc"]["models"]["adversarial"] == {"linf": "robustbench_cifar10_linf_wang2023better_wrn70_16",
                                                      "l2": "robustbench_cifar10_l2_wang2023better_wrn70_16"}
    assert "adversarial" in config["rdc"]["defenses"]
    assert config["models"]["adversarial"]["source"] is None  # nothing trained in the DAG at paper scale
    registry = cfg.load_checkpoint_registry()
    for threat, name in config["rdc"]["models"]["adversarial"].items():
        assert name in config["checkpoints"] and f"_{threat}_" in name
        assert registry[name]["architecture"]["family"] == "robustbench_dm_wrn"


def test_rdc_gets_every_attack_and_the_checks_the_others_what_the_config_says():
    assert rdc.defense_attacks(SETTINGS, "rdc") == ["apgd_dlr", "rdc_standard", "apgd_dlr-more", "apgd_dlr-large"]
    assert rdc.defense_attacks(SETTINGS, "undefended") == ["apgd_dlr", "rdc_standard"]
    assert rdc.defense_attacks(SETTINGS, "dc_multihead") == ["apgd_dlr"]


def test_an_rdc_attack_job_and_the_sweep_on_its_set(project, tmp_path):
    root, sources = project
    summary = rdc.attack_shard(defense="dc", attack="apgd_dlr", threat="linf", shard=0, settings=SETTINGS,
                               subset=SUBSET, dataset_dir=root / "mnist", models=sources,
                               out_path=tmp_path / "dc.npz", work_dir=tmp_path / "work", progress=False)
    stored = robustness.read_set([tmp_path / "dc.npz"], root / "mnist", threat="linf", settings=SETTINGS)
    assert summary["images"] == 4 and stored["x_adv"].shape == (4, 1, 32, 32)
    assert stored["identity"]["settings"]["dc"]["sigma_steps"] == 3
    rdc.sigma_sweep(threat="linf", settings=SETTINGS, subset=SUBSET, dataset_dir=root / "mnist", models=sources,
                    set_paths=[tmp_path / "dc.npz"], out_path=tmp_path / "sweep.tsv")
    lines = (tmp_path / "sweep.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["head", "points", "network_evaluations", "clean_accuracy", "adversarial_accuracy"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [("single", 1, 10), ("single", 2, 20), ("multi", 1, 1),
                                                            ("multi", 2, 2)]
    assert all(0 <= float(r[3]) <= 1 and 0 <= float(r[4]) <= 1 for r in rows)


@pytest.mark.parametrize("override, message", [
    ({"rdc": {"attacks": {"standard": {"method": "autoattack", "version": "standard"}}, "checks": {"attack": "standard"}}},
     "both name standard"),
    ({"rdc": {"checks": {"attack": "cw"}}}, "'rdc.checks.attack' = 'cw'"),
    ({"rdc": {"defenses": ["dc"]}}, "must include rdc"),
    ({"rdc": {"models": {"adversarial": {"linf": "train"}}}},
     r"'rdc.models.adversarial' .* names a source per threat model but none for l2"),
    ({"rdc": {"models": {"adversarial": {"linf": "train", "l2": "wang2023"}}}},
     r"'rdc.models.adversarial.l2' = 'wang2023' .* is neither 'train' nor a checkpoint"),
    ({"rdc": {"models": {"adversarial": {"linf": "train", "l2": "robustbench_cifar10_l2_wang2023better_wrn70_16"}}}},
     r"'rdc.models.adversarial.l2' = 'robustbench_cifar10_l2_wang2023better_wrn70_16' .* add it to the preset's "
     r"'checkpoints' list"),
    ({"rdc": {"models": {"adversarial": {"linf": "train", "l2": "train", "l_inf": "train"}}}},
     "unknown config key 'rdc.models.adversarial.l_inf'.*did you mean 'linf'"),
])
def test_the_config_keeps_the_attack_stages_apart(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load_config({"preset": "mini", **override})


def test_the_command_line_refuses_a_defense_the_stage_does_not_have(project, tmp_path):
    import subprocess
    import sys

    root, sources = project
    result = subprocess.run([sys.executable, "-m", "diffrobust", "attack-shard", "--stage", "diffpure",
                             "--defense", "rdc", "--attack", "apgd_dlr", "--threat", "linf", "--shard", "0",
                             "--settings", json.dumps(SETTINGS), "--subset", json.dumps(SUBSET),
                             "--models", json.dumps(sources), "--dataset-dir", str(root / "mnist"),
                             "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o.npz")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "stage diffpure has undefended, diffpure" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.npz").exists()
