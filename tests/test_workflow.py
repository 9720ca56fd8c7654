"""The workflow as a user runs it: lint, dry runs of every preset, clean failures on bad input, a real smoke run,
and a DVC push/pull round trip after which Snakemake has nothing to rerun.

Each test works in a private copy of the repository (tracked and untracked-but-not-ignored files), so the user's own
data/ and results/ are never touched.
"""

import functools
import hashlib
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.workflow

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "diffrobust tests", "GIT_AUTHOR_EMAIL": "tests@diffrobust.invalid",
                "GIT_COMMITTER_NAME": "diffrobust tests", "GIT_COMMITTER_EMAIL": "tests@diffrobust.invalid"}


def _env():
    env = dict(os.environ, **GIT_IDENTITY)
    # rules run `python -m diffrobust`: the interpreter running the tests must be the one they find
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(args, cwd, check=True, env=None, timeout=None):
    result = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_repo(repo_root, destination):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        source = repo_root / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture
def repo_copy(repo_root, tmp_path):
    return copy_repo(repo_root, tmp_path / "repo")


def snakemake(cwd, *args, check=True):
    return run(["snakemake", "--cores", "2", *args], cwd, check=check)


def test_lint(repo_copy):
    result = snakemake(repo_copy, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dry_run_with_an_unchanged_config_does_not_import_torch(repo_copy):
    # the first DAG build checks the networks on the meta device (torch); later ones remember them (issue 14)
    snakemake(repo_copy, "-n")
    assert (repo_copy / ".snakemake/diffrobust/checked-architectures.json").is_file()
    result = run([sys.executable, "-X", "importtime", "-m", "snakemake", "--cores", "2", "-n"], repo_copy)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "diffrobust.config" in imported and "diffrobust.stages.plan" in imported
    assert "torch" not in imported and not any(name.startswith("diffrobust.stages.densepure") for name in imported)


@pytest.mark.parametrize("preset, jobs", [
    # smoke: 1 sigma x 2 methods x 2 shards; merges: DDS 1 vote, DensePure the 1- and 3-vote ablation
    ("smoke", {"prepare_dataset": 1, "train_diffusion": 1, "finetune_multihead": 1, "train_classifier": 1,
               "certify_shard": 4, "merge_votes": 3, "attack": 36, "evaluate": 4, "sigma_sweep": 1,
               "train_adversarial": 1, "train_ldm": 1, "protect": 6, "edit_protected": 6, "render_report": 6,
               "render_summary": 1}),
    # DiffPure: 2 threats x (3 attacks on the undefended classifier + 5 on DiffPure); RDC: 2 threats x (2 on the
    # undefended classifier + 4 on RDC + 1 on each of the adversarially trained classifier, DC and the two multi-head
    # variants); 1 shard each; 2 + 2 transfer scores
    # Pixel is a Barrier: one protect and one edit job per attack (9) and per pseudo-attack (none, random)
    ("mini", {"prepare_dataset": 1, "train_diffusion": 1, "train_classifier": 1, "train_adversarial": 1, "attack": 36,
              "evaluate": 4, "sigma_sweep": 1, "train_ldm": 1, "protect": 11, "edit_protected": 11,
              "render_report": 6, "render_summary": 1}),
    # paper scale: downloads instead of training; 500 images in shards of 10, 3 sigmas, 2 methods
    # attacks: DiffPure's 128 and RDC's 2 threats x 16 shards x (2 on the undefended classifier + 4 on RDC + 2 on each
    # of DC, the two multi-head variants and the adversarially trained row, each on its threat's RobustBench
    # WRN-70-16); the multi-head network is distilled from EDM's conditional model
    ("cifar10", {"download_cifar10": 1, "download_checkpoint": 10, "prepare_dataset": 1, "certify_shard": 300,
                 "merge_votes": 27, "attack": 576, "evaluate": 4, "finetune_multihead": 1, "sigma_sweep": 1,
                 "render_report": 5, "render_summary": 1}),
    # ImageNet: Pixel is a Barrier on Stable Diffusion v1.4 (+6 files: its text encoder and tokenizer), CLIP (+2),
    # DeepFloyd IF stage II's schedulers (+2), the x4 upscaler of Noisy Upscaling (+13), LPIPS' AlexNet and FID's
    # Inception (+2), Diff-Protect's MIST.png (+1)
    ("imagenet", {"download_checkpoint": 38, "prepare_dataset": 1, "certify_shard": 120, "protect": 11,
                  "edit_protected": 11, "render_report": 5, "attack": 64, "evaluate": 1, "render_summary": 1}),
])
def test_dry_run_builds_the_full_dag(repo_copy, preset, jobs):
    result = snakemake(repo_copy, "-n", "--config", f"preset={preset}")
    stats = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    for rule, count in jobs.items():
        assert stats.get(rule) == count, (rule, stats)
    assert not (repo_copy / "data").exists() and not (repo_copy / "results").exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "preset=tiny"], "unknown preset 'tiny'; available presets: cifar10, imagenet, mini, smoke"),
    (["--config", "preset=smoke", "sed=1"], "unknown config key 'sed' in the top level"),
    (["--configfile", "NEGATIVE"], "'datasets.mnist.test_per_class' = -5"),
])
def test_bad_config_stops_before_any_job(repo_copy, args, message):
    (repo_copy / "NEGATIVE").write_text("datasets:\n  mnist:\n    test_per_class: -5\n")
    result = snakemake(repo_copy, *args, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (repo_copy / "data").exists() and not (repo_copy / "results").exists()


def test_a_gpu_that_is_not_there_stops_the_run_before_any_job(repo_copy):
    result = snakemake(repo_copy, "--config", "preset=smoke", "device=cuda:99", check=False)
    assert result.returncode != 0
    assert "config key 'device' = 'cuda:99'" in result.stdout + result.stderr
    assert not (repo_copy / "data").exists() and not (repo_copy / "results").exists()
    # a dry run (e.g. on a cluster's login node, where the jobs run elsewhere) still plans the work
    assert "certify_shard" in snakemake(repo_copy, "-n", "--config", "preset=smoke", "device=cuda:99").stdout


def test_missing_imagenet_folder_fails_its_job_cleanly(repo_copy):
    result = snakemake(repo_copy, "data/datasets/imagenet/meta.json", "--config", "preset=imagenet", check=False)
    log = (repo_copy / "logs/prepare_dataset/imagenet.log").read_text()
    assert result.returncode != 0
    assert "ImageNet validation folder data/raw/imagenet/val does not exist" in log
    assert "datasets.imagenet.val_dir" in log
    assert not (repo_copy / "data/datasets/imagenet").exists() or not any((repo_copy / "data/datasets/imagenet").iterdir())


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_checksum_mismatch_in_a_download_job_leaves_nothing(repo_copy, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar.tar.gz").write_bytes(b"not the CIFAR-10 tarball" * 100)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
        (repo_copy / "local.yaml").write_text(f"datasets:\n  cifar10:\n    url: {url}\n    size: 2400\n")
        result = snakemake(repo_copy, "data/downloads/cifar-10-python.tar.gz", "--config", "preset=cifar10",
                           "--configfile", "local.yaml", check=False)
    finally:
        server.shutdown()
    log = (repo_copy / "logs/download_cifar10.log").read_text()
    assert result.returncode != 0
    assert "md5" in log and "c58f30108f718f92721af3b95e74349a" in log
    assert hashlib.md5((served / "cifar.tar.gz").read_bytes()).hexdigest() in log
    leftovers = list((repo_copy / "data/downloads").glob("*")) if (repo_copy / "data/downloads").exists() else []
    assert leftovers == []


def test_smoke_run_then_dvc_push_pull_into_a_fresh_clone(repo_copy, tmp_path):
    # a real project: git repository, smoke preset, DVC remote in a temporary folder
    (repo_copy / "config/config.yaml").write_text("preset: smoke\n")
    run(["git", "init", "-q", "-b", "main"], repo_copy)
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "project"], repo_copy)
    store = tmp_path / "store"
    run(["dvc", "remote", "modify", "local", "url", str(store)], repo_copy)

    # dvc repro runs the whole DAG through Snakemake
    run(["dvc", "repro"], repo_copy)
    report = repo_copy / "results/smoke/reports/data_report.html"
    assert "Splits: images per class" in report.read_text()
    for name in ("models_report", "densepure_table1", "diffpure_table", "rdc_table", "pixel_barrier"):
        assert (repo_copy / f"results/smoke/reports/{name}.html").stat().st_size > 10000
    # the summary of every claim is the folder's index, linking each paper report
    summary = (repo_copy / "results/smoke/reports/index.html").read_text()
    assert "Summary: every published claim" in summary and 'href="rdc_table.html#' in summary
    assert "not run at this preset" in summary and "this preset's reports do not include" not in summary
    table = (repo_copy / "results/smoke/densepure/densepure/sigma0.5/votes3.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"] and len(table) == 3
    assert (repo_copy / "data/datasets/mnist/splits.npz").is_file()
    # the attacks attack something: images the classifier gets right, moved by the attack (issue 21, item 14)
    attacked = attacked_images(repo_copy / "results/smoke", repo_copy / "data/datasets/mnist")
    assert any(count for (defense, _, _), count in attacked.items() if defense == "diffpure"), attacked
    assert any(count for (_, attack, _), count in attacked.items() if attack in ("apgd_dlr", "rdc_standard")), attacked
    # a second repro has nothing to do
    assert "didn't change" in run(["dvc", "repro"], repo_copy).stdout

    run(["dvc", "add", "data"], repo_copy)
    run(["dvc", "push"], repo_copy)
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "results"], repo_copy)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "results").exists()
    run(["dvc", "pull"], clone)
    for path in ["results/smoke/reports/data_report.html", "data/datasets/mnist/splits.npz",
                 "data/datasets/mnist/meta.json", "results/smoke/models/diffusion/model.pt",
                 "results/smoke/densepure/dds/sigma0.5/votes1.tsv"]:
        assert (clone / path).read_bytes() == (repo_copy / path).read_bytes(), path
    assert "up to date" in run(["dvc", "status"], clone).stdout

    # DVC restores files with fresh modification times; make an input look newer, as a checkout order can
    os.utime(clone / "data/datasets/mnist/splits.npz")
    assert "render_report" in snakemake(clone, "-n").stdout
    # the documented fix: mark the restored outputs as current, after which nothing reruns
    snakemake(clone, "--touch")
    assert "Nothing to be done" in snakemake(clone, "-n").stdout

    # Stale state: a changed setting reruns the certification jobs, whose work folders are full of labels made with
    # the old setting (restored by DVC here); they must be discarded, so the tables equal a clean run's.
    (clone / "steps.yaml").write_text("densepure:\n  num_steps: 1\n")
    densepure = clone / "results/smoke/densepure/densepure/sigma0.5"
    targets = [str((densepure / f"votes{k}.tsv").relative_to(clone)) for k in (1, 3)]
    snakemake(clone, *targets, "--configfile", "steps.yaml")
    assert "discarding the per-image label files" in (clone / "logs/smoke/certify_shard/densepure/sigma0.5/shard0.log").read_text()
    rerun = _tables_without_time(densepure)
    shutil.rmtree(densepure)
    snakemake(clone, *targets, "--configfile", "steps.yaml")
    assert rerun == _tables_without_time(densepure) and {"votes1.tsv", "votes3.tsv", "shard0.tsv"} <= rerun.keys()


def attacked_images(results_dir, dataset_dir):
    """{(defense, attack, threat): how many images correctly classified clean have an adversarial image unlike their
    clean image} of every adversarial set under `results_dir` (read as stored, so no reader can hide a set)."""
    from diffrobust import data, imagespace

    split = data.load_dataset(dataset_dir).eval_split
    row = {int(index): k for k, index in enumerate(split.indices)}
    counts = {}
    for path in sorted(Path(results_dir).glob("attacks/*/*/*/shard*.npz")):
        with np.load(path) as stored:
            clean = imagespace.uint8_to_float(split.images[[row[int(i)] for i in stored["idx"]]]).numpy()
            moved = (stored["x_adv"] != clean).reshape(len(clean), -1).any(axis=1)
            key = tuple(path.relative_to(results_dir).parts[1:4])
            counts[key] = counts.get(key, 0) + int((moved & stored["clean_correct"]).sum())
    return counts


def _tables_without_time(folder):
    """Every certification TSV in `folder` without its timing column: {file name: rows}."""
    return {path.name: [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()]
            for path in sorted(Path(folder).glob("*.tsv"))}


# --- config overrides as a user types them (issue 9) ---------------------------------------------------------------


def _shell_arguments(stdout, subcommand, flag):
    """The JSON value of `flag` in every planned `diffrobust <subcommand>` call of a `snakemake -n -p` plan."""
    values = []
    for line in stdout.splitlines():
        if f"diffrobust {subcommand} " in line:
            words = shlex.split(line.split("Shell command:", 1)[-1].split(" 2>")[0])
            values.append(json.loads(words[words.index(flag) + 1]))
    return values


def test_nested_numeric_override_reaches_the_jobs(repo_copy):
    result = snakemake(repo_copy, "-n", "-p", "--config", "preset=smoke", "densepure={votes: 5, n: 1000}")
    settings = _shell_arguments(result.stdout, "certify-shard", "--settings")
    assert len(settings) == 4
    assert all(s["votes"] == 5 and s["n"] == 1000 and s["seed"] == 0 for s in settings)
    assert "votes5.tsv" in result.stdout  # the full-K merge follows the new K


def test_how_certification_runs_a_network_reaches_its_jobs_and_does_not_retrain_it(repo_copy):
    default = snakemake(repo_copy, "-n", "-p", "--config", "preset=smoke")
    switched = snakemake(repo_copy, "-n", "-p", "--config", "preset=smoke",
                         "models={diffusion: {precision: bf16, compile: default}}")
    for command in ("train-diffusion", "train-classifier"):
        trained = _shell_arguments(switched.stdout, command, "--settings")
        assert trained and trained == _shell_arguments(default.stdout, command, "--settings")
        assert not {"precision", "compile"} & set(trained[0])
    certify_lines = [line for line in switched.stdout.splitlines() if "diffrobust certify-shard " in line]
    assert len(certify_lines) == 4 and all("--diffusion-precision bf16" in line and "--diffusion-compile default"
                                           in line and "--classifier-compile none" in line for line in certify_lines)


def test_whole_float_override_reaches_the_jobs_as_an_integer(repo_copy):
    (repo_copy / "floats.yaml").write_text("densepure:\n  n: 6.0e+1\nmodels:\n  diffusion:\n    training:\n      steps: 4.0\n")
    result = snakemake(repo_copy, "-n", "-p", "--config", "preset=smoke", "seed=7", "--configfile", "floats.yaml")
    settings = _shell_arguments(result.stdout, "certify-shard", "--settings")
    assert settings and all(type(s["n"]) is int and s["n"] == 60 for s in settings)
    assert all(s["seed"] == 7 for s in settings)  # the stage seed follows the global seed
    training = _shell_arguments(result.stdout, "train-diffusion", "--settings")
    assert training[0]["training"]["steps"] == 4 and type(training[0]["training"]["steps"]) is int
    assert "config key 'densepure.n' = 60.0 (from floats.yaml) is a whole number: read as the integer 60" in (
        result.stdout + result.stderr)


def test_path_override_with_digits_stays_a_string(repo_copy):
    result = snakemake(repo_copy, "-n", "-p", "--config", "preset=imagenet", "datasets={imagenet: {val_dir: /data/2012}}")
    settings = _shell_arguments(result.stdout, "prepare-dataset", "--settings")
    assert settings == [{"val_dir": "/data/2012", "image_size": 256}]


def test_the_paper_scale_multihead_distillation_call_parses_and_claims_a_gpu(repo_copy):
    """cifar10: the finetune_multihead job distils EDM's conditional model (no multi-head checkpoint is public). Its
    planned command parses with the CLI's own parser, its settings are keywords of the training function, and the
    rule claims a GPU as the other training rules do."""
    import inspect

    from diffrobust import cli, training

    result = snakemake(repo_copy, "-n", "-p", "--config", "preset=cifar10", "device=cuda", "--",
                       "results/cifar10/models/multihead/model.pt")
    calls = [line for line in result.stdout.splitlines() if "diffrobust finetune-diffusion " in line]
    assert len(calls) == 1
    args = cli.build_parser().parse_args(shlex.split(calls[0].split(" -m diffrobust ", 1)[1].split(" 2>")[0]))
    assert (args.variant, args.init, args.device, args.seed) == ("multihead", "edm_cifar10_cond_vp", "cuda", 0)
    assert args.settings["steps"] == 40000 and args.settings["true_class_weight"] == 0.0
    keywords = dict(seed=args.seed, device=args.device, **args.settings)
    inspect.signature(training.finetune_diffusion).bind(None, args.dataset_dir, args.out_dir, variant=args.variant,
                                                        **keywords)
    inspect.signature(training.distill_edm_multihead).bind(None, args.dataset_dir, args.out_dir, **keywords)
    rule = (repo_copy / "workflow/rules/train.smk").read_text().split("rule finetune_multihead:")[1].split("\nrule ")[0]
    assert "gpu=gpu_request" in rule


@pytest.mark.parametrize("args, files, messages", [
    (["--config", "densepure={votes: 0}"], {},
     ["config key 'densepure.votes' = 0 (from --config) must be >= 1"]),
    (["--configfile", "radii.yaml"], {"radii.yaml": "densepure:\n  radii: [0.0, -0.5]\n"},
     ["config key 'densepure.radii.1' = -0.5 (from radii.yaml) must be >= 0"]),
    (["--config", "densepure={radii: [0.0, -0.5]}"], {},
     ["config key 'densepure.radii.1' = -0.5 (from --config) must be >= 0"]),
    (["--configfile", "typo.yaml"], {"typo.yaml": "models:\n  diffusion:\n    training:\n      stepz: 5\n"},
     ["unknown config key 'models.diffusion.training.stepz'", "(from typo.yaml)", "did you mean 'steps'?"]),
    (["--config", "subsets={densepure: {stop: 5000}}"], {},
     ["config key 'subsets.densepure'", "the evaluation split has only 1000 images", "(from --config;"]),
    ([], {"config/config.yaml": "preset: mini\nseed: -3\n"},
     ["config key 'seed' = -3 (from config/config.yaml) must be >= 0"]),
])
def test_bad_override_is_refused_at_dag_build_naming_its_source(repo_copy, args, files, messages):
    for name, text in files.items():
        (repo_copy / name).write_text(text)
    result = snakemake(repo_copy, "-n", *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for message in messages:
        assert message in output
    assert "must be of type" not in output and "Traceback" not in output


def test_a_failed_render_keeps_the_previous_report_and_renders_again_next_time(repo_copy):
    """Snakemake deletes a job's outputs before it runs; the report's HTML is flagged update() so that it survives a
    failed render, and the missing executed notebook makes the next run render again."""
    reports = repo_copy / "results/smoke/reports"
    targets = [str(Path("results/smoke/reports") / name) for name in ("data_report.html", "data_report.ipynb")]
    snakemake(repo_copy, *targets, "--config", "preset=smoke")
    previous = (reports / "data_report.html").read_bytes()
    notebook = repo_copy / "notebooks/data_report.py"
    working = notebook.read_text()
    notebook.write_text(working + '\n# %%\nraise RuntimeError("broken on purpose")\n')
    result = snakemake(repo_copy, *targets, "--config", "preset=smoke", check=False)
    assert result.returncode != 0
    assert (reports / "data_report.html").read_bytes() == previous
    assert not (reports / "data_report.ipynb").exists()
    notebook.write_text(working)
    assert "render_report" in snakemake(repo_copy, "-n", *targets, "--config", "preset=smoke").stdout
