"""Run records: every job writes, next to its outputs, the config it ran with, its seed, the software versions and
its timings, so that a result can be traced back to exactly what produced it.

Input digests: `file_digests` is the sha256 of every file a job read (a folder stands for every file under it), so
that a record names the exact bytes behind a result; `changed_files` compares two such maps (a report rehashes its
inputs after rendering and refuses when one changed meanwhile). `dag_fingerprints` is the cheap variant for the DAG
build: it keeps a stat cache so that an unchanged file is not read again, and stands for a large file by its size and
modification time instead of reading it, so that a params value built from it reruns a job whose inputs now hold
other bytes even where their modification times are older than the job's outputs."""

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

# Files up to this size are identified by their sha256 at DAG build; larger ones (checkpoints of GBs) by size and
# mtime, so that building the DAG reads no large file.
DAG_DIGEST_MAX_BYTES = 64 * 2**20

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


def peak_gpu_memory_mb():
    """Peak GPU memory torch allocated in this process, in MB (torch.cuda.max_memory_allocated), or None where the
    process never initialized CUDA (checked without importing torch or initializing CUDA: a CPU job stays one)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


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
        "peak_gpu_memory_mb": peak_gpu_memory_mb(),
        "environment": environment(),
    }
    if path is not None:
        atomic_write_json(path, record)


def read_record(path):
    return json.loads(Path(path).read_text())


def recorded_inputs(path):
    """{file: sha256} of the inputs the run record at `path` lists ({} without a readable record or list)."""
    try:
        return dict(read_record(path).get("inputs") or {}) if path else {}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def input_files(paths):
    """The files behind `paths` (files, or folders standing for every file under them), sorted, as strings."""
    files = []
    for path in map(Path, paths):
        files += sorted(str(f) for f in path.rglob("*") if f.is_file()) if path.is_dir() else [str(path)]
    return sorted(set(files))


def _stat_key(path):
    """What changes when a file is rewritten or replaced: a rename brings another inode, and any write moves the
    status-change time, which (unlike the modification time) cannot be set back."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def file_digests(paths, cache=None):
    """({file: sha256} of every file behind `paths`, updated cache).

    cache: {file: [size, mtime_ns, inode, ctime_ns, sha256]} from an earlier call; a file whose stat is unchanged
    is not read again. Without a cache (the default) every file is read: what a job records is the bytes it saw."""
    from diffrobust.download import file_digest  # imports requests: only when a file is actually read

    cache = dict(cache or {})
    digests = {}
    for file in input_files(paths):
        stat = _stat_key(file)
        if cache.get(file, [None] * 4)[:4] != stat:
            cache[file] = stat + [file_digest(file)]
        digests[file] = cache[file][4]
    return digests, cache


def changed_files(before, after):
    """The files whose digest differs between two {file: sha256} maps (or that are in only one), sorted."""
    return sorted(file for file in set(before) | set(after) if before.get(file) != after.get(file))


def dag_fingerprints(paths, cache_file, max_bytes=DAG_DIGEST_MAX_BYTES):
    """{file: fingerprint} of the files behind `paths` at DAG build: the sha256 of a file up to `max_bytes` (read
    only when its stat changed since the last call: `cache_file` keeps the stat cache), "size <bytes> mtime <ns>" of
    a larger one (max_bytes None: no file is too large), None for a path that does not exist yet (a job of the DAG
    makes it; Snakemake evaluates a job's params again when it runs, so the recorded value is the one its inputs had
    then)."""
    cache_file = Path(cache_file)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    fingerprints, small = {}, []
    for path in map(str, paths):
        if not os.path.exists(path):
            fingerprints[path] = None
            continue
        for file in input_files([path]):
            stat = os.stat(file)
            if max_bytes is not None and stat.st_size > max_bytes:
                fingerprints[file] = f"size {stat.st_size} mtime {stat.st_mtime_ns}"
            else:
                small.append(file)
    known = {file: cache[file] for file in small if isinstance(cache.get(file), list) and len(cache[file]) == 5}
    digests, updated = file_digests(small, known)
    fingerprints.update(digests)
    if {file: cache.get(file) for file in updated} != updated:
        atomic_write_json(cache_file, {**cache, **updated})
    return dict(sorted(fingerprints.items()))
