"""What the workflow's jobs were made from (issue 21, items 2 and 6): Mist's target image is an input of the protect
jobs that read it, and a report names the sha256 of its inputs and renders again when they hold other bytes.

Each test works in a private copy of the repository (test_workflow.copy_repo)."""

import hashlib
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_workflow import copy_repo, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture
def repo_copy(repo_root, tmp_path):
    return copy_repo(repo_root, tmp_path / "repo")


def rewrite_keeping_mtime(path, content):
    """Give `path` other bytes but its old modification time (as `cp -p` or `mv` of an older file would)."""
    stat = os.stat(path)
    Path(path).write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def planned_jobs(stdout):
    """{rule: count} of a `snakemake -n` plan."""
    stats = {}
    for line in stdout.split("Job stats:", 1)[-1].splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            stats[parts[0]] = int(parts[1])
    return stats


def planned_target_digests(stdout):
    """{attack: the --target-sha256 of its planned protect call (None without one)} of a `snakemake -n -p` plan."""
    digests = {}
    for line in stdout.splitlines():
        if "diffrobust protect " in line:
            words = shlex.split(line.split(" -m diffrobust ", 1)[1].split(" 2>")[0])
            attack = words[words.index("--attack") + 1]
            digests[attack] = words[words.index("--target-sha256") + 1] if "--target-sha256" in words else None
    return digests


def test_a_report_lists_its_input_digests_and_renders_again_when_an_input_holds_other_bytes(repo_copy):
    targets = ["results/smoke/reports/data_report.html", "results/smoke/reports/data_report.ipynb"]
    snakemake(repo_copy, *targets, "--config", "preset=smoke")
    record = json.loads((repo_copy / "logs/smoke/render_report/data_report.run.json").read_text())
    meta = "data/datasets/mnist/meta.json"
    expected = {name: hashlib.sha256((repo_copy / name).read_bytes()).hexdigest()
                for name in (meta, "data/datasets/mnist/splits.npz", "notebooks/data_report.py")}
    assert record["inputs"] == expected
    html = (repo_copy / targets[0]).read_text()
    assert all(f"<td><code>{name}</code></td>\n<td><code>{digest}</code></td>" in html
               for name, digest in expected.items())
    assert "Nothing to be done" in snakemake(repo_copy, "-n", *targets, "--config", "preset=smoke").stdout

    # other bytes under an older modification time: Snakemake's time stamps alone call the report up to date
    original = (repo_copy / meta).read_bytes()
    rewrite_keeping_mtime(repo_copy / meta, original + b" ")
    plan = snakemake(repo_copy, "-n", *targets, "--config", "preset=smoke").stdout
    assert planned_jobs(plan) == {"render_report": 1}, plan
    rewrite_keeping_mtime(repo_copy / meta, original)
    assert "Nothing to be done" in snakemake(repo_copy, "-n", *targets, "--config", "preset=smoke").stdout


def test_a_changed_target_image_reruns_the_protect_and_edit_jobs_that_read_it(repo_copy):
    from PIL import Image

    target = repo_copy / "MIST.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(target)
    config = ["--config", "preset=smoke", "pixel_barrier={attacks: [mist, advdm], target: {file: MIST.png}}"]
    sets = [f"results/smoke/pixel_barrier/edits/{attack}.tsv" for attack in ("mist", "advdm")]
    # stand-ins for the outputs of a finished run (training is not what is tested here), marked up to date
    summary = snakemake(repo_copy, "--summary", *config, "--", *sets).stdout
    for line in summary.splitlines()[1:]:
        name, _, rule = line.split("\t")[:3]
        path = repo_copy / name
        if rule == "train_ldm" and not path.suffix:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    snakemake(repo_copy, "--touch", *config, "--", *sets)
    assert "Nothing to be done" in snakemake(repo_copy, "-n", *config, "--", *sets).stdout

    def new_pixels(seed):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(target)
        return hashlib.sha256(target.read_bytes()).hexdigest()

    # other pixels: the mist set is made again and edited again, advdm's (which reads no target) is kept
    digest = new_pixels(1)
    plan = snakemake(repo_copy, "-n", "-p", *config, "--", *sets).stdout
    assert planned_jobs(plan) == {"protect": 1, "edit_protected": 1}, plan
    assert "Missing output files" not in plan and "MIST.png" in plan
    assert planned_target_digests(plan) == {"mist": digest}
    assert "edit-protected --attack mist " in plan and f"--target-sha256 {digest}" in plan.split("edit-protected")[1]

    # other pixels under an older modification time (`cp -p`): the digest, a param of both jobs, still reruns them
    stat = os.stat(target)
    snakemake(repo_copy, "--touch", *config, "--", *sets)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))
    assert "Nothing to be done" in snakemake(repo_copy, "-n", *config, "--", *sets).stdout
    old_mtime = os.stat(target).st_mtime_ns
    digest = new_pixels(2)
    os.utime(target, ns=(old_mtime, old_mtime))
    plan = snakemake(repo_copy, "-n", "-p", *config, "--", *sets).stdout
    assert planned_jobs(plan) == {"protect": 1, "edit_protected": 1}, plan
    assert planned_target_digests(plan) == {"mist": digest} and "Params have changed" in plan


def test_an_input_replaced_during_a_render_fails_the_job_naming_it_and_the_next_run_renders_again(repo_copy):
    """As after a failed notebook: the previous HTML is restored (update()), the executed notebook is gone, so that
    `snakemake -n` lists the report again; the log names the file that changed."""
    targets = ["results/smoke/reports/data_report.html", "results/smoke/reports/data_report.ipynb"]
    snakemake(repo_copy, *targets, "--config", "preset=smoke")
    previous = (repo_copy / targets[0]).read_bytes()
    notebook = repo_copy / "notebooks/data_report.py"
    working = notebook.read_text()
    meta = "data/datasets/mnist/meta.json"
    # a cell that replaces an input after the report read it (another run's job, in the probe)
    notebook.write_text(working + f"\n# %%\nfrom pathlib import Path\nPath({str(repo_copy / meta)!r}).write_text("
                                  f"Path({str(repo_copy / meta)!r}).read_text() + ' ')\n")
    result = snakemake(repo_copy, *targets, "--config", "preset=smoke", check=False)
    assert result.returncode != 0
    log = (repo_copy / "logs/smoke/render_report/data_report.log").read_text()
    assert f"diffrobust render-notebook: error: {meta} changed while {targets[0]} was being rendered" in log
    assert (repo_copy / targets[0]).read_bytes() == previous and not (repo_copy / targets[1]).exists()
    notebook.write_text(working)
    plan = snakemake(repo_copy, "-n", *targets, "--config", "preset=smoke").stdout
    assert planned_jobs(plan) == {"render_report": 1}, plan
