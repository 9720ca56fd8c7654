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

from snakemake.logging import logger

from diffrobust.config import (ConfigError, checkpoint_files, eval_split_size, load_checkpoint_registry,
                               resolve_config, workflow_sources)
from diffrobust.stages import plan


def config_sources():
    """What Snakemake merged into `config`, source by source (the Snakefile's configfile:, each --configfile,
    --config), so that the values of --config can be read as YAML and a bad value is blamed on its real source."""
    settings = workflow.config_settings
    command_line_files = {Path(path).absolute() for path in settings.configfiles}
    directive_files = [path for path in workflow.configfiles if Path(path).absolute() not in command_line_files]
    return workflow_sources(directive_files, settings.configfiles, settings.config, settings.replace_workflow_config)


# Architectures built on the meta device at an earlier DAG build (config.architecture_problems): not built again,
# so a no-op run or a dry run does not import torch.
CHECKED_ARCHITECTURES = ".snakemake/diffrobust/checked-architectures.json"

try:
    RESOLVED = resolve_config(config_sources(), checked_architectures=CHECKED_ARCHITECTURES)
    REGISTRY = load_checkpoint_registry()
except ConfigError as error:
    raise WorkflowError(f"Configuration error:\n{error}") from None
CFG = RESOLVED.config
for note in RESOLVED.notes:
    logger.warning(f"Config: {note}")


def check_local_device():
    """Called when a run starts (not in dry runs): if jobs run on this machine, a CUDA device that is not here is an
    error now, not in the first job. On a cluster the DAG is built on a login node and the jobs run elsewhere; there
    each job's own check stops it."""
    if not CFG["device"].startswith("cuda") or not workflow.executor_plugin.common_settings.local_exec:
        return
    from diffrobust.device import DeviceError, resolve_device

    try:
        resolve_device(CFG["device"], key="config key 'device'")
    except DeviceError as error:
        raise WorkflowError(f"Configuration error:\n{error}") from None


def gpu_request(wildcards):
    """The cluster's GPU request of a job that runs networks: `gpu=1`, which the SLURM executor turns into
    `sbatch --gpus=1` (profiles/slurm adds a model or another mechanism); 0 when the job runs here, or on the CPU.
    A function of the job, not a value computed when the Snakefile is read: Snakemake reads the Snakefile before it
    picks the executor, and only at job time says whether jobs go to a cluster (whose nodes have the GPUs)."""
    return int(not workflow.local_exec and CFG["device"] != "cpu")


def local_gpu_claim(wildcards):
    """What a job that runs networks on this machine's GPU claims of `local_gpu`, which the default profile caps at 1
    so that such jobs run one at a time; 0 for jobs that will run on this machine's CPU (device cpu, or device auto
    without a GPU here), so that they run side by side, and for jobs sent to a cluster. Its own name, not `gpu`:
    Snakemake always adds profiles/default (the workflow profile) to `--profile profiles/slurm`, and a cap on `gpu`
    there would let a cluster run one GPU job at a time."""
    from diffrobust.gpus import visible_nvidia_gpus

    if not workflow.local_exec or CFG["device"] == "cpu" or (CFG["device"] == "auto" and visible_nvidia_gpus() == 0):
        return 0
    return 1


PRESET = CFG["preset"]
DATASET = CFG["dataset"]
RESULTS = f"results/{PRESET}"
LOGS = f"logs/{PRESET}"
BENCHMARKS = f"benchmarks/{PRESET}"
CHECKPOINT_LOCK = "config/checkpoints.lock.yaml"


# Every output path of the DAG, spelled once: the rules take their outputs from here (the {wildcards} stay
# wildcards) and the input functions fill them in with `path(...)`.
PATHS = {
    "checkpoint": "data/checkpoints/{name}/{file}",
    "dataset_arrays": "data/datasets/{dataset}/splits.npz",
    "dataset_meta": "data/datasets/{dataset}/meta.json",
    "dataset_record": "data/datasets/{dataset}/run.json",
    "model": f"{RESULTS}/models/{{role}}/model.pt",
    "losses": f"{RESULTS}/models/{{role}}/loss.tsv",
    "classifier_metrics": f"{RESULTS}/models/classifier/metrics.json",
    "adversarial_metrics": f"{RESULTS}/models/adversarial/metrics.json",
    "shard_tsv": f"{RESULTS}/densepure/{{method}}/sigma{{sigma}}/shard{{shard}}.tsv",
    "shard_labels": f"{RESULTS}/densepure/{{method}}/sigma{{sigma}}/shard{{shard}}.labels.npz",
    "shard_work": f"{RESULTS}/densepure/{{method}}/sigma{{sigma}}/work/shard{{shard}}",
    "votes_tsv": f"{RESULTS}/densepure/{{method}}/sigma{{sigma}}/votes{{votes}}.tsv",
    "attack_set": f"{RESULTS}/attacks/{{defense}}/{{attack}}/{{threat}}/shard{{shard}}.npz",
    "attack_work": f"{RESULTS}/attacks/{{defense}}/{{attack}}/{{threat}}/work/shard{{shard}}",
    "transfer_eval": f"{RESULTS}/evaluations/{{defense}}/from-{{source}}/{{attack}}/{{threat}}.npz",
    "sigma_sweep": f"{RESULTS}/rdc/sigma_sweep_{{threat}}.tsv",
    "ldm_model": f"{RESULTS}/models/ldm/model",
    "ldm_losses": f"{RESULTS}/models/ldm/loss.tsv",
    "protected_set": f"{RESULTS}/pixel_barrier/protected/{{attack}}.npz",
    "edit_table": f"{RESULTS}/pixel_barrier/edits/{{attack}}.tsv",
    "edit_grid": f"{RESULTS}/pixel_barrier/edits/{{attack}}.grid.npz",
    "report_html": f"{RESULTS}/reports/{{notebook}}.html",
    "report_ipynb": f"{RESULTS}/reports/{{notebook}}.ipynb",
    # the summary of every claim (notebooks/summary.py): the first page to open
    "summary_html": f"{RESULTS}/reports/index.html",
    "summary_ipynb": f"{RESULTS}/reports/summary.ipynb",
}


def path(kind, **values):
    """PATHS[kind] with its wildcards filled in."""
    return PATHS[kind].format(**values)


def as_json(value):
    """Compact JSON for passing a config block to the CLI (quoted in shell with {params.x:q})."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- data --------------------------------------------------------------------------------------------------------


def dataset_files(dataset=DATASET):
    return {
        "arrays": path("dataset_arrays", dataset=dataset),
        "meta": path("dataset_meta", dataset=dataset),
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
        path("checkpoint", name=name, file=entry["path"])
        for name, entry in checkpoint_files(REGISTRY, CFG["checkpoints"])
        if entry["urls"] or not only_automatic
    ]


def fetch_arguments(wildcards):
    """`diffrobust fetch` flags for one registry file: mirrors, published digests, the by-hand instructions."""
    entry = next((e for e in REGISTRY[wildcards.name]["files"] if e["path"] == wildcards.file), None)
    if entry is None:
        raise WorkflowError(f"config/checkpoints.yaml: checkpoint {wildcards.name!r} has no file {wildcards.file!r}")
    mirror = CFG["checkpoint_mirror"]
    urls = ([f"{mirror.rstrip('/')}/{wildcards.name}/{wildcards.file}"] if mirror else []) + list(entry["urls"])
    words = [f"--url={url}" for url in urls]
    words += [f"--{key}={entry[key]}" for key in ("sha256", "md5", "size") if key in entry]
    if "manual" in REGISTRY[wildcards.name]:
        words.append(f"--manual={REGISTRY[wildcards.name]['manual']}")
    return " ".join(shlex.quote(word) for word in words)


# --- models ------------------------------------------------------------------------------------------------------

DATASET_DIR = str(Path(path("dataset_meta", dataset=DATASET)).parent)


def model_source(role):
    """What a job loads for `role` (diffusion, multihead, classifier, adversarial): a model file the DAG writes, or
    a checkpoint name from config/checkpoints.yaml (paper scale)."""
    models = CFG["models"]
    if role == "multihead":
        return path("model", role="multihead")
    source = models[role]["source"]
    if source is None:  # models.adversarial.source unset: the preset has no adversarially trained model
        raise WorkflowError(f"preset {PRESET!r} has no {role} model (config key 'models.{role}.source' is unset); "
                            "set it to 'train' (MNIST presets) or to a checkpoint of config/checkpoints.yaml")
    return path("model", role=role) if source == "train" else source


def registry_files(name):
    """Where the files of checkpoint `name` of config/checkpoints.yaml are downloaded to."""
    return [path("checkpoint", name=name, file=entry["path"]) for entry in REGISTRY[name]["files"]]


def model_files(role):
    """Files a job that loads `role` depends on."""
    source = model_source(role)
    if source.endswith(".pt"):
        return [source]
    return registry_files(source)


def adversarial_training_inputs(wildcards):
    """Inputs of train_adversarial; refuses to train where the config names no training (the config check refuses
    source 'train' off MNIST), so that asking for the file by path cannot stand in for a missing checkpoint."""
    source = CFG["models"]["adversarial"]["source"]
    if source != "train":
        raise WorkflowError(f"train_adversarial: config key 'models.adversarial.source' is {source!r}, not 'train', "
                            f"for preset {PRESET!r}; the DAG trains the adversarial baseline only where it says so")
    return dataset_files()


# Keys of a models.<role> block that say how a trained network runs in certification, not how it is trained
INFERENCE_ONLY_KEYS = ("precision", "compile")


def training_settings(role):
    """Params helper: the models.<role> block without its inference-only keys, so that switching a network's
    precision or torch.compile mode for certification does not retrain it."""
    return as_json({key: value for key, value in CFG["models"][role].items() if key not in INFERENCE_ONLY_KEYS})


def adversarial_settings():
    """The train-classifier --adversarial settings: the classifier's architecture with the PGD training block."""
    return as_json({"architecture": CFG["models"]["classifier"]["architecture"],
                    "training": CFG["models"]["adversarial"]["training"]})


def multihead_init():
    init = CFG["models"]["multihead"]["init"]
    return model_source("diffusion") if init == "diffusion" else init


def multihead_init_files(wildcards):
    init = CFG["models"]["multihead"]["init"]
    if init == "diffusion":
        return model_files("diffusion")
    return registry_files(init)


# --- DensePure / DDS certification ---------------------------------------------------------------------------------

DENSEPURE = CFG["densepure"]
SIGMAS = [str(sigma) for sigma in DENSEPURE["sigmas"]]


def densepure_shards():
    return list(range(plan.num_shards(CFG["subsets"]["densepure"], eval_split_size(CFG), DENSEPURE["shard_size"],
                                      name="densepure")))


def certify_threads(wildcards):
    """Threads of a certification job: densepure.threads, or every core of the run."""
    return DENSEPURE["threads"] or workflow.cores


def vote_counts(method):
    """Vote counts merged for a method: DDS has one; DensePure the ablation's and the full K."""
    return [1] if method == "dds" else sorted(set(DENSEPURE["vote_ablation"]) | {DENSEPURE["votes"]})


def certify_inputs(wildcards):
    return {**dataset_files(), "diffusion": model_files("diffusion"), "classifier": model_files("classifier")}


def shard_bundles(wildcards):
    return [path("shard_labels", method=wildcards.method, sigma=wildcards.sigma, shard=shard)
            for shard in densepure_shards()]


def densepure_targets():
    return [path("votes_tsv", method=method, sigma=sigma, votes=k)
            for method in ("dds", "densepure") for sigma in SIGMAS for k in vote_counts(method)]


# --- empirical robustness: DiffPure's and RDC's adversarial sets ---------------------------------------------------

DIFFPURE = CFG["diffpure"]
RDC = CFG["rdc"]
THREATS = list(DIFFPURE["threats"])
RDC_THREATS = list(RDC["threats"])
# The transfer check replays the set made against the undefended classifier by this attack on the defense.
TRANSFER_ATTACK = "standard" if "standard" in DIFFPURE["attacks"] else next(iter(DIFFPURE["attacks"]))
RDC_TRANSFER_ATTACK = "rdc_standard" if "rdc_standard" in RDC["attacks"] else next(iter(RDC["attacks"]))


def attack_stage(attack):
    """The stage (diffpure, rdc) whose config block defines `attack` (or the attack a derived check is made of);
    attack names are unique across stages (config check)."""
    base = plan.base_attack(attack)
    for stage in ("diffpure", "rdc"):
        if base in CFG[stage]["attacks"]:
            return stage
    raise WorkflowError(f"no stage defines the attack {attack!r}")


def stage_models(stage):
    """A stage's model sources: `train` means the DAG's own model of that role; a role may name one source per
    threat model ({linf: ..., l2: ...}: RDC's adversarially trained baselines)."""
    own = {"conditional": "diffusion", "unconditional": "diffusion", "diffusion": "diffusion"}

    def resolved(role, source):
        return path("model", role=own.get(role, role)) if source == "train" else source

    return {role: {threat: resolved(role, each) for threat, each in source.items()} if isinstance(source, dict)
            else resolved(role, source) for role, source in CFG[stage]["models"].items()}


def diffpure_models():
    return stage_models("diffpure")


def stage_model_files(stage, role, threat):
    """Files a job at `threat` loads for a stage's `role`."""
    source = plan.threat_source(stage_models(stage)[role], threat)
    return [source] if source.endswith(".pt") else registry_files(source)


def stage_shards(stage):
    return list(range(plan.num_shards(CFG["subsets"][stage], eval_split_size(CFG), CFG[stage]["shard_size"])))


def diffpure_shards():
    return stage_shards("diffpure")


def stage_defense_attacks(stage, defense):
    return plan.DEFENSE_ATTACKS[stage](CFG[stage], defense)


def attack_roles(stage, defense):
    if stage == "diffpure":
        return ["classifier"] if defense == "undefended" else ["classifier", "diffusion"]
    return list(plan.RDC_ROLES[defense])


def attack_inputs(wildcards):
    stage = attack_stage(wildcards.attack)
    return {**dataset_files(), **{role: stage_model_files(stage, role, wildcards.threat)
                                  for role in attack_roles(stage, wildcards.defense)}}


def set_shards(defense, attack, threat):
    return [path("attack_set", defense=defense, attack=attack, threat=threat, shard=shard)
            for shard in stage_shards(attack_stage(attack))]


def transfer_inputs(wildcards):
    return {**attack_inputs(wildcards), "sets": set_shards(wildcards.source, wildcards.attack, wildcards.threat)}


def attack_params(kind):
    """Params helper: the stage, settings block, models and subset of an attack or evaluate job, as the CLI takes
    them (the stage follows from the attack's name)."""

    def value(wildcards):
        stage = attack_stage(wildcards.attack)
        return {"stage": stage, "settings": as_json(CFG[stage]), "models": as_json(stage_models(stage)),
                "subset": as_json(CFG["subsets"][stage])}[kind]

    return value


def attack_threads(wildcards):
    return CFG[attack_stage(wildcards.attack)]["threads"] or workflow.cores


def attack_threads_of(stage):
    return CFG[stage]["threads"] or workflow.cores


def diffpure_targets():
    sets = [shard for defense in ("undefended", "diffpure") for attack in stage_defense_attacks("diffpure", defense)
            for threat in THREATS for shard in set_shards(defense, attack, threat)]
    transfers = [path("transfer_eval", defense="diffpure", source="undefended", attack=TRANSFER_ATTACK, threat=threat)
                 for threat in THREATS]
    return sets + transfers


def rdc_targets():
    sets = [shard for defense in RDC["defenses"] for attack in stage_defense_attacks("rdc", defense)
            for threat in RDC_THREATS for shard in set_shards(defense, attack, threat)]
    transfers = [path("transfer_eval", defense="rdc", source="undefended", attack=RDC_TRANSFER_ATTACK, threat=threat)
                 for threat in RDC_THREATS]
    return sets + transfers + [path("sigma_sweep", threat=RDC["sweep"]["threat"])]


def sweep_inputs(wildcards):
    models = {role: stage_model_files("rdc", role, wildcards.threat) for _, role, _ in plan.sweep_heads(RDC)}
    return {**dataset_files(), **models, "sets": set_shards("dc", RDC["checks"]["attack"], wildcards.threat)}


# --- Pixel is a Barrier -------------------------------------------------------------------------------------------

PIXEL_BARRIER = CFG["pixel_barrier"]
PIXEL_BARRIER_SETS = ["none", "random"] + list(PIXEL_BARRIER["attacks"])


def pixel_barrier_source(role):
    """What the stage loads for `role` (ldm, pixel, classifier): a file or folder the DAG writes, a checkpoint
    folder under data/checkpoints (the LDM is read as a diffusers folder), or a checkpoint name."""
    source = PIXEL_BARRIER["models"][role]
    if role == "ldm":
        return path("ldm_model") if source == "train" else f"data/checkpoints/{source}"
    if source == "train":
        return model_source({"pixel": "diffusion", "classifier": "classifier"}[role])
    return source


def pixel_barrier_models():
    models = {role: pixel_barrier_source(role) for role in ("ldm", "pixel")}
    models["classifier"] = pixel_barrier_source("classifier") if PIXEL_BARRIER["models"]["classifier"] else None
    models["features"] = PIXEL_BARRIER["models"]["features"]  # "classifier", a registry name or None
    for role in ("if_stage2", "upscaler"):  # diffusers folders under data/checkpoints
        if PIXEL_BARRIER["models"][role]:
            models[role] = f"data/checkpoints/{PIXEL_BARRIER['models'][role]}"
    for role in ("lpips", "fid_inception"):  # single weight files
        if PIXEL_BARRIER["models"][role]:
            models[role] = registry_files(PIXEL_BARRIER["models"][role])[0]
    return models


def pixel_barrier_model_files(wildcards):
    """Inputs of the protect and edit jobs: the LDM folder (or its checkpoint files), the pixel model, the classifier."""
    files = {"ldm": path("ldm_model") if PIXEL_BARRIER["models"]["ldm"] == "train"
             else registry_files(PIXEL_BARRIER["models"]["ldm"])}
    for role, dag_role in (("pixel", "diffusion"), ("classifier", "classifier")):
        source = PIXEL_BARRIER["models"][role]
        if source is None:
            continue
        files[role] = model_files(dag_role) if source == "train" else registry_files(source)
    if PIXEL_BARRIER["models"]["features"] not in (None, "classifier"):
        files["features"] = registry_files(PIXEL_BARRIER["models"]["features"])
    for role in ("if_stage2", "upscaler", "lpips", "fid_inception"):
        if PIXEL_BARRIER["models"][role]:
            files[role] = registry_files(PIXEL_BARRIER["models"][role])
    return files


def pixel_barrier_target_input(wildcards):
    """The target image file, an input of the protect job of an attack that reads it (config.TARGET_IMAGE_ATTACKS):
    a newer file reruns the job."""
    from diffrobust.config import pixel_barrier_target_file

    file = pixel_barrier_target_file(PIXEL_BARRIER, wildcards.attack)
    return {"target": file} if file else {}


def pixel_barrier_target_argument(wildcards):
    """Params helper: `--target-sha256 <digest of the target image>` for the protect and edit jobs of an attack that
    reads it ("" for the others). As a param the digest is part of the jobs' identity: a target with other pixels
    reruns them even when its modification time is older than their outputs, and the jobs check it."""
    from diffrobust.config import pixel_barrier_target_file
    from diffrobust.provenance import dag_fingerprints

    file = pixel_barrier_target_file(PIXEL_BARRIER, wildcards.attack)
    digest = dag_fingerprints([file], INPUT_DIGESTS, max_bytes=None)[file] if file else None
    return f"--target-sha256 {digest}" if digest else ""


def pixel_barrier_job_settings(kind):
    """The CLI --settings of a protect or edit job (diffrobust.config.PIXEL_BARRIER_JOB_KEYS)."""
    from diffrobust.config import pixel_barrier_job_settings as job_settings

    return as_json(job_settings(PIXEL_BARRIER, kind))


def pixel_barrier_targets():
    return [path(kind, attack=attack) for attack in PIXEL_BARRIER_SETS for kind in ("edit_table", "edit_grid")]


# --- reports -----------------------------------------------------------------------------------------------------


def multihead_report_files():
    """The multi-head model the models report shows: only where a report of RDC asks for the network anyway (the
    imagenet preset has no class-conditional model to fine-tune one from)."""
    return [model_source("multihead")] if "rdc_table" in CFG["reports"] else []


# The summary (notebooks/summary.py) judges the claims of these reports, from the files they read.
PAPER_REPORTS = ["densepure_table1", "diffpure_table", "rdc_table", "pixel_barrier"]
# The notebooks rendered by render_report (the summary has its own rule: its page is index.html).
NOTEBOOK_REPORTS = [name for name in CFG["reports"] if name != "summary"]


def report_inputs(wildcards):
    return notebook_inputs(wildcards.notebook)


def notebook_inputs(notebook):
    inputs = {"notebook": f"notebooks/{notebook}.py"}
    if notebook == "data_report":
        inputs.update(dataset_files())
        inputs["checkpoints"] = checkpoint_targets(only_automatic=True)
    elif notebook == "models_report":
        inputs.update(dataset_files())
        inputs["models"] = model_files("diffusion") + model_files("classifier") + multihead_report_files()
    elif notebook == "densepure_table1":
        inputs["tables"] = densepure_targets()
        inputs["published"] = "config/published_values.yaml"
    elif notebook == "diffpure_table":
        inputs.update(dataset_files())
        inputs["sets"] = diffpure_targets()
        inputs["published"] = "config/published_values.yaml"
    elif notebook == "rdc_table":
        inputs.update(dataset_files())
        inputs["sets"] = rdc_targets() + diffpure_targets()
        inputs["published"] = "config/published_values.yaml"
    elif notebook == "pixel_barrier":
        inputs["tables"] = pixel_barrier_targets()
        inputs["published"] = "config/published_values.yaml"
        if PIXEL_BARRIER["models"]["ldm"] == "train":
            inputs["losses"] = path("ldm_losses")
    return inputs


def summary_inputs(wildcards):
    """The summary reads what the paper reports of this preset read (not their HTML: it links to them by name)."""
    inputs = {"notebook": "notebooks/summary.py", "published": "config/published_values.yaml"}
    for name in PAPER_REPORTS:
        if name in CFG["reports"]:
            inputs.update({f"{name}_{key}": value for key, value in notebook_inputs(name).items()
                           if key not in ("notebook", "published")})
    return inputs


# Stat cache of dag_fingerprints: an input is read again at DAG build only when its size, mtime or inode changed.
INPUT_DIGESTS = ".snakemake/diffrobust/input-digests.json"


def flat_inputs(inputs):
    """The paths of an input dict ({name: path or [paths]}), in order."""
    return [path for value in inputs.values() for path in ([value] if isinstance(value, str) else value)]


def report_input_fingerprints(wildcards):
    """Params helper: the fingerprints of a report's inputs (provenance.dag_fingerprints), its identity by content."""
    from diffrobust.provenance import dag_fingerprints

    return as_json(dag_fingerprints(flat_inputs(report_inputs(wildcards)), INPUT_DIGESTS))


def summary_input_fingerprints(wildcards):
    """Params helper: report_input_fingerprints of the summary."""
    from diffrobust.provenance import dag_fingerprints

    return as_json(dag_fingerprints(flat_inputs(summary_inputs(wildcards)), INPUT_DIGESTS))


def summary_parameters(wildcards):
    """The summary's `parameters` cell: each paper report's own parameters, for the stages' report_claims."""
    return as_json({"preset": PRESET, "dataset": DATASET, "published": "config/published_values.yaml",
                    "pages": NOTEBOOK_REPORTS,
                    "reports": {name: notebook_parameters(name) for name in PAPER_REPORTS if name in CFG["reports"]}})


def report_parameters(wildcards):
    """Values for the notebook's `parameters` cell, taken from the config."""
    return as_json(notebook_parameters(wildcards.notebook))


def notebook_parameters(notebook):
    """The `parameters` cell of notebooks/<notebook>.py, from the config."""
    if notebook == "data_report":
        parameters = {
            "preset": PRESET,
            "description": CFG["description"],
            "dataset_dir": DATASET_DIR,
            "subsets": CFG["subsets"],
            "checkpoint_names": CFG["checkpoints"],
            "checkpoint_lock": CHECKPOINT_LOCK,
        }
    elif notebook == "models_report":
        parameters = {
            "preset": PRESET,
            "dataset_dir": DATASET_DIR,
            "diffusion": model_source("diffusion"),
            "multihead": model_source("multihead") if multihead_report_files() else None,
            "classifier": model_source("classifier"),
            "loss_logs": {role: path("losses", role=role) for role in ("diffusion", "multihead", "classifier")
                          if model_source(role).endswith(".pt") and (role != "multihead" or multihead_report_files())},
            "sigmas": [0.25, 0.5, 1.0],
            "seed": CFG["seed"],
            "device": CFG["device"],
            **CFG["models_report"],
        }
    elif notebook == "densepure_table1":
        parameters = {
            "preset": PRESET,
            "dataset": DATASET,
            "results_dir": f"{RESULTS}/densepure",
            "sigmas": DENSEPURE["sigmas"],
            "radii": DENSEPURE["radii"],
            "votes": DENSEPURE["votes"],
            "vote_ablation": vote_counts("densepure"),
            "settings": {key: DENSEPURE[key] for key in ("n0", "n", "alpha", "num_steps", "reverse", "tstar_rule",
                                                         "dds_tstar_rule", "batch_size", "classifier_preprocess")},
            "subset": CFG["subsets"]["densepure"],
            "published": "config/published_values.yaml",
        }
    elif notebook == "diffpure_table":
        parameters = {
            "preset": PRESET,
            "dataset": DATASET,
            "dataset_dir": DATASET_DIR,
            "results_dir": RESULTS,
            "settings": DIFFPURE,
            "subset": CFG["subsets"]["diffpure"],
            "shards": diffpure_shards(),
            "transfer_attack": TRANSFER_ATTACK,
            "models": diffpure_models(),
            "published": "config/published_values.yaml",
        }
    elif notebook == "rdc_table":
        parameters = {
            "preset": PRESET,
            "dataset": DATASET,
            "dataset_dir": DATASET_DIR,
            "results_dir": RESULTS,
            "settings": RDC,
            "diffpure_settings": DIFFPURE,
            "subset": CFG["subsets"]["rdc"],
            "shards": stage_shards("rdc"),
            "diffpure_shards": diffpure_shards(),
            "transfer_attack": RDC_TRANSFER_ATTACK,
            "sweep": path("sigma_sweep", threat=RDC["sweep"]["threat"]),
            "models": stage_models("rdc"),
            "published": "config/published_values.yaml",
        }
    elif notebook == "pixel_barrier":
        parameters = {
            "preset": PRESET,
            "dataset": DATASET,
            "results_dir": f"{RESULTS}/pixel_barrier",
            "settings": PIXEL_BARRIER,
            "sets": PIXEL_BARRIER_SETS,
            "subset": CFG["subsets"]["pdm_pure"],
            "models": pixel_barrier_models(),
            "ldm_training": CFG["models"]["ldm"] if PIXEL_BARRIER["models"]["ldm"] == "train" else None,
            "ldm_losses": path("ldm_losses") if PIXEL_BARRIER["models"]["ldm"] == "train" else None,
            "published": "config/published_values.yaml",
        }
    else:
        raise WorkflowError(f"no parameters defined for notebook {notebook!r}")
    return parameters


def all_targets():
    """Checkpoints and every report. The executed .ipynb is requested too: after a failed render Snakemake restores
    the previous HTML (flagged update, with a fresh modification time), and the missing .ipynb is what makes the
    next run render again."""
    summary = [path("summary_html"), path("summary_ipynb")] if "summary" in CFG["reports"] else []
    return checkpoint_targets() + summary + [path(kind, notebook=name) for name in NOTEBOOK_REPORTS
                                             for kind in ("report_html", "report_ipynb")]


def input_dataset_folder(wildcards, input):
    """Params helper: the prepared dataset folder, derived from the job's meta.json input."""
    return str(Path(input.meta).parent)


def output_folder(wildcards, output):
    """Params helper: the folder of the job's first output."""
    return str(Path(output[0]).parent)


def json_settings(value):
    """Params helper: a config block as compact JSON (avoids lambdas in rules)."""
    return as_json(value)
