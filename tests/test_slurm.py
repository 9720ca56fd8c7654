"""SLURM for real (issue 14): a one-node cluster started on this machine from Debian's slurmctld, slurmd and munge
(tests/slurm/slurm.conf), and the smoke DAG's certification and attack shards run through
`snakemake --profile profiles/slurm` (snakemake-executor-plugin-slurm). Their outputs must equal a local run's, and
every shard must have gone to SLURM as a job asking for a GPU.

Needs root (the daemons run as root and the configuration goes to /etc/slurm, the only place the jobs' own `srun`
reads), the Debian packages and the `slurm` extra. .ci/run installs them and sets DIFFROBUST_REQUIRE_SLURM=1, which
turns a missing piece into a failure; elsewhere the test is skipped with what to install. The daemons the test
starts are stopped when it ends, whatever happens.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from test_workflow import _env, repo_copy, run, snakemake  # noqa: F401 (repo_copy is a fixture)

pytestmark = pytest.mark.workflow

SLURM_TEMPLATES = Path(__file__).resolve().parent / "slurm"
SYSTEM_CONF = Path("/etc/slurm")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun")
SHARD_RULES = ("certify_shard", "attack")
# What each job may ask of the stand-in node (2 CPUs): one CPU, so that two shards run side by side.
# The SLURM run takes about as long as the local one; a plugin that loses track of a job waits forever, so stop it.
SLURM_RUN_TIMEOUT = 1200
TEST_RESOURCES = ("slurm_partition=debug", "runtime=30", "mem_mb=3000", "cpus_per_task=1")


def missing_requirements():
    """Why this machine cannot run the test, as sentences (empty when it can)."""
    problems = [f"`{name}` is not installed" for name in PROGRAMS if shutil.which(name, path=SBIN_PATH) is None]
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        problems.append("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test,slurm]')")
    if os.geteuid() != 0:
        problems.append("the test starts SLURM's daemons as root and must run as root")
    for name in ("slurm.conf", "gres.conf"):
        if (SYSTEM_CONF / name).exists():
            problems.append(f"{SYSTEM_CONF / name} exists: this machine has a SLURM configuration of its own, which "
                            "the test will not replace")
    return problems


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSlurm:
    """munged, slurmctld and slurmd in the foreground under this object's control, with every file they write in
    `root`; `stop` cancels the jobs and ends the daemons (and removes the configuration from /etc/slurm)."""

    def __init__(self, root):
        self.root = Path(root)
        self.daemons = []
        self.written = []
        self.env = dict(_env(), SLURM_CONF=str(SYSTEM_CONF / "slurm.conf"))
        self.env["PATH"] = os.pathsep.join([self.env["PATH"], "/usr/sbin", "/sbin"])

    def _write_configuration(self):
        for folder in ("state", "spool", "log", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        fields = {"host": socket.gethostname().split(".")[0], "root": self.root, "ctld_port": free_port(),
                  "slurmd_port": free_port(), "cpus": os.cpu_count(),
                  "memory_mb": int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)}
        SYSTEM_CONF.mkdir(parents=True, exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            target = SYSTEM_CONF / name
            target.write_text((SLURM_TEMPLATES / name).read_text().format(**fields))
            self.written.append(target)

    def _start(self, name, *args):
        log = open(self.root / "log" / f"{name}.out", "w")
        process = subprocess.Popen([shutil.which(name, path=SBIN_PATH), *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env, start_new_session=True)
        self.daemons.append((name, process, log))
        time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"{name} stopped at start ({process.returncode}):\n{self.logs()}")

    def start(self):
        self._write_configuration()
        munge = self.root / "munge"
        self._start("munged", "--foreground", "--force", f"--socket={munge / 'munge.socket'}",
                    f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                    f"--seed-file={munge / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}")
        self._start("slurmctld", "-D", "-i")
        self._start("slurmd", "-D")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%T"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the SLURM node did not become idle (state {state!r}):\n{self.logs()}")

    def stop(self):
        if any(name == "slurmctld" and process.poll() is None for name, process, _ in self.daemons):
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "--noheader", "--states=RUNNING,PENDING,COMPLETING"], env=self.env,
                    capture_output=True, text=True).stdout.strip():
                time.sleep(1)
        for name, process, log in reversed(self.daemons):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            log.close()
        for path in self.written:
            path.unlink(missing_ok=True)

    def logs(self):
        tails = []
        for path in sorted((self.root / "log").glob("*")):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(tails)


@pytest.fixture
def slurm_cluster():
    problems = missing_requirements()
    if problems:
        message = "no SLURM cluster can be started here: " + "; ".join(problems)
        if os.environ.get("DIFFROBUST_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message + " (.ci/run installs what is needed)")
    root = Path(tempfile.mkdtemp(prefix="diffrobust-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert all(process.poll() is not None for _, process, _ in cluster.daemons)
        shutil.rmtree(root, ignore_errors=True)


def shard_outputs(repo):
    """Every certification and attack shard of the smoke run, as comparable values: TSV rows without the timing
    column, arrays of the .npz files without their `seconds`."""
    outputs = {}
    results = repo / "results" / "smoke"
    for path in sorted(results.glob("densepure/*/sigma*/shard*.tsv")):
        outputs[str(path.relative_to(repo))] = [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()]
    for path in sorted([*results.glob("densepure/*/sigma*/shard*.labels.npz"), *results.glob("attacks/*/*/*/shard*.npz")]):
        with np.load(path) as archive:
            outputs[str(path.relative_to(repo))] = {key: archive[key].tolist() for key in archive.files
                                                    if key != "seconds"}
    return outputs


def test_certification_and_attack_shards_run_through_slurm_as_they_run_here(repo_copy, slurm_cluster):
    (repo_copy / "config/config.yaml").write_text("preset: smoke\n")
    # locally: the trainings and the shards
    snakemake(repo_copy, "--until", *SHARD_RULES)
    local = shard_outputs(repo_copy)
    assert len([name for name in local if name.endswith(".tsv")]) == 4 and len(local) == 4 + 4 + 36
    for folder in ("densepure", "attacks"):
        shutil.rmtree(repo_copy / "results" / "smoke" / folder)

    # the same shards through the project's SLURM profile; the trained models stay, so only the shards run
    result = run(["snakemake", "--profile", "profiles/slurm", "--until", *SHARD_RULES, "--verbose",
                  "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
                  "--slurm-status-command", "squeue", "--latency-wait", "5", "--default-resources", *TEST_RESOURCES],
                 repo_copy, check=False, env=slurm_cluster.env, timeout=SLURM_RUN_TIMEOUT)
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-6000:] + slurm_cluster.logs())
    assert shard_outputs(repo_copy) == local

    # every shard was a SLURM job asking for one GPU (the rules' `gpu=1`, which the profile passes on)
    log = result.stdout + result.stderr
    calls = [line for line in log.splitlines() if line.startswith("sbatch call: ")]
    assert len(calls) == 4 + 36
    assert all(" --gpus=1 " in call and " -p debug " in call for call in calls), calls[0]
    assert sum("--target-jobs 'certify_shard:" in call for call in calls) == 4
    # ... and SLURM ran each as its own job (the plugin deletes the logs of jobs that succeeded)
    submitted = {line.split("with SLURM jobid ")[1].split()[0] for line in log.splitlines()
                 if " has been submitted with SLURM jobid " in line}
    assert len(submitted) == 40
