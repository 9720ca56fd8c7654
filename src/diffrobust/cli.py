"""Command-line entry point: `diffrobust <subcommand>` (or `python -m diffrobust`).

Every Snakemake rule is one call of one subcommand; all logic lives in the library modules. Structured arguments
(settings blocks of the config, notebook parameters) travel as JSON strings and are held to the config schema, as
the DAG build holds the config. A bad argument (a value out of range, a settings block that is not the config's, a
shard the subset does not have, an attack the settings do not define) exits with status 2, argparse's usage-error
status, and one line naming the argument and what it allows; other errors meant for the user (a missing or damaged
input file, say) exit with status 1 and a one-paragraph message. Neither prints a traceback (`-v` shows it).
"""

import argparse
import importlib
import json
import logging
import os
import sys

from diffrobust.argtypes import choice_list, existing_file, positive_int, positive_int_list  # noqa: F401
from diffrobust.errors import DiffrobustError

log = logging.getLogger("diffrobust")


class UsageError(DiffrobustError):
    """A bad command-line argument found after parsing (it needs another argument to judge): `main` prints one line
    naming `argument` and exits with status 2, as argparse does for the arguments it checks itself."""

    def __init__(self, argument, message):
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage summary is one `--help` away), still exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None


def _schema_at(key):
    """The config schema's rule for `key` ("densepure.alpha"; "densepure.sigmas[]" for an item of a list), as one
    schema (its alternatives under anyOf), found by `config.schemas_at`, the walker the config's own checks use."""
    nodes = _schemas_at(key)
    return nodes[0] if len(nodes) == 1 else {"anyOf": nodes}


def _schemas_at(key):
    """Every schema config key `key` may follow (config.schemas_at of its dotted path; "[]" is an item of a list)."""
    from diffrobust.config import CONFIG_SCHEMA, read_yaml, schemas_at

    path = [part for name in key.split(".") for part in ([name[:-2], 0] if name.endswith("[]") else [name])]
    return schemas_at(read_yaml(CONFIG_SCHEMA), path)


def schema_problems(value, key):
    """What is wrong with `value` as config key `key`, one line each ([] when valid). Integers must be ints: JSON
    and YAML floats such as 60.0 would pass jsonschema's integer type and crash the job later."""
    import jsonschema

    strict_integers = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, v: isinstance(v, int) and not isinstance(v, bool))
    validator_class = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=strict_integers)
    errors = validator_class(_schema_at(key)).iter_errors(value)
    return [_problem_line(key, error) for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]


def _problem_line(key, error):
    """One schema error as `key.path: message`; for a value that fits none of several forms (anyOf), the nearest
    form's own error and the keys of each form, instead of jsonschema's bare "not valid under any"."""
    if error.context:
        forms = [option for option in error.schema.get(error.validator, []) if isinstance(option, dict)]
        shapes = ["{" + ", ".join(form["properties"]) + "}" for form in forms if "properties" in form]
        by_form = {}
        for sub in error.context:  # schema_path starts with the index of the form the sub-error belongs to
            by_form.setdefault(sub.schema_path[0], []).append(sub)
        nearest = min(by_form.values(), key=len)[0]  # the form with the fewest errors is the one meant
        where = [*error.absolute_path, *nearest.absolute_path]
        suffix = f" (it takes one of the forms {' or '.join(shapes)})" if shapes else ""
        return f"{'.'.join([key.removesuffix('[]'), *map(str, where)])}: {nearest.message}{suffix}"
    return f"{'.'.join([key.removesuffix('[]'), *map(str, error.absolute_path)])}: {error.message}"


def missing_keys(value, key):
    """Dotted keys below config key `key` that `value` lacks although the merged config always holds them (the
    schema requires them or gives them a default; a stage's seed takes the global one). A direct call must pass the
    block the workflow passes; the schema alone would let `{}` through, its defaults being filled in before it is
    checked."""
    from diffrobust.config import CONFIG_SCHEMA, STAGE_SEEDS, _alternatives, read_yaml

    schema = read_yaml(CONFIG_SCHEMA)  # the root, against which _alternatives follows a $ref

    def walk(nodes, value, where):
        if len(nodes) != 1 or not isinstance(value, dict):  # alternatives, or not a mapping: the schema check's
            return []
        node, missing = nodes[0], []
        named = node.get("properties", {})
        for name, child in named.items():
            if name in value:
                missing += walk(_alternatives(child, schema), value[name], f"{where}.{name}")
            elif "default" in child or name in node.get("required", ()) or (where, name) in STAGE_SEEDS:
                missing.append(f"{where}.{name}")
        if isinstance(node.get("additionalProperties"), dict):  # maps of named entries (attacks, purifiers)
            for name in value.keys() - named.keys():
                missing += walk(_alternatives(node["additionalProperties"], schema), value[name], f"{where}.{name}")
        return missing

    return walk(_schemas_at(key), value, key.removesuffix("[]"))


def block_problem(value, key):
    """What keeps `value` (a JSON argument) from being config key `key` as the DAG build holds the config: a key
    the merged config always holds that it lacks, or a value outside the schema; None when there is nothing."""
    missing = missing_keys(value, key)
    if missing:
        return (f"lacks {', '.join(missing)} (the {key} config block as the workflow passes it: "
                "`diffrobust check-config --preset <preset>` prints the merged config)")
    problems = schema_problems(value, key)
    return "out of range (as config key " + "; ".join(problems) + ")" if problems else None


def check_block(value, key, argument):
    """`value` when it is config key `key` (block_problem); else UsageError naming `argument`."""
    problem = block_problem(value, key)
    if problem:
        raise UsageError(argument, problem)
    return value


def _checked(key, parse=json.loads):
    """An argparse type: parse the argument, then hold it to the config schema's rule for `key`, so that a direct
    call of a subcommand is checked as the DAG build checks the config (no negative radii, inf or nan from it)."""

    def convert(text):
        try:
            value = parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error}") from None
        problems = schema_problems(value, key)
        if problems:
            raise argparse.ArgumentTypeError("out of range (as config key " + "; ".join(problems) + ")")
        return value

    convert.__name__ = key  # argparse names the type in its message
    return convert


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; shards are numbered from 0")
    return value


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_prepare_dataset(args):
    from diffrobust import data
    from diffrobust.provenance import run_record

    settings = args.settings
    with run_record(args.run_record, config={"dataset": args.dataset, "settings": settings, "subsets": args.subsets},
                    seed=settings.get("split_seed")) as record:
        if args.dataset == "mnist":
            meta = data.prepare_mnist(args.out_dir, settings["test_per_class"], settings["split_seed"], settings["pad_to"])
        elif args.dataset == "cifar10":
            meta = data.prepare_cifar10(args.out_dir, args.source, settings.get("md5"))
        else:
            indices = data.all_subset_indices(args.subsets, data.EVAL_SPLIT_SIZE["imagenet"])
            meta = data.prepare_imagenet(args.out_dir, settings["val_dir"], indices, settings["image_size"])
        record["splits"] = meta["splits"]
    log.info("prepared %s in %s: %s", args.dataset, args.out_dir,
             {name: split["count"] for name, split in meta["splits"].items()})


def cmd_rehearse(args):
    from diffrobust.rehearsal.run import RehearsalError, rehearse

    if args.project_only:
        from diffrobust.rehearsal.projection import project_scratch

        if not args.scratch:
            raise UsageError("--scratch", "--project-only reads DIR/rehearsal.json: name the folder")
        try:
            project_scratch(args.scratch)
        except FileNotFoundError as error:
            raise DiffrobustError(str(error)) from None
        return
    if not args.preset:
        raise UsageError("--preset", "required (cifar10 or imagenet) unless --project-only")
    try:
        rehearse(args.preset, args.scratch, cores=args.cores, seed=args.seed, device=args.device)
    except RehearsalError as error:
        raise DiffrobustError(str(error)) from None


def cmd_fetch(args):
    from diffrobust.download import fetch
    from diffrobust.provenance import run_record

    with run_record(args.run_record, config=vars(args) | {"func": None}) as record:
        record["verified"] = fetch(args.url, args.dest, sha256=args.sha256, md5=args.md5, size=args.size,
                                   lock=args.lock, lock_key=args.lock_key, manual_hint=args.manual)
    log.info("verified %s", args.dest)


def cmd_render_notebook(args):
    """Render a report; its run record lists the sha256 of every input it read (`inputs`) and, against the record of
    the last render, which of them changed since (`changed_since_last_render`, why it was rendered again)."""
    from diffrobust.provenance import changed_files, recorded_inputs, run_record
    from diffrobust.reports import render_notebook

    last = recorded_inputs(args.run_record)
    with run_record(args.run_record, config={"notebook": args.notebook, "parameters": args.parameters}) as record:
        record["inputs"] = render_notebook(args.notebook, args.parameters, args.ipynb, args.html, inputs=args.inputs)
        record["changed_since_last_render"] = changed_files(last, record["inputs"]) if last else None
    if record["changed_since_last_render"]:
        log.info("inputs changed since the last render: %s", ", ".join(record["changed_since_last_render"]))
    log.info("rendered %s -> %s", args.notebook, args.html)


def cmd_train_diffusion(args):
    from diffrobust import training
    from diffrobust.provenance import run_record

    model = args.settings
    with run_record(args.run_record, config=model, seed=args.seed) as record:
        loaded = training.train_diffusion(args.dataset_dir, args.out_dir, architecture=model["architecture"],
                                          schedule=model["schedule"], num_timesteps=model["num_timesteps"],
                                          variance=model["variance"], prediction=model.get("prediction", "eps"),
                                          seed=args.seed, device=args.device, **model["training"])
        record["device"] = loaded.extra["device"]
    log.info("trained the diffusion model -> %s/model.pt", args.out_dir)


def cmd_finetune_diffusion(args):
    from diffrobust import training
    from diffrobust.models import load_source
    from diffrobust.provenance import run_record

    with run_record(args.run_record, config={"init": args.init, "variant": args.variant, **args.settings},
                    seed=args.seed) as record:
        loaded = training.finetune_diffusion(load_source(args.init), args.dataset_dir, args.out_dir,
                                             variant=args.variant, seed=args.seed, device=args.device, **args.settings)
        record["device"] = loaded.extra["device"]
    log.info("fine-tuned (%s) %s -> %s/model.pt", args.variant, args.init, args.out_dir)


def cmd_train_classifier(args):
    from diffrobust import training
    from diffrobust.provenance import run_record

    model = args.settings
    train = training.train_adversarial if args.adversarial else training.train_classifier
    with run_record(args.run_record, config=model | ({"adversarial": True} if args.adversarial else {}),
                    seed=args.seed) as record:
        loaded = train(args.dataset_dir, args.out_dir, architecture=model["architecture"], seed=args.seed,
                       device=args.device, **model["training"])
        record["device"] = loaded.extra["device"]
        record["metrics"] = loaded.extra["metrics"]
    log.info("trained the %sclassifier -> %s/model.pt", "adversarial " if args.adversarial else "", args.out_dir)


def cmd_certify_shard(args):
    from diffrobust.stages import densepure
    from diffrobust.provenance import run_record

    settings = args.settings
    with run_record(args.run_record, config={"method": args.method, "sigma": args.sigma, "shard": args.shard,
                                             "settings": settings, "subset": args.subset,
                                             "diffusion": args.diffusion, "classifier": args.classifier,
                                             "device": args.device, "diffusion_precision": args.diffusion_precision,
                                             "classifier_precision": args.classifier_precision,
                                             "diffusion_compile": args.diffusion_compile,
                                             "classifier_compile": args.classifier_compile},
                    seed=settings["seed"]) as record:
        record.update(densepure.run_shard(
            method=args.method, settings=settings, sigma=args.sigma, dataset_dir=args.dataset_dir,
            subset=args.subset, shard=args.shard, diffusion=args.diffusion, classifier=args.classifier,
            work_dir=args.work_dir, out_tsv=args.out_tsv, out_labels=args.out_labels, device=args.device,
            precisions={"diffusion": args.diffusion_precision, "classifier": args.classifier_precision},
            compiles={"diffusion": args.diffusion_compile, "classifier": args.classifier_compile}))
    log.info("certified shard %d (%s, sigma %s): %s", args.shard, args.method, args.sigma, record)


def cmd_merge_votes(args):
    from diffrobust import certify
    from diffrobust.stages import densepure
    from diffrobust.data import read_meta
    from diffrobust.provenance import run_record

    num_classes = read_meta(args.dataset_dir)["num_classes"]
    with run_record(args.run_record, config=vars(args) | {"func": None}):
        rows = densepure.merge_bundles(args.bundles, args.votes, args.sigma, args.alpha, num_classes, args.method)
        certify.write_certification_tsv(rows, args.out_tsv)
    log.info("merged %d images with %d votes -> %s", len(rows), args.votes, args.out_tsv)


# Stages whose defenses the attack jobs build, with the defenses each knows (checked here, before torch loads).
ATTACK_STAGES = {"diffpure": ("undefended", "diffpure"),
                 "rdc": ("undefended", "adversarial", "dc", "rdc", "dc_multihead", "rdc_multihead")}


def _attack_stage(args):
    """The stage module of an attack, evaluate or sweep job, after holding its arguments to the config as the DAG
    build does (torch is not loaded yet): --settings to the `<stage>` block, --models to `<stage>.models`, --subset
    to `subsets.<stage>`, --defense, --threat, --attack and --shard to what these define, --sets to --threat."""
    from diffrobust.stages import plan

    stage = getattr(args, "stage", "rdc")  # sigma-sweep: the rdc stage's
    defense = getattr(args, "defense", None)
    if defense is not None and defense not in ATTACK_STAGES[stage]:
        raise UsageError("--defense", f"{defense!r}: stage {stage} has {', '.join(ATTACK_STAGES[stage])}")
    settings = check_block(args.settings, stage, "--settings")
    check_block(args.models, f"{stage}.models", "--models")
    if args.threat not in settings["threats"]:
        raise UsageError("--threat", f"{args.threat!r} is not a threat of --settings ({stage}.threats has "
                                     f"{', '.join(settings['threats'])})")
    if getattr(args, "subset", None) is not None:
        check_block(args.subset, f"subsets.{stage}", "--subset")
    if getattr(args, "attack", None) is not None and args.attack not in plan.attack_names(settings):
        raise UsageError("--attack", f"{args.attack!r} is not an attack of --settings ({stage}.attacks and the "
                                     f"derived checks: {', '.join(plan.attack_names(settings))})")
    if getattr(args, "shard", None) is not None:
        _check_shard(args.shard, args.subset, settings["shard_size"], args.dataset_dir, stage)
    for path in getattr(args, "sets", None) or ():
        made_at = stored_set_threat(path)
        if made_at is not None and made_at != args.threat:
            raise UsageError("--sets", f"{path} was made at threat {made_at}, not --threat {args.threat}; pass the "
                                       f"{args.threat} set, or --threat {made_at}")
    return importlib.import_module(f"diffrobust.stages.{stage}")


def _check_shard(shard, subset, shard_size, dataset_dir, stage):
    """--shard against the shards `subset` makes of the dataset's evaluation split (read from its meta.json)."""
    from diffrobust import data
    from diffrobust.stages import plan

    split_size = data.eval_split_size(data.read_meta(dataset_dir))
    try:
        shards = plan.num_shards(subset, split_size, shard_size, name=stage)
    except data.DataError as error:
        raise UsageError("--subset", str(error)) from None
    if shard >= shards:
        raise UsageError("--shard", f"{shard} is not a shard of subsets.{stage} (the subset makes {shards} shard(s) "
                                    f"of {shard_size} images on {dataset_dir}: 0 to {shards - 1})")


def stored_set_threat(path):
    """The threat a stored adversarial set was made at (its identity's settings.threat); None when the file cannot
    be read here, which the job's own reading of the set then reports."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as contents:
            return json.loads(str(contents["identity"]))["settings"]["threat"]
    except Exception:  # noqa: BLE001 -- a damaged or foreign file is reported by the stage's reader, naming it
        return None


def cmd_attack_shard(args):
    from diffrobust.provenance import run_record

    stage = _attack_stage(args)
    settings = args.settings
    with run_record(args.run_record, config={"stage": args.stage, "defense": args.defense, "attack": args.attack,
                                             "threat": args.threat, "shard": args.shard, "settings": settings,
                                             "subset": args.subset, "models": args.models, "device": args.device},
                    seed=settings["seed"]) as record:
        record.update(stage.attack_shard(
            defense=args.defense, attack=args.attack, threat=args.threat, shard=args.shard, settings=settings,
            subset=args.subset, dataset_dir=args.dataset_dir, models=args.models, out_path=args.out,
            work_dir=args.work_dir, device=args.device))
    log.info("attacked shard %d (%s on %s, %s): robust accuracy %.3f", args.shard, args.attack, args.defense,
             args.threat, record["robust_accuracy"])


def cmd_evaluate_set(args):
    from diffrobust.provenance import run_record

    stage = _attack_stage(args)
    settings = args.settings
    with run_record(args.run_record, config={"stage": args.stage, "defense": args.defense, "threat": args.threat,
                                             "sets": args.sets, "settings": settings, "models": args.models,
                                             "device": args.device},
                    seed=settings["seed"]) as record:
        record.update(stage.evaluate_set(defense=args.defense, threat=args.threat, set_paths=args.sets,
                                         settings=settings, dataset_dir=args.dataset_dir, models=args.models,
                                         out_path=args.out, device=args.device))
    log.info("scored %s on %d stored examples: accuracy %.3f", args.defense, record["images"], record["accuracy"])


def _device(name):
    from diffrobust.device import resolve_device

    return resolve_device(name)


def cmd_train_ldm(args):
    from diffrobust import training_ldm
    from diffrobust.provenance import run_record

    model = args.settings
    with run_record(args.run_record, config=model, seed=args.seed) as record:
        result = training_ldm.train_mini_ldm(args.dataset_dir, args.out_dir, architecture=model["architecture"],
                                             vae_training=model["vae_training"],
                                             unet_training=model["unet_training"], seed=args.seed,
                                             device=_device(args.device))
        record["scaling_factor"] = result["scaling_factor"]
    log.info("trained the mini latent diffusion model -> %s/model", args.out_dir)


def _pixel_barrier_settings(args, kind):
    from diffrobust.config import missing_job_keys

    missing = missing_job_keys(args.settings, kind)
    if missing:
        raise UsageError("--settings", f"lacks {', '.join(missing)}: pass the {kind} job's settings as the workflow "
                                       "does (diffrobust.config.pixel_barrier_job_settings of the merged pixel_barrier "
                                       "block)")
    problems = schema_problems(args.settings, "pixel_barrier")
    if problems:
        raise UsageError("--settings", "out of range (as config key " + "; ".join(problems) + ")")
    if getattr(args, "subset", None) is not None:
        check_block(args.subset, "subsets.pdm_pure", "--subset")
    return args.settings


def cmd_protect(args):
    from diffrobust.provenance import run_record
    from diffrobust.stages import pixel_barrier

    settings = _pixel_barrier_settings(args, "protect")
    with run_record(args.run_record, config={"attack": args.attack, "settings": settings, "subset": args.subset,
                                             "models": args.models, "device": args.device},
                    seed=settings["seed"]) as record:
        record.update(pixel_barrier.run_protect(args.attack, settings=settings, subset=args.subset,
                                                models=args.models, dataset_dir=args.dataset_dir, out=args.out,
                                                device=_device(args.device), target_sha256=args.target_sha256))
    log.info("protected %d images with %s -> %s", record["images"], args.attack, args.out)


def cmd_edit_protected(args):
    from diffrobust.provenance import run_record
    from diffrobust.stages import pixel_barrier

    settings = _pixel_barrier_settings(args, "edit")
    with run_record(args.run_record, config={"attack": args.attack, "settings": settings, "models": args.models,
                                             "set": args.set, "device": args.device},
                    seed=settings["seed"]) as record:
        record.update(pixel_barrier.run_edit(args.attack, settings=settings, models=args.models, set_path=args.set,
                                             out_tsv=args.out_tsv, out_grid=args.out_grid,
                                             device=_device(args.device), target_sha256=args.target_sha256))
    log.info("edited and purified the %s sets: %d rows -> %s", args.attack, record["rows"], args.out_tsv)


def cmd_sigma_sweep(args):
    from diffrobust.provenance import run_record
    from diffrobust.stages import rdc

    _attack_stage(args)
    with run_record(args.run_record, config={"threat": args.threat, "settings": args.settings, "sets": args.sets,
                                             "models": args.models, "device": args.device},
                    seed=args.settings["seed"]) as record:
        record.update(rdc.sigma_sweep(threat=args.threat, settings=args.settings, subset=args.subset,
                                      dataset_dir=args.dataset_dir, models=args.models, set_paths=args.sets,
                                      out_path=args.out, device=args.device))
    log.info("sigma sweep (%s): %d rows -> %s", args.threat, record["rows"], args.out)


def cmd_bench(args):
    from diffrobust.bench import networks as bench

    bench.run(args)


def cmd_bench_certify(args):
    from diffrobust.bench import certify as bench_certify

    bench_certify.run(args)


def cmd_bench_attack(args):
    from diffrobust.bench import attacks as bench_attacks

    bench_attacks.run(args)


def cmd_bench_rdc(args):
    from diffrobust.bench import rdc as bench_rdc

    bench_rdc.run(args)


def cmd_gpu_check(args):
    from diffrobust.bench import gpu_check

    gpu_check.run(args)


def cmd_check_config(args):
    from diffrobust.config import load_config

    overrides = {"preset": args.preset} | args.overrides
    config = load_config(overrides)
    print(json.dumps(config, indent=2))


# --- parser ------------------------------------------------------------------------------------------------------

BENCH_COMMANDS = (
    ("bench", "diffrobust.bench.networks", cmd_bench, "CPU/GPU forward throughput of a diffusion network (prints figures)"),
    ("bench-certify", "diffrobust.bench.certify", cmd_bench_certify,
     "noisy samples/s through denoise + classify, time shares"),
    ("bench-attack", "diffrobust.bench.attacks", cmd_bench_attack,
     "adaptive-attack cost per image on DiffPure (full and bpda gradients), mini and CIFAR-10 sizes"),
    ("bench-rdc", "diffrobust.bench.rdc", cmd_bench_rdc,
     "diffusion classifier / RDC cost per image, single- against multi-head, mini and CIFAR-10 sizes"),
    ("gpu-check", "diffrobust.bench.gpu_check", cmd_gpu_check,
     "GPU against CPU: label agreement, output differences, samples/s"),
)


DEVICE_HELP = "auto (GPU when present), cpu, cuda or cuda:N"


def build_parser(argv=None):
    parser = OneLineParser(prog="diffrobust", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare-dataset", help="write a dataset's splits.npz and meta.json")
    prepare.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "imagenet"])
    prepare.add_argument("--out-dir", required=True)
    prepare.add_argument("--settings", type=_json, default={}, help="the datasets.<name> config block (JSON)")
    prepare.add_argument("--subsets", type=_json, default={}, help="the subsets config block (JSON; ImageNet keeps only these)")
    prepare.add_argument("--source", help="input file (CIFAR-10 tarball)")
    prepare.add_argument("--run-record", help="where to write the run record (JSON)")
    prepare.set_defaults(func=cmd_prepare_dataset)

    fetch = commands.add_parser("fetch", help="download one file with resume, retries and checksum verification")
    fetch.add_argument("--url", action="append", default=[], help="URL (repeat for mirrors); none = place by hand")
    fetch.add_argument("--dest", required=True)
    fetch.add_argument("--sha256")
    fetch.add_argument("--md5")
    fetch.add_argument("--size", type=int)
    fetch.add_argument("--lock", help="lock file recording the sha256 seen at first download")
    fetch.add_argument("--lock-key")
    fetch.add_argument("--manual", help="what to do by hand if the file cannot be fetched")
    fetch.add_argument("--run-record")
    fetch.set_defaults(func=cmd_fetch)

    render = commands.add_parser("render-notebook", help="execute a notebook with papermill and render HTML")
    render.add_argument("--notebook", required=True, type=existing_file, help="the notebook (.py, jupytext)")
    render.add_argument("--parameters", type=_json, default={})
    render.add_argument("--ipynb", required=True)
    render.add_argument("--html", required=True)
    render.add_argument("--inputs", nargs="*", default=[],
                        help="the files (or folders) the notebook reads: hashed before and after the render")
    render.add_argument("--run-record")
    render.set_defaults(func=cmd_render_notebook)

    for name, func, text in (("train-diffusion", cmd_train_diffusion, "train the mini diffusion model"),
                             ("finetune-diffusion", cmd_finetune_diffusion, "fine-tune a diffusion model"),
                             ("train-classifier", cmd_train_classifier, "train the mini classifier")):
        train = commands.add_parser(name, help=f"{text} (resumable: rerun after a kill continues)")
        train.add_argument("--dataset-dir", required=True)
        train.add_argument("--out-dir", required=True)
        train.add_argument("--settings", required=True, type=_json, help="the models.<name> config block (JSON)")
        train.add_argument("--seed", type=int, default=0)
        train.add_argument("--device", default="auto", help=DEVICE_HELP)
        train.add_argument("--run-record")
        if name == "finetune-diffusion":
            train.add_argument("--init", required=True, help="model file (.pt) or checkpoint name to start from")
            train.add_argument("--variant", required=True, choices=["conditional", "multihead"])
        if name == "train-classifier":
            # the same job with PGD in every step: settings.training then also holds the PGD keys of the
            # models.adversarial.training block (threat, eps, step_size, steps, random_start, adversarial_fraction)
            train.add_argument("--adversarial", action="store_true",
                               help="PGD adversarial training (Madry et al.) with the PGD keys of settings.training")
        train.set_defaults(func=func)

    shard = commands.add_parser("certify-shard", help="randomized-smoothing certification of one shard (DDS/DensePure)")
    shard.add_argument("--method", required=True, choices=["dds", "densepure"])
    shard.add_argument("--sigma", required=True, type=_checked("densepure.sigmas[]", float))
    shard.add_argument("--shard", required=True, type=_non_negative_int, help="0-based shard number")
    shard.add_argument("--settings", required=True, type=_checked("densepure"), help="the densepure config block (JSON)")
    shard.add_argument("--subset", required=True, type=_checked("subsets.densepure"),
                       help="the subsets.densepure config entry (JSON)")
    shard.add_argument("--dataset-dir", required=True)
    shard.add_argument("--diffusion", required=True, help="model file (.pt) or checkpoint name")
    shard.add_argument("--classifier", required=True, help="model file (.pt) or checkpoint name")
    shard.add_argument("--work-dir", required=True, help="resumable per-image results (kept between attempts)")
    shard.add_argument("--device", default="auto", help=DEVICE_HELP)
    for role in ("diffusion", "classifier"):
        shard.add_argument(f"--{role}-precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                           help=f"autocast precision of the {role} network")
        shard.add_argument(f"--{role}-compile", default="none",
                           choices=["none", "default", "max-autotune", "reduce-overhead"],
                           help=f"torch.compile mode of the {role} network (reduce-overhead: CUDA graphs, GPU only)")
    shard.add_argument("--out-tsv", required=True)
    shard.add_argument("--out-labels", required=True)
    shard.add_argument("--run-record")
    shard.set_defaults(func=cmd_certify_shard)

    merge = commands.add_parser("merge-votes", help="re-certify from stored per-draw labels with K votes")
    merge.add_argument("--bundles", nargs="+", required=True)
    merge.add_argument("--votes", required=True, type=_checked("densepure.votes", int))
    merge.add_argument("--sigma", required=True, type=_checked("densepure.sigmas[]", float))
    merge.add_argument("--alpha", required=True, type=_checked("densepure.alpha", float))
    merge.add_argument("--method", choices=["dds", "densepure"], help="refuse bundles of another method")
    merge.add_argument("--dataset-dir", required=True)
    merge.add_argument("--out-tsv", required=True)
    merge.add_argument("--run-record")
    merge.set_defaults(func=cmd_merge_votes)

    for name, func, text in (("attack-shard", cmd_attack_shard, "make the adversarial set of one shard"),
                             ("evaluate-set", cmd_evaluate_set, "score a defense on a stored adversarial set")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--stage", default="diffpure", choices=sorted(ATTACK_STAGES),
                             help="the paper whose defenses and config block the job uses")
        command.add_argument("--defense", required=True)
        command.add_argument("--threat", required=True, choices=["linf", "l2"])
        command.add_argument("--settings", required=True, type=_json, help="the stage's config block (JSON)")
        command.add_argument("--models", required=True, type=_json,
                             help='{"classifier": ..., "diffusion": ..., ...}: model files (.pt) or checkpoint names')
        command.add_argument("--dataset-dir", required=True)
        command.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
        command.add_argument("--out", required=True, help="the .npz to write")
        command.add_argument("--run-record")
        if name == "attack-shard":
            command.add_argument("--attack", required=True, help="an attack of <stage>.attacks, or a derived check")
            command.add_argument("--shard", required=True, type=_non_negative_int, help="0-based shard number")
            command.add_argument("--subset", required=True, type=_json, help="the stage's subsets entry (JSON)")
            command.add_argument("--work-dir", required=True, help="finished batches (kept between attempts)")
        else:
            command.add_argument("--sets", nargs="+", required=True, help="the shards of the stored set (.npz)")
        command.set_defaults(func=func)

    sweep = commands.add_parser("sigma-sweep", help="RDC: DC accuracy against the number of sigma points")
    sweep.add_argument("--threat", required=True, choices=["linf", "l2"])
    sweep.add_argument("--settings", required=True, type=_json, help="the rdc config block (JSON)")
    sweep.add_argument("--subset", required=True, type=_json, help="the subsets.rdc entry (JSON)")
    sweep.add_argument("--models", required=True, type=_json, help="the rdc stage's model sources (JSON)")
    sweep.add_argument("--sets", nargs="+", required=True, help="the shards of the set made against dc (.npz)")
    sweep.add_argument("--dataset-dir", required=True)
    sweep.add_argument("--device", default="auto")
    sweep.add_argument("--out", required=True)
    sweep.add_argument("--run-record")
    sweep.set_defaults(func=cmd_sigma_sweep)

    ldm = commands.add_parser("train-ldm", help="train the mini latent diffusion model (resumable)")
    ldm.add_argument("--dataset-dir", required=True)
    ldm.add_argument("--out-dir", required=True)
    ldm.add_argument("--settings", required=True, type=_checked("models.ldm"), help="the models.ldm config block (JSON)")
    ldm.add_argument("--seed", type=int, default=0)
    ldm.add_argument("--device", default="auto", help=DEVICE_HELP)
    ldm.add_argument("--run-record")
    ldm.set_defaults(func=cmd_train_ldm)

    for name, func, text in (("protect", cmd_protect, "Pixel is a Barrier: protect the images with one attack"),
                             ("edit-protected", cmd_edit_protected,
                              "Pixel is a Barrier: edit and purify one attack's protected sets")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--attack", required=True, help="a protective attack, or none / random")
        command.add_argument("--settings", required=True, type=_json, help="the pixel_barrier config block (JSON)")
        command.add_argument("--models", required=True, type=_json,
                             help='{"ldm": folder, "pixel": model, "classifier": model or null}')
        command.add_argument("--device", default="auto", help=DEVICE_HELP)
        command.add_argument("--run-record")
        command.add_argument("--target-sha256", help="sha256 of pixel_barrier.target.file, for the attacks that read it "
                                                     "(the protect job refuses other bytes, the edit job a set made with them)")
        if name == "protect":
            command.add_argument("--subset", required=True, type=_json, help="the subsets.pdm_pure entry (JSON)")
            command.add_argument("--dataset-dir", required=True)
            command.add_argument("--out", required=True, help="the .npz to write")
        else:
            command.add_argument("--set", required=True, help="the protect job's .npz")
            command.add_argument("--out-tsv", required=True)
            command.add_argument("--out-grid", required=True)
        command.set_defaults(func=func)

    # The benchmarks' options live in their modules, which import torch, FLOP counters and scipy: they are added
    # only when that command is asked for, so that `diffrobust --help` and the light jobs start fast.
    for name, module, func, text in BENCH_COMMANDS:
        command = commands.add_parser(name, help=text)
        if name in (argv if argv is not None else sys.argv[1:]):
            importlib.import_module(module).add_arguments(command)
        command.set_defaults(func=func)

    rehearse = commands.add_parser(
        "rehearse", help="run a paper-scale preset's whole DAG offline on locally made official-format files")
    rehearse.add_argument("--preset", choices=["cifar10", "imagenet"])
    rehearse.add_argument("--scratch", help="scratch folder (default results/rehearsal/<preset>; emptied first)")
    rehearse.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    rehearse.add_argument("--device", default="cpu", help=DEVICE_HELP)
    rehearse.add_argument("--seed", type=int, default=0)
    rehearse.add_argument("--project-only", action="store_true",
                          help="run nothing: project the real preset's hours from --scratch DIR/rehearsal.json, "
                               "store them in it and print them")
    rehearse.set_defaults(func=cmd_rehearse)

    check = commands.add_parser("check-config", help="print the merged, validated config of a preset")
    check.add_argument("--preset", default="mini")
    check.add_argument("--overrides", type=_json, default={})
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv=None):
    from diffrobust.allocator import keep_freed_memory

    keep_freed_memory()  # before the first tensor: freed activations are reused, not faulted in again
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except DiffrobustError as error:
        if args.verbose:
            log.exception("traceback of the error below")
        print(f"diffrobust {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0
