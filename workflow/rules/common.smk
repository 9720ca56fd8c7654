# Helpers shared by all rules: the merged and validated config, paths, and params built from config.
# Logic lives in src/diffrobust; this file only translates config into rule inputs and params.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SRC = str(Path(workflow.basedir) / "src")
# Rules call `python -m diffrobust`; with --use-conda the package is not installed in the rule's env, so put the
# source tree on the path (harmless in a venv where it is installed in editable mode).
sys.path.insert(0, SRC)
shell.prefix(f"export PYTHONPATH={shlex.quote(SRC)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from diffrobust.config import ConfigError, checkpoint_files, load_checkpoint_registry, load_config

try:
    CFG = load_config(config)
    REGISTRY = load_checkpoint_registry()
except ConfigError as error:
    raise WorkflowError(f"Configuration error:\n{error}") from None

PRESET = CFG["preset"]
DATASET = CFG["dataset"]
RESULTS = f"results/{PRESET}"
LOGS = f"logs/{PRESET}"
BENCHMARKS = f"benchmarks/{PRESET}"
CHECKPOINT_LOCK = "config/checkpoints.lock.yaml"


def as_json(value):
    """Compact JSON for passing a config block to the CLI (quoted in shell with {params.x:q})."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- data --------------------------------------------------------------------------------------------------------


def dataset_files(dataset=DATASET):
    return {
        "arrays": f"data/datasets/{dataset}/splits.npz",
        "meta": f"data/datasets/{dataset}/meta.json",
    }


def dataset_inputs(wildcards):
    """CIFAR-10 is built from its tarball: the user's copy if configured, else the downloaded one."""
    if wildcards.dataset == "cifar10":
        return {"source": CFG["datasets"]["cifar10"]["tarball"] or "data/downloads/cifar-10-python.tar.gz"}
    return {}


def dataset_source_flag(wildcards, input):
    return f"--source {shlex.quote(input.source)}" if "source" in input.keys() else ""


def dataset_settings(wildcards):
    return as_json(CFG["datasets"][wildcards.dataset])


def dataset_subsets(wildcards):
    """Only ImageNet stores a partial split (the configured subsets), so only it depends on them."""
    return as_json(CFG["subsets"] if wildcards.dataset == "imagenet" else {})


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_targets(only_automatic=False):
    """Paths of the preset's checkpoint files (optionally only those a script can fetch)."""
    return [
        f"data/checkpoints/{name}/{entry['path']}"
        for name, entry in checkpoint_files(REGISTRY, CFG["checkpoints"])
        if entry["urls"] or not only_automatic
    ]


def fetch_arguments(wildcards):
    """`diffrobust fetch` flags for one registry file: mirrors, published digests, the by-hand instructions."""
    entry = next((e for e in REGISTRY[wildcards.name]["files"] if e["path"] == wildcards.file), None)
    if entry is None:
        raise WorkflowError(f"config/checkpoints.yaml: checkpoint {wildcards.name!r} has no file {wildcards.file!r}")
    words = [f"--url={url}" for url in entry["urls"]]
    words += [f"--{key}={entry[key]}" for key in ("sha256", "md5", "size") if key in entry]
    if "manual" in REGISTRY[wildcards.name]:
        words.append(f"--manual={REGISTRY[wildcards.name]['manual']}")
    return " ".join(shlex.quote(word) for word in words)


# --- reports -----------------------------------------------------------------------------------------------------


def report_inputs(wildcards):
    inputs = {"notebook": f"notebooks/{wildcards.notebook}.py"}
    if wildcards.notebook == "data_report":
        inputs.update(dataset_files())
        inputs["checkpoints"] = checkpoint_targets(only_automatic=True)
    return inputs


def report_parameters(wildcards):
    """Values for the notebook's `parameters` cell, taken from the config."""
    if wildcards.notebook == "data_report":
        parameters = {
            "preset": PRESET,
            "description": CFG["description"],
            "dataset_dir": f"data/datasets/{DATASET}",
            "subsets": CFG["subsets"],
            "checkpoint_names": CFG["checkpoints"],
            "checkpoint_lock": CHECKPOINT_LOCK,
        }
    else:
        raise WorkflowError(f"no parameters defined for notebook {wildcards.notebook!r}")
    return as_json(parameters)


def all_targets():
    return checkpoint_targets() + [f"{RESULTS}/reports/{name}.html" for name in CFG["reports"]]
