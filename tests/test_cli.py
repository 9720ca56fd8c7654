"""The command line's own checks (issue 21, item 11): a bad argument is one line naming it and what it allows, exit
status 2 (argparse's usage-error status), no traceback and nothing written; a good call gets past them."""

import json

import numpy as np
import pytest

from diffrobust import cli, data
from diffrobust.config import load_config
from diffrobust.stages import robustness

SMOKE = load_config({"preset": "smoke"})
DIFFPURE_MODELS = {"diffusion": "missing/diffusion.pt", "classifier": "missing/classifier.pt"}
RDC_MODELS = {role: f"missing/{role}.pt" for role in SMOKE["rdc"]["models"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prepared MNIST folder and two stored l-inf sets of its first 4 evaluation images, valid as the readers
    verify them (robustness.verify_set): DiffPure's `standard` set against diffpure, RDC's check attack against dc
    (the sigma sweep's input)."""
    root = tmp_path_factory.mktemp("cli")
    data.prepare_mnist(root / "mnist")
    split = data.load_dataset(root / "mnist").eval_split
    _write_set(root / "linf_set.npz", split, SMOKE["diffpure"], "diffpure", "standard")
    _write_set(root / "linf_rdc_set.npz", split, SMOKE["rdc"], "dc", SMOKE["rdc"]["checks"]["attack"])
    return root


def _write_set(path, split, settings, defense, attack, count=4):
    """A stored set of the first `count` images at linf whose examples are the clean images (inside any budget)."""
    eps, plan = robustness.attack_plan(settings, attack, "linf")
    identity = {"job": "attack", "settings": {"defense": defense, "threat": "linf", "eps": eps, "attack": attack,
                                              "plan": plan}}
    flags = np.ones(count, dtype=bool)
    np.savez(path, idx=split.indices[:count], label=split.labels[:count],
             x_adv=(split.images[:count] / 255).astype(np.float32), clean_correct=flags, attack_robust=flags,
             adv_correct=flags, forward_images=np.ones(count), gradient_images=np.ones(count),
             seconds=np.ones(count), identity=np.array(json.dumps(identity)))


def _arguments(pairs, **changes):
    """argv of `pairs` ({"--flag": value}) with `changes` ({"shard": "99"} sets --shard) applied."""
    pairs = pairs | {f"--{name.replace('_', '-')}": value for name, value in changes.items()}
    return [str(word) for pair in pairs.items() for word in pair]


def attack_shard(root, **changes):
    return ["attack-shard", *_arguments({
        "--stage": "diffpure", "--defense": "diffpure", "--attack": "standard", "--threat": "linf", "--shard": "0",
        "--settings": json.dumps(SMOKE["diffpure"]), "--subset": json.dumps(SMOKE["subsets"]["diffpure"]),
        "--models": json.dumps(DIFFPURE_MODELS), "--dataset-dir": root / "mnist", "--work-dir": root / "work",
        "--out": root / "out" / "set.npz", "--device": "cpu"}, **changes)]


def evaluate_set(root, **changes):
    return ["evaluate-set", *_arguments({
        "--stage": "diffpure", "--defense": "diffpure", "--threat": "linf", "--sets": root / "linf_set.npz",
        "--settings": json.dumps(SMOKE["diffpure"]), "--models": json.dumps(DIFFPURE_MODELS),
        "--dataset-dir": root / "mnist", "--out": root / "out" / "eval.npz", "--device": "cpu"}, **changes)]


def sigma_sweep(root, **changes):
    return ["sigma-sweep", *_arguments({
        "--threat": "linf", "--sets": root / "linf_rdc_set.npz", "--settings": json.dumps(SMOKE["rdc"]),
        "--subset": json.dumps(SMOKE["subsets"]["rdc"]), "--models": json.dumps(RDC_MODELS),
        "--dataset-dir": root / "mnist", "--out": root / "out" / "sweep.tsv", "--device": "cpu"}, **changes)]


def _run(argv, capsys):
    """(exit status, stderr) of `diffrobust argv`, as `python -m diffrobust` would end."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own checks exit
        status = exit_.code
    return status, capsys.readouterr().err


# (case, argv from the fixture's folder, what the line must say): the probe's reproductions
REFUSED = [
    ("attack-shard --settings {}", lambda root: attack_shard(root, settings="{}"),
     "argument --settings: lacks diffpure.models, diffpure.threats"),
    ("attack-shard --settings without seed",
     lambda root: attack_shard(root, settings=json.dumps({k: v for k, v in SMOKE["diffpure"].items() if k != "seed"})),
     "argument --settings: lacks diffpure.seed "),
    ("attack-shard --models {}", lambda root: attack_shard(root, models="{}"),
     "argument --models: lacks diffpure.models.diffusion, diffpure.models.classifier"),
    ("evaluate-set --settings {}", lambda root: evaluate_set(root, settings="{}"), "argument --settings: lacks"),
    ("evaluate-set --models {}", lambda root: evaluate_set(root, models="{}"), "argument --models: lacks"),
    ("sigma-sweep --settings {}", lambda root: sigma_sweep(root, settings="{}"), "argument --settings: lacks rdc."),
    ("sigma-sweep --models {}", lambda root: sigma_sweep(root, models="{}"),
     "argument --models: lacks rdc.models.conditional"),
    ("attack-shard --shard 99", lambda root: attack_shard(root, shard="99"),
     "argument --shard: 99 is not a shard of subsets.diffpure (the subset makes 1 shard(s) of 4 images"),
    ("attack-shard --attack nosuch", lambda root: attack_shard(root, attack="nosuch"),
     "argument --attack: 'nosuch' is not an attack of --settings (diffpure.attacks and the derived checks: "
     "standard, rand, bpda_eot, rand-more, rand-large)"),
    ("attack-shard --defense rdc", lambda root: attack_shard(root, defense="rdc"),
     "argument --defense: 'rdc': stage diffpure has undefended, diffpure"),
    ("attack-shard bad --subset", lambda root: attack_shard(root, subset='{"n": 0, "seeds": [0]}'),
     "argument --subset: out of range (as config key subsets.diffpure.n: 0 is less than the minimum of 1"),
    ("attack-shard --subset beyond the split", lambda root: attack_shard(root, subset='{"n": 2000, "seeds": [0]}'),
     "argument --subset: config key 'subsets.diffpure.n' = 2000 exceeds the split size 1000"),
    ("evaluate-set --threat l2 on a linf set", lambda root: evaluate_set(root, threat="l2"),
     "linf_set.npz was made at threat linf, not --threat l2"),
    ("sigma-sweep --threat l2 on a linf set", lambda root: sigma_sweep(root, threat="l2"),
     "argument --sets: "),
    ("render-notebook --notebook /nonexistent.py",
     lambda root: ["render-notebook", "--notebook", "/nonexistent.py", "--ipynb", str(root / "out" / "n.ipynb"),
                   "--html", str(root / "out" / "n.html")],
     "argument --notebook: no file /nonexistent.py"),
    ("bench-attack --sizes tiny", lambda root: ["bench-attack", "--sizes", "tiny"],
     "argument --sizes: 'tiny' not among mini, cifar10"),
    ("bench-attack --batch-size 0", lambda root: ["bench-attack", "--batch-size", "0"],
     "argument --batch-size: 0 is below 1"),
    ("bench-rdc --points 0", lambda root: ["bench-rdc", "--points", "0"], "argument --points: '0': 0 is below 1"),
    ("bench-rdc --points abc", lambda root: ["bench-rdc", "--points", "abc"],
     "argument --points: 'abc': 'abc' is not an integer"),
]


@pytest.mark.parametrize("case, argv, message", REFUSED, ids=[case for case, _, _ in REFUSED])
def test_a_bad_argument_is_one_line_naming_it_with_exit_status_2(files, capsys, case, argv, message):
    status, stderr = _run(argv(files), capsys)
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr and not (files / "out").exists() and not (files / "work").exists()


def test_good_arguments_get_past_the_checks_to_the_models(files, capsys):
    """The checks refuse nothing the workflow passes: the job goes on to load its models (here missing: status 1,
    the model file's own message)."""
    for argv in (attack_shard(files), evaluate_set(files), sigma_sweep(files)):
        status, stderr = _run(argv, capsys)
        assert status == 1 and "model file missing/" in stderr and "not found" in stderr, stderr
    assert not (files / "out").exists()


def test_the_module_entry_point_exits_with_the_status(files):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "diffrobust", *attack_shard(files, shard="99")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "argument --shard" in result.stderr
