"""Run records: every job writes, next to its outputs, the config it ran with, its seed, the software versions and
its timings, so that a result can be traced back to exactly what produced it."""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from diffrobust.io import atomic_write_json

PACKAGES = ("diffrobust", "torch", "torchvision", "numpy", "scipy", "diffusers", "snakemake", "dvc", "papermill")


def package_versions(names=PACKAGES):
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo=Path(__file__).resolve().parents[2]):
    """The commit of the code that ran, with '+dirty' when the working tree differs from it; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment():
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "argv": sys.argv,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
    }


@contextmanager
def run_record(path, *, config=None, seed=None, **fields):
    """Time the enclosed block and, if it succeeds, write the record to `path` (atomically).

    The yielded dict can be filled with results (counts, figures) before the block ends."""
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    extra = {}
    yield extra
    record = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 3),
        "seed": seed,
        "config": config,
        **fields,
        **extra,
        "environment": environment(),
    }
    if path is not None:
        atomic_write_json(path, record)


def read_record(path):
    return json.loads(Path(path).read_text())
