"""`diffrobust rehearse --preset cifar10|imagenet`: a paper-scale preset's whole DAG, offline, on local files.

The rehearsal makes every file the preset downloads or expects the user to place -- each checkpoint of
config/checkpoints.yaml it uses, in its official format and at its official architecture size with seeded random
weights (`native`, `hub` and `imagenet_classifiers` writers), the CIFAR-10 tarball in the official pickle layout or an
ImageNet class-folder tree of JPEGs (`datasets`) -- into a scratch folder, serves the checkpoints and the tarball over
HTTP on 127.0.0.1 (`checkpoint_mirror`), and runs the repository's Snakefile in the scratch folder with
config/rehearsal/<preset>.yaml's overrides, which shrink the work (images, samples, iterations) but not the networks.

Nothing in the real checks is weakened: downloads go through the same fetch and verification (the scratch folder's
own lock file config/checkpoints.lock.yaml records the digests at first download), the dataset through the same md5
check (of the made tarball, recorded in the scratch config), every network through the same loader. What a rehearsal
proves: every job of the preset runs, on official-format files of official size, and every report and claim row
renders. What it cannot prove: any number of the papers (the weights are random).

Layout of the scratch folder (default results/rehearsal/<preset>):
    mirror/                 files served over HTTP (checkpoints as <name>/<path>, the CIFAR-10 tarball)
    imagenet/val/           the ImageNet tree (imagenet preset)
    config/config.yaml      the run's config: preset + rehearsal overrides + mirror + dataset digests
    config/checkpoints.lock.yaml, data/, results/, logs/, benchmarks/   the DAG's own files, as in a real run
    rehearsal.json          what was made (sizes, parameter counts, reduced networks) and the per-job figures
"""

import contextlib
import copy
import csv
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib import import_module
from pathlib import Path

import yaml

from diffrobust.config import CHECKPOINTS_REGISTRY_VARIABLE, REPO_ROOT, read_yaml

REHEARSAL_DIR = REPO_ROOT / "config" / "rehearsal"
PRESETS = ("cifar10", "imagenet")
# Modules with a WRITERS table: family (or, for checkpoints without an architecture block, checkpoint name) ->
# writer(entry, folder, *, seed, reduced) -> {'num_params', 'reduced'}.
WRITER_MODULES = ("diffrobust.rehearsal.native", "diffrobust.rehearsal.hub", "diffrobust.rehearsal.imagenet_classifiers",
                  "diffrobust.rehearsal.datasets")
# Repository files a run reads by relative path besides the config: linked into the scratch folder.
LINKED = ("notebooks", "config/published_values.yaml")


class RehearsalError(RuntimeError):
    """A rehearsal that could not be set up or whose DAG did not run every job."""


@functools.cache
def writers():
    """Every writer table merged (a module not present contributes nothing)."""
    table = {}
    for name in WRITER_MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        table.update(module.WRITERS)
    return table


def writer_key(name, entry):
    """The WRITERS key of a registry entry: its family, or its name when it has no architecture block."""
    return (entry.get("architecture") or {}).get("family") or name


def rehearsal_settings(preset):
    """config/rehearsal/<preset>.yaml: {'reduced': {checkpoint: why}, 'overrides': workflow config}."""
    path = REHEARSAL_DIR / f"{preset}.yaml"
    if preset not in PRESETS or not path.is_file():
        raise RehearsalError(f"no rehearsal for preset {preset!r}: the rehearsed presets are {', '.join(PRESETS)} "
                             f"(config/rehearsal/<preset>.yaml)")
    settings = read_yaml(path) or {}
    unknown = sorted(set(settings) - {"reduced", "overrides"})
    if unknown:
        raise RehearsalError(f"{path}: unknown keys {', '.join(unknown)} (expected reduced, overrides)")
    return {"reduced": dict(settings.get("reduced") or {}), "overrides": dict(settings.get("overrides") or {})}


def preset_checkpoints(config):
    """Registry checkpoints the preset's DAG fetches (its `checkpoints` list)."""
    return list(dict.fromkeys(config.get("checkpoints") or []))


def make_checkpoints(names, registry, mirror, *, seed, reduced, by_hand=None):
    """Write each checkpoint's files under mirror/<name>/ -- or, for a checkpoint the registry says to fetch by hand
    (`manual`: a gated repository), under by_hand/<name>/, where the user would put them; returns {name: what was
    made}."""
    made = {}
    for index, name in enumerate(names):
        entry = registry[name]
        key = writer_key(name, entry)
        if key not in writers():
            raise RehearsalError(f"checkpoint {name!r} ({key}): no rehearsal writer makes its files "
                                 f"(known: {', '.join(sorted(writers()))})")
        placed_by_hand = by_hand is not None and "manual" in entry
        folder = (by_hand if placed_by_hand else mirror) / name
        started = time.perf_counter()
        info = writers()[key](entry, folder, seed=seed + index, reduced=name in reduced)
        files = {f["path"]: (folder / f["path"]).stat().st_size for f in entry["files"]}
        made[name] = {**info, "writer": key, "why_reduced": reduced.get(name), "placed_by_hand": placed_by_hand,
                      "bytes": sum(files.values()), "files": files,
                      "seconds": round(time.perf_counter() - started, 2)}
        size = f"{info['num_params'] / 1e6:.1f}M parameters" if info.get("num_params") else "no parameters"
        note = f", reduced: {info['reduced']}" if info.get("reduced") else ""
        where = ", placed by hand" if placed_by_hand else ""
        print(f"rehearsal: made {name} ({size}, {made[name]['bytes'] / 2**20:.0f} MiB{note}{where})", file=sys.stderr)
    return made


def precision_overrides(config, device):
    """Overrides that run every fp16 network in fp32 on a CPU (it has no fast fp16 kernels, and the workflow refuses
    fp16 there); on a GPU the preset's precisions stand. Returns a nested mapping to merge over the config."""
    if device != "cpu":
        return {}

    def walk(node):
        if not isinstance(node, dict):
            return {}
        found = {key: walk(value) for key, value in node.items() if isinstance(value, dict)}
        found = {key: value for key, value in found.items() if value}
        if node.get("precision") == "fp16":
            found["precision"] = "fp32"
        return found

    return walk(config)


def rehearsal_registry(registry, made):
    """The registry the rehearsal's jobs read: the real one, with the `architecture` block of each network the
    rehearsal built smaller replaced by the one its files match (the loaders build what the registry says)."""
    registry = copy.deepcopy(registry)
    for name, info in made.items():
        if info.get("reduced") and info.get("architecture") and registry[name].get("architecture"):
            registry[name]["architecture"] = info["architecture"]
    return registry


def make_dataset(preset, scratch, mirror, *, seed):
    """The dataset files of the preset and the config overrides that point the DAG at them."""
    from diffrobust.rehearsal import datasets

    if preset == "cifar10":
        tarball = mirror / "cifar-10-python.tar.gz"
        facts = datasets.write_cifar10_tarball(tarball, images_per_batch=50, seed=seed)
        return {"cifar10": {"md5": facts["md5"], "size": facts["size"]}}, tarball.name
    val_dir = scratch / "imagenet" / "val"
    # The full 1,000 x 50 layout: DiffPure's seeded subsets draw ImageFolder indices from all 50,000 images
    datasets.write_imagenet_val_tree(val_dir, n_classes=1000, images_per_class=50, size=320, seed=seed,
                                     distinct_images=16)
    return {"imagenet": {"val_dir": str(val_dir.relative_to(scratch))}}, None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder):
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def scratch_config(preset, overrides, dataset_overrides, mirror_url, cifar10_tarball):
    """The run's config/config.yaml: the preset, the rehearsal's overrides, the mirror, the dataset's digests."""
    config = {"preset": preset, **overrides, "checkpoint_mirror": f"{mirror_url}/checkpoints"}
    datasets_block = dict(config.get("datasets") or {})
    for name, values in dataset_overrides.items():
        datasets_block[name] = {**datasets_block.get(name, {}), **values}
    if cifar10_tarball:
        datasets_block["cifar10"]["url"] = f"{mirror_url}/{cifar10_tarball}"
    config["datasets"] = datasets_block
    return config


def link_repository_files(scratch):
    """The notebooks and published values, which rules read by relative path, linked from the repository."""
    for relative in LINKED:
        target, link = REPO_ROOT / relative, scratch / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def snakemake_command(scratch, cores, *extra):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory",
            str(scratch), "--cores", str(cores), *extra]


def planned_rules(scratch, cores, env=None):
    """{rule: job count} of the DAG still to run (Snakemake's dry-run job statistics)."""
    result = subprocess.run(snakemake_command(scratch, cores, "-n", "--quiet", "rules"), capture_output=True,
                            text=True, env=env)
    if result.returncode:
        raise RehearsalError(f"the rehearsal DAG does not plan:\n{result.stdout}\n{result.stderr}")
    counts = {}
    for line in (result.stdout + result.stderr).splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and words[0] not in ("job", "total"):
            counts[words[0]] = int(words[1])
    return counts


def summary_rules(scratch, cores, env=None):
    """{rule: outputs present} from `snakemake --summary` (every output file, the rule that made it, its status)."""
    result = subprocess.run(snakemake_command(scratch, cores, "--summary"), capture_output=True, text=True, env=env)
    if result.returncode:
        raise RehearsalError(f"snakemake --summary failed:\n{result.stderr}")
    rules = {}
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    header = rows[0] if rows else []
    for row in rows[1:]:
        record = dict(zip(header, row))
        if record.get("date") and record["date"] != "-":
            rules[record["rule"]] = rules.get(record["rule"], 0) + 1
    return rules


def job_figures(scratch):
    """Per benchmarked job: seconds and peak resident memory (Snakemake's benchmark files)."""
    figures = []
    for path in sorted((scratch / "benchmarks").rglob("*.tsv")):
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows:
            figures.append({"job": str(path.relative_to(scratch / "benchmarks"))[:-4],
                            "seconds": float(rows[-1]["s"]), "max_rss_mb": float(rows[-1]["max_rss"] or 0)})
    return figures


def summary_rows(html_text, reports):
    """The claim rows of a rendered summary page (results/<preset>/reports/index.html): {'rows', 'verdicts':
    {verdict: count}, 'tables', 'missing_reports'}. `missing_reports` lists the preset's own `reports` that the
    summary says it did not get (its "every claim of ..." placeholder row): a summary with every claim row has
    none, and one table per paper with at least one row."""
    tables = re.findall(r'<table class="claims">.*?</table>', html_text, flags=re.S)
    rows = [len(re.findall(r"<tr><td>", table)) for table in tables]
    verdicts = {}
    for word in re.findall(r'class="verdict-(\w+)"', html_text):
        verdicts[word] = verdicts.get(word, 0) + 1
    missing = [name for name in reports if f"reports do not include {name}" in html_text]
    return {"rows": sum(rows), "rows_per_table": rows, "verdicts": verdicts, "tables": len(tables),
            "missing_reports": missing}


def check_summary(scratch, preset, reports):
    """(the summary page's claim rows, a problem or None): a problem when the page is missing, a table is empty, or a
    report of the preset is absent from it."""
    page = scratch / "results" / preset / "reports" / "index.html"
    if not page.is_file():
        return {}, f"rehearsal of {preset}: the summary page {page} was not rendered"
    found = summary_rows(page.read_text(), reports)
    if not found["tables"] or 0 in found["rows_per_table"] or found["missing_reports"]:
        return found, f"rehearsal of {preset}: the summary {page} lacks claim rows: {found}"
    return found, None


def rehearse(preset, scratch=None, *, cores=2, seed=0, device="cpu", fresh=True):
    """Make the preset's files, run its whole DAG in `scratch`, check that every planned rule ran. Returns the
    record also written to scratch/rehearsal.json."""
    from diffrobust.config import deep_merge, load_checkpoint_registry, load_config

    settings = rehearsal_settings(preset)
    scratch = Path(scratch or REPO_ROOT / "results" / "rehearsal" / preset).absolute()
    if fresh and scratch.exists():
        shutil.rmtree(scratch)
    mirror = scratch / "mirror"
    (scratch / "config").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    registry = load_checkpoint_registry()
    config = load_config({"preset": preset, **settings["overrides"]})
    precision = precision_overrides(config, device)
    settings["overrides"] = deep_merge(settings["overrides"], precision)
    made = make_checkpoints(preset_checkpoints(config), registry, mirror / "checkpoints", seed=seed,
                            reduced=settings["reduced"], by_hand=scratch / "data" / "checkpoints")
    registry_file = scratch / "config" / "checkpoints.yaml"
    registry_file.write_text(f"# Written by `diffrobust rehearse --preset {preset}`: config/checkpoints.yaml with the "
                             f"architectures of the networks built smaller\n"
                             + yaml.safe_dump(rehearsal_registry(registry, made), sort_keys=False))
    dataset_overrides, tarball = make_dataset(preset, scratch, mirror, seed=seed)
    made_seconds = time.perf_counter() - started
    link_repository_files(scratch)
    with serve(mirror) as url:
        run_config = scratch_config(preset, settings["overrides"], dataset_overrides, url, tarball)
        run_config["device"] = device
        (scratch / "config" / "config.yaml").write_text(
            f"# Written by `diffrobust rehearse --preset {preset}` (config/rehearsal/{preset}.yaml over the preset)\n"
            + yaml.safe_dump(run_config, sort_keys=False))
        env = {**os.environ, CHECKPOINTS_REGISTRY_VARIABLE: str(registry_file),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        planned = planned_rules(scratch, cores, env)
        run_started = time.perf_counter()
        result = subprocess.run(snakemake_command(scratch, cores, "--keep-going"), env=env)
        run_seconds = time.perf_counter() - run_started
        ran = summary_rules(scratch, cores, env)
    missing = sorted(rule for rule in planned if rule != "all" and rule not in ran)
    record = {"preset": preset, "seed": seed, "device": device, "cores": cores, "made": made,
              "precision_overrides": precision,
              "made_seconds": round(made_seconds, 1), "dag_seconds": round(run_seconds, 1),
              "planned_rules": planned, "rules_with_outputs": ran, "rules_not_run": missing,
              "returncode": result.returncode, "jobs": job_figures(scratch)}
    (scratch / "rehearsal.json").write_text(json.dumps(record, indent=1))
    print_figures(record)
    # the real preset's hours projected from these jobs (projection.py); rewrites rehearsal.json with them
    from diffrobust.rehearsal.projection import store_projection
    store_projection(record, scratch)
    if result.returncode or missing:
        raise RehearsalError(f"rehearsal of {preset}: snakemake exited {result.returncode}; rules without outputs: "
                             f"{', '.join(missing) or 'none'} (logs under {scratch / 'logs'})")
    record["summary"], problem = check_summary(scratch, preset, config["reports"])
    (scratch / "rehearsal.json").write_text(json.dumps(record, indent=1))
    print(f"rehearsal {preset}: summary page {record['summary']['rows']} claim rows in {record['summary']['tables']} "
          f"tables, verdicts {record['summary']['verdicts']}")
    if problem:
        raise RehearsalError(problem)
    return record


def print_figures(record):
    """Per job: seconds and peak RSS; then the totals."""
    print(f"rehearsal {record['preset']}: files made in {record['made_seconds']} s, DAG {record['dag_seconds']} s")
    for job in record["jobs"]:
        print(f"  {job['job']:<70} {job['seconds']:>9.1f} s {job['max_rss_mb']:>9.0f} MB")
