"""The hours the real preset would take, projected from a rehearsal's measured jobs (issue 22, "What to build" 5).

A rehearsal runs every job of a preset with the real networks but shrunk work (config/rehearsal/<preset>.yaml: fewer
images, samples, attack iterations, reverse steps). Its jobs' seconds, measured on one device, scale to the real
preset's on the same device:

    real seconds of a job group = (rehearsal seconds - overhead x rehearsal jobs) x real units / rehearsal units
                                  + overhead x real jobs

per job group (a rule with its non-shard wildcards: `attack/diffpure/rand/linf`, `certify_shard/dds/0.25`).
A group's *work units* (one small function per rule, named after it) count what grows between the rehearsal and the
real run: images x network passes per image, where a pass through a purified model counts its reverse steps, an
attack iteration is one forward-and-backward pass (a forward-only pass counts FORWARD_COST of one), and so on. The
networks and their sizes are the same in both runs (the rehearsal's point), so the cost of one unit cancels.

The *overhead* is a job's fixed start-up (process, imports, config): the record's `startup_seconds` where a run
measured it, else the fastest job of the rules that load no network (OVERHEAD_RULES: merge_votes), whose seconds
are start-up and a few table reads. Network loading is not in it: it is counted as work and scaled, which
overstates the projection where a rehearsal job is dominated by loading.

Assumptions, all towards an upper bound: every image stays correctly classified at every attack step (clean
accuracy 1): AutoAttack runs each later attack only on the images still robust, and an AutoAttack run on a real
defense stops early on the images it breaks; the projection counts every attack on every image. Jobs run one after
another on one device (the hours are device-hours: divide by the number of devices for wall-clock time).

Not projected (listed with why): downloads (the rehearsal's come from a local mirror), the dataset preparation (the
rehearsal's dataset is a few images), and any real job group the rehearsal has no job of.
"""

import json
from collections import defaultdict
from pathlib import Path

from diffrobust.config import MORE, eval_split_size
from diffrobust.stages import plan

# A forward-only network pass, as a fraction of a forward-and-backward pass (backward ~ 2 forwards).
FORWARD_COST = 1 / 3
# Rules that load no network: their seconds are the job start-up (the overhead estimate).
OVERHEAD_RULES = ("merge_votes",)
NOT_PROJECTED = {
    "download_checkpoint": "the rehearsal fetched from a mirror on 127.0.0.1: a real download's time is the network's",
    "download_cifar10": "the rehearsal fetched from a mirror on 127.0.0.1: a real download's time is the network's",
    "prepare_dataset": "the rehearsal's dataset holds a few images; the real preparation reads the whole dataset "
                       "(minutes of CPU, no network)",
}
NUM_CLASSES = {"cifar10": 10, "imagenet": 1000, "mnist": 10}
# AutoAttack (pyautoattack 0.2.0): per version, the attacks run and APGD's restarts and EOT draws (AutoAttack's
# constructor: APGD 5 restarts, 100 iterations; `standard` and `rand` set 1 restart; `rand` sets 20 EOT draws;
# APGD-T and FAB-T 9 target classes, 1 restart; Square 5,000 queries).
AUTOATTACK_VERSIONS = {
    "standard": {"attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "n_restarts": 1, "eot_iter": 1},
    "rand": {"attacks": ["apgd-ce", "apgd-dlr"], "n_restarts": 1, "eot_iter": 20},
    "custom": {"attacks": None, "n_restarts": 5, "eot_iter": 1},
}
AUTOATTACK_DEFAULTS = {"n_iter": 100, "n_target_classes": 9, "n_queries": 5000}
# Published cost anchors (/work/shared/reference/evaluation_anchors.md "Cost figures", paper_values.md).
ANCHORS = {
    "dds": "DDS issue #1: 825 noisy img/s on an A100 (batch 1,000) = about 121 s per CIFAR-10 image at N = 100,000; "
           "about 469 s per ImageNet image at N = 10,000",
    "diffpure": "DiffPure issue #28: APGD-DLR 118,755 s for one 64-image batch on 4xA100 (CIFAR-10)",
}


# --- the work of a job group, one function per rule ------------------------------------------------------------


def subset_images(config, stage):
    """Images in a stage's subset (subsets.<stage>) of the evaluation split."""
    from diffrobust import data

    return len(data.subset_indices(config["subsets"][stage], eval_split_size(config), name=stage))


def stage_of_attack(config, attack):
    """The stage (diffpure, rdc) whose attacks block defines `attack` (or the attack a derived check is made of)."""
    base = plan.base_attack(attack)
    return next(stage for stage in ("diffpure", "rdc") if base in config[stage]["attacks"])


def attack_settings(settings, attack):
    """An attack's settings with the derived checks applied: `<name>-more` multiplies its iterations by
    checks.iterations_factor (robustness.attack_plan; the budget of `-large` does not change the work)."""
    chosen = dict(settings["attacks"][plan.base_attack(attack)])
    if attack.endswith(MORE):
        key = "steps" if chosen["method"] == "eot_pgd" else "n_iter"
        chosen[key] = int(settings["checks"]["iterations_factor"]) * int(chosen.get(key) or 100)
    return chosen


def autoattack_passes(chosen, num_classes):
    """Gradient passes per image of an AutoAttack run (each through the defense; forward-only Square queries count
    FORWARD_COST), every attack run on every image (clean accuracy 1)."""
    version = AUTOATTACK_VERSIONS[chosen["version"]]
    attacks = version["attacks"] or list(chosen["attacks"])
    n_iter = int(chosen.get("n_iter") or AUTOATTACK_DEFAULTS["n_iter"])
    restarts = int(chosen.get("n_restarts") or version["n_restarts"])
    eot = int(chosen.get("eot_iter") or version["eot_iter"])
    targets = min(int(chosen.get("n_target_classes") or AUTOATTACK_DEFAULTS["n_target_classes"]), num_classes - 1)
    queries = int(chosen.get("n_queries") or AUTOATTACK_DEFAULTS["n_queries"])
    passes = {"apgd-ce": restarts * n_iter * eot, "apgd-dlr": restarts * n_iter * eot,
              "apgd-t": targets * n_iter * eot, "fab-t": targets * n_iter, "fab": n_iter,
              "square": queries * FORWARD_COST}
    return sum(passes[name] for name in attacks)


def eot_pgd_passes(chosen):
    """Passes per image of BPDA+EOT PGD: steps x EOT draws of the gradient, then the defense's EOT evaluation."""
    return int(chosen["steps"]) * int(chosen["eot_attack_reps"]) + int(chosen["eot_defense_reps"]) * FORWARD_COST


def attack_passes(config, attack):
    """Passes through the defense per image of one attack (its final scoring included: eval_draws forwards)."""
    settings = config[stage_of_attack(config, attack)]
    chosen = attack_settings(settings, attack)
    if chosen["method"] == "autoattack":
        passes = autoattack_passes(chosen, NUM_CLASSES[config["dataset"]])
    elif chosen["method"] == "eot_pgd":
        passes = eot_pgd_passes(chosen)
    else:
        raise ValueError(f"attack {attack!r}: no work count for method {chosen['method']!r}")
    return passes + int(settings["eval_draws"]) * FORWARD_COST


def sigma_points(dc_settings):
    """Sigma points of a diffusion classifier: RDC's "edm" grid is linspace(sigma_min, sigma_max, sigma_steps)
    without its last point; the "vp" grid its listed timesteps."""
    if dc_settings.get("sigma_grid", "edm") == "edm":
        return int(dc_settings["sigma_steps"]) - 1
    if dc_settings.get("timesteps"):
        return len(dc_settings["timesteps"])
    raise ValueError("a 'vp' sigma grid without timesteps uses the whole diffusion chain: its length is the "
                     "network's, not the config's")


def defense_calls(config, stage, defense, threat):
    """Network calls of one pass through a defense: DiffPure's reverse-SDE steps (stages.diffpure's count) and the
    classifier; the diffusion classifier's sigma points (times the classes for the single-head model, once for all
    classes for the multi-head one), RDC's likelihood-maximization steps before it; one for a plain classifier."""
    settings = config[stage]
    if defense in ("undefended", "adversarial"):
        return 1
    if defense == "diffpure":
        from diffrobust.stages.diffpure import purifier_network_calls

        return purifier_network_calls(settings, threat) + 1
    lm = int(settings["lm"]["steps"]) if defense.startswith("rdc") else 0
    if defense.endswith("multihead"):
        return lm + sigma_points(settings["multihead_dc"])
    return lm + sigma_points(settings["dc"]) * NUM_CLASSES[config["dataset"]]


def attack(config, defense, attack_name, threat):
    """Work of every shard of an attack on a defense at a threat: images x passes x calls per pass."""
    stage = stage_of_attack(config, attack_name)
    return subset_images(config, stage) * attack_passes(config, attack_name) * defense_calls(config, stage, defense,
                                                                                             threat)


def evaluate(config, defense, source, attack_name, threat):
    """Work of the transfer check: the stored set scored on the defense (eval_draws forward passes per image)."""
    stage = stage_of_attack(config, attack_name)
    draws = int(config[stage]["eval_draws"])
    return subset_images(config, stage) * draws * defense_calls(config, stage, defense, threat)


def certify_shard(config, method, sigma):
    """Work of every shard of a certification: images x (N0 + N) noise draws x network calls per draw (DDS: one
    denoising call and the classifier; DensePure: K votes of num_steps reverse calls and the classifier)."""
    settings = config["densepure"]
    draws = int(settings["n0"]) + int(settings["n"])
    calls = 2 if method == "dds" else int(settings["votes"]) * (int(settings["num_steps"]) + 1)
    return subset_images(config, "densepure") * draws * calls


def merge_vote_counts(config, method):
    """The vote counts K merged for a method, one merge job each: DDS one; DensePure the ablation's and the full K."""
    settings = config["densepure"]
    return [1] if method == "dds" else sorted(set(settings["vote_ablation"]) | {settings["votes"]})


def merge_votes(config, method, sigma):
    """Work of the merges of a method at a sigma (no network): one re-certification per image and vote count."""
    return subset_images(config, "densepure") * len(merge_vote_counts(config, method))


def sigma_sweep(config, threat):
    """Work of RDC's sigma-point sweep: images x the sweep's sigma points summed over its point counts."""
    return subset_images(config, "rdc") * sum(int(points) for points in config["rdc"]["sweep"]["points"])


def finetune_multihead(config):
    """Work of the multi-head distillation: steps x batch size."""
    finetune = config["models"]["multihead"]["finetune"]
    return int(finetune["steps"]) * int(finetune["batch_size"])


def protect(config, attack_name):
    """Work of a protective attack: images x budgets x attack steps (`none` and `random` take no step: images x
    budgets)."""
    settings = config["pixel_barrier"]
    steps = 1 if attack_name in ("none", "random") else int(settings["steps"])
    return subset_images(config, "pdm_pure") * len(settings["budgets"]) * steps


def edit_protected(config, attack_name):
    """Work of editing a protected set: images x budgets x the edit's inference steps. The purifiers' own steps do
    not change between the runs but are scaled with the rest: an upper bound."""
    settings = config["pixel_barrier"]
    return (subset_images(config, "pdm_pure") * len(settings["budgets"])
            * int(settings["edit"]["num_inference_steps"]))


def render_report(config, notebook):
    """Work of a report: the models report samples num_eval images with sample_steps each; the other reports read
    result files (taken as measured: 1)."""
    if notebook == "models_report":
        return int(config["models_report"]["num_eval"]) * int(config["models_report"]["sample_steps"])
    return 1


WORK = {"attack": attack, "evaluate": evaluate, "certify_shard": certify_shard, "merge_votes": merge_votes,
        "sigma_sweep": sigma_sweep, "finetune_multihead": finetune_multihead, "protect": protect,
        "edit_protected": edit_protected, "render_report": render_report}
# Which paper stage a rule's jobs belong to (the per-stage subtotals).
STAGE_OF_RULE = {"certify_shard": "densepure", "merge_votes": "densepure", "sigma_sweep": "rdc",
                 "finetune_multihead": "rdc", "protect": "pixel_barrier", "edit_protected": "pixel_barrier",
                 "render_report": "reports"}


# --- the job groups of a config ------------------------------------------------------------------------------------


def job_groups(config):
    """{(rule, wildcard values...): job count} of the preset's DAG, from its config as workflow/rules/common.smk
    builds it (shards from the subsets and shard sizes); downloads and the dataset preparation left out."""
    reports, split = config["reports"], eval_split_size(config)
    groups = {}

    def shards(stage):
        return plan.num_shards(config["subsets"][stage], split, config[stage]["shard_size"], name=stage)

    if "densepure_table1" in reports:
        settings = config["densepure"]
        for method in ("dds", "densepure"):
            for sigma in map(str, settings["sigmas"]):
                groups[("certify_shard", method, sigma)] = shards("densepure")
                groups[("merge_votes", method, sigma)] = len(merge_vote_counts(config, method))
    stages = [stage for stage, report in (("diffpure", "diffpure_table"), ("rdc", "rdc_table"))
              if report in reports or (stage == "diffpure" and "rdc_table" in reports)]
    for stage in stages:
        settings = config[stage]
        defenses = ("undefended", "diffpure") if stage == "diffpure" else settings["defenses"]
        for defense in defenses:
            for attack_name in plan.DEFENSE_ATTACKS[stage](settings, defense):
                for threat in settings["threats"]:
                    groups[("attack", defense, attack_name, threat)] = shards(stage)
        transfer = {"diffpure": "standard", "rdc": "rdc_standard"}[stage]
        transfer = transfer if transfer in settings["attacks"] else next(iter(settings["attacks"]))
        for threat in settings["threats"]:
            groups[("evaluate", stage, "undefended", transfer, threat)] = 1
        if stage == "rdc":
            groups[("sigma_sweep", settings["sweep"]["threat"])] = 1
            if config["rdc"]["models"].get("multihead") == "train":
                groups[("finetune_multihead",)] = 1
    if "pixel_barrier" in reports:
        for attack_name in ["none", "random", *config["pixel_barrier"]["attacks"]]:
            groups[("protect", attack_name)] = 1
            groups[("edit_protected", attack_name)] = 1
    for notebook in reports:
        groups[("render_report", notebook)] = 1
    return groups


def job_group(job, preset):
    """(rule, wildcard values...) of a benchmarked job path (`cifar10/attack/dc/apgd_dlr/linf/shard0`): the preset
    folder, the shard and a merge's vote count dropped (a group is a rule's jobs that differ only in what the work
    function counts), the `sigma` and `from-` prefixes of the path's folders stripped."""
    parts = job.split("/")
    if parts[0] == preset:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1].startswith("shard") and parts[-1][5:].isdigit():
        parts = parts[:-1]
    if parts[0] == "merge_votes":
        parts = parts[:3]
    return tuple(wildcard_value(part) for part in parts)


def wildcard_value(folder):
    """A wildcard's value from its folder name in a benchmark path (`sigma0.25` -> `0.25`, `from-undefended` ->
    `undefended`)."""
    if folder.startswith("sigma") and folder[5:6].isdigit():
        return folder[5:]
    return folder[len("from-"):] if folder.startswith("from-") else folder


# --- the projection ------------------------------------------------------------------------------------------------


def startup_overhead(record):
    """(seconds, how): a job's fixed start-up, subtracted from each rehearsal job and added once per real job."""
    if record.get("startup_seconds") is not None:
        return float(record["startup_seconds"]), "measured start-up in the record (startup_seconds)"
    cheap = [job["seconds"] for job in record["jobs"] if job_group(job["job"], record["preset"])[0] in OVERHEAD_RULES]
    if cheap:
        return min(cheap), f"the fastest job of {', '.join(OVERHEAD_RULES)} (no network loaded)"
    return 0.0, "none subtracted (no job without a network in the record)"


def project(record, rehearsal_config, real_config):
    """The real preset's device-seconds per job group, per stage and in total, from a rehearsal record (its `jobs`:
    {'job', 'seconds', 'max_rss_mb'}) and the two merged configs. Returns a JSON-ready dict."""
    preset = record["preset"]
    overhead, overhead_how = startup_overhead(record)
    measured, gpu_memory = defaultdict(list), defaultdict(list)
    for job in record["jobs"]:
        group = job_group(job["job"], preset)
        measured[group].append(float(job["seconds"]))
        if job.get("peak_gpu_memory_mb") is not None:
            gpu_memory[group].append(float(job["peak_gpu_memory_mb"]))
    rehearsal_groups, real_groups = job_groups(rehearsal_config), job_groups(real_config)
    rows, not_projected = [], []
    for group, real_jobs in real_groups.items():
        seconds = measured.get(group)
        if not seconds:
            not_projected.append({"group": "/".join(group), "why": "the rehearsal has no job of this group"})
            continue
        work_function = WORK[group[0]]
        try:
            rehearsal_units = work_function(rehearsal_config, *group[1:])
            real_units = work_function(real_config, *group[1:])
        except ValueError as error:
            not_projected.append({"group": "/".join(group), "why": str(error)})
            continue
        rehearsal_work = sum(max(each - overhead, 0.0) for each in seconds)
        real_work = rehearsal_work * real_units / rehearsal_units
        rows.append({"group": "/".join(group), "rule": group[0], "stage": group_stage(group, real_config),
                     "rehearsal_jobs": len(seconds), "rehearsal_seconds": sum(seconds),
                     "rehearsal_units": rehearsal_units, "real_units": real_units, "real_jobs": real_jobs,
                     "rehearsal_planned_jobs": rehearsal_groups.get(group),
                     "peak_gpu_memory_mb": max(gpu_memory[group], default=None),
                     "real_seconds": real_work + overhead * real_jobs})
    for rule, jobs in not_projected_rules(measured, set(real_groups)).items():
        not_projected.append({"group": rule, "why": f"{NOT_PROJECTED[rule]} ({len(jobs)} rehearsal jobs, "
                                                   f"{sum(jobs):.1f} s)"})
    for group in sorted(set(measured) - set(real_groups)):
        if group[0] not in NOT_PROJECTED:
            not_projected.append({"group": "/".join(group), "why": "not a job of the real preset's DAG"})
    stages = defaultdict(float)
    for row in rows:
        stages[row["stage"]] += row["real_seconds"]
    device = record.get("device", "cpu")
    return {"preset": preset, "device": device, "unit": hours_unit(device), "cores": record.get("cores"),
            "overhead_seconds": overhead,
            "overhead_how": overhead_how,
            "assumptions": "clean accuracy 1 (every image attacked by every attack at every step; an upper bound); "
                           "jobs one after another on the rehearsal's device",
            "groups": rows, "stages_hours": {stage: seconds / 3600 for stage, seconds in sorted(stages.items())},
            "total_hours": sum(stages.values()) / 3600, "not_projected": not_projected,
            "anchors": anchors(rows, real_config)}


def not_projected_rules(measured, real_groups):
    """{rule: [seconds of its rehearsal jobs]} of the rules never projected (NOT_PROJECTED: downloads, dataset)."""
    rules = defaultdict(list)
    for group, seconds in sorted(measured.items()):
        if group not in real_groups and group[0] in NOT_PROJECTED:
            rules[group[0]] += seconds
    return dict(rules)


def hours_unit(device):
    """GPU-hours for a rehearsal on a CUDA device, CPU-hours (of the rehearsal machine with all its cores the
    jobs used, not core-hours) on the CPU."""
    device = str(device)
    return "GPU-hours" if device.startswith("cuda") else "CPU-hours" if device == "cpu" else f"{device}-hours"


def group_stage(group, config):
    """The paper stage (densepure, diffpure, rdc, pixel_barrier, reports) a job group's hours count towards."""
    if group[0] == "attack":
        return stage_of_attack(config, group[2])
    if group[0] == "evaluate":
        return stage_of_attack(config, group[3])
    return STAGE_OF_RULE[group[0]]


def anchors(rows, config):
    """Our projected figures in the units of the published ones: DDS seconds per image (per sigma), and the
    DiffPure APGD-DLR seconds per 64-image batch (half of the `rand` attack's work: APGD-CE and APGD-DLR, the same
    iterations and EOT draws each)."""
    figures = []
    dds = [row for row in rows if row["group"].startswith("certify_shard/dds/")]
    if dds:
        images = subset_images(config, "densepure")
        per_image = sum(row["real_seconds"] for row in dds) / len(dds) / images
        figures.append({"what": f"DDS certification per image at N = {config['densepure']['n']:,} (mean over "
                                f"sigmas)", "ours_seconds": per_image, "published": ANCHORS["dds"]})
    rand = [row for row in rows if row["group"] == "attack/diffpure/rand/linf"]
    if rand:
        images = subset_images(config, "diffpure")
        per_batch = rand[0]["real_seconds"] / images * 64 / 2
        figures.append({"what": "DiffPure APGD-DLR (half of AutoAttack rand, l-inf) per 64-image batch",
                        "ours_seconds": per_batch, "published": ANCHORS["diffpure"]})
    return figures


def configs_of(record):
    """The rehearsal's and the real preset's merged configs for a record (config/rehearsal/<preset>.yaml over the
    preset, and the preset alone)."""
    from diffrobust.config import load_config
    from diffrobust.rehearsal.run import rehearsal_settings

    preset = record["preset"]
    rehearsal = load_config({"preset": preset, **rehearsal_settings(preset)["overrides"]})
    return rehearsal, load_config({"preset": preset})


def project_record(record):
    """project() with the configs the record's preset names."""
    return project(record, *configs_of(record))


def format_projection(projection):
    """The projection as a text table: per job group, per stage, the total, the anchors, what is not projected."""
    unit = projection["unit"]
    cores = f", {projection['cores']} cores" if projection.get("cores") else ""
    lines = [f"projection of the real {projection['preset']} preset on {projection['device']}{cores} ({unit}); "
             f"overhead {projection['overhead_seconds']:.1f} s per job ({projection['overhead_how']}); assumes "
             f"{projection['assumptions']}",
             f"  {'job group':<52} {'jobs':>6} {'measured s':>11} {'GPU MB':>8} {'x work':>11} {'real jobs':>9} "
             f"{'hours':>11}"]
    for row in projection["groups"]:
        scale = row["real_units"] / row["rehearsal_units"]
        memory = "-" if row.get("peak_gpu_memory_mb") is None else f"{row['peak_gpu_memory_mb']:.0f}"
        lines.append(f"  {row['group']:<52} {row['rehearsal_jobs']:>6} {row['rehearsal_seconds']:>11.1f} "
                     f"{memory:>8} {scale:>11.4g} {row['real_jobs']:>9} {row['real_seconds'] / 3600:>11.2f}")
    for stage, hours in projection["stages_hours"].items():
        lines.append(f"  stage {stage:<46} {hours:>60.1f} {unit}")
    lines.append(f"  {'total':<52} {projection['total_hours']:>60.1f} {unit}")
    for figure in projection["anchors"]:
        lines.append(f"  anchor: {figure['what']}: ours {figure['ours_seconds']:,.0f} s on {projection['device']}; "
                     f"published: {figure['published']}")
    for item in projection["not_projected"]:
        lines.append(f"  not projected: {item['group']}: {item['why']}")
    return "\n".join(lines)


def job_gpu_memory(scratch, job):
    """A job's peak GPU memory in MB from its run record (logs/<job>.run.json, provenance.run_record's
    `peak_gpu_memory_mb`), or None (no record, or a job that used no GPU)."""
    path = Path(scratch) / "logs" / f"{job}.run.json"
    try:
        return json.loads(path.read_text()).get("peak_gpu_memory_mb")
    except (OSError, ValueError, AttributeError):
        return None


def store_projection(record, scratch):
    """Add each job's peak GPU memory (where its run record has one) and the projection to a rehearsal record,
    rewrite scratch/rehearsal.json, print the table; returns the projection."""
    for job in record["jobs"]:
        job["peak_gpu_memory_mb"] = job_gpu_memory(scratch, job["job"])
    record["projection"] = project_record(record)
    (Path(scratch) / "rehearsal.json").write_text(json.dumps(record, indent=1))
    print(format_projection(record["projection"]))
    return record["projection"]


def project_scratch(scratch):
    """`diffrobust rehearse --project-only --scratch DIR`: the projection of the rehearsal recorded in
    DIR/rehearsal.json, without running anything."""
    path = Path(scratch) / "rehearsal.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no rehearsal record (run `diffrobust rehearse --preset ... --scratch "
                                f"{scratch}` first)")
    return store_projection(json.loads(path.read_text()), scratch)
