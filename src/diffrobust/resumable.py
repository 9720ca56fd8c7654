"""Resumable state and the identity of what produced it: the one place every stage asks "is this state mine?".

A long job keeps its finished work between attempts (a certification shard's per-image label files, a training
job's resume file, an attack shard's finished examples). That state is only valid for the job that wrote it, so it
carries an *identity*, a JSON-like dict:

- ``job``: what kind of job wrote it (``certify_labels``, ``train_diffusion``, ...);
- ``version``: the version of the code's algorithm for that content. Bump it when a code change would change what
  the job stores for the same settings and inputs (another noise scheme, a fixed bug in a reverse process);
- ``settings``: every setting that affects the stored content, and none that do not (alpha does not change
  per-draw labels, so a certification keeps its labels when only alpha changes and re-certifies from them);
- ``inputs``: ``{role: [sha256 of each file read]}`` for the model and dataset files the job read.

`claim_folder` is how a job takes a state folder: if the folder holds state of another identity (or of none), it
is moved aside to ``<folder>.stale`` (replacing an older one there) with one log line naming what differs, and the
job starts afresh; if it holds state of this identity, the job resumes. A single per-item file that fails its own
check on resume (damaged, copied in from another run, holding other items) is moved aside to ``<file>.stale`` by
`set_aside`, again with one log line, and only that item is recomputed. `differences` is the same comparison for a
single resume file (training). Identities compare by value; `identity_digest` is their short fingerprint, stored
inside every per-item state file so that a file copied in from elsewhere is caught too.

Hashing multi-gigabyte checkpoints on every attempt would be slow, so a claimed folder remembers each input's size,
mtime and sha256 and rehashes only a file whose size or mtime changed (a restored or retrained file is rehashed; a
file rewritten with the same bytes keeps its state).
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from diffrobust.download import file_digest
from diffrobust.io import atomic_write_json

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
STALE_SUFFIX = ".stale"


def canonical(value):
    """`value` as JSON gives it back (tuples -> lists, paths -> strings), so stored and fresh identities compare."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def identity_digest(identity):
    """A 16-hex-digit fingerprint of an identity (stored in per-item files; collisions are not a concern here)."""
    text = json.dumps(canonical(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def array_digest(array):
    """sha256 of an array's dtype, shape and bytes: identifies one image, so a label file is tied to its pixels."""
    import numpy as np

    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}:{array.shape}:".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _stat_key(path):
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def input_digests(inputs, cache=None):
    """({role: [sha256, ...]}, new cache) for `inputs` = {role: path or list of paths}.

    cache: {path: [size, mtime_ns, sha256]} from an earlier claim; a file whose size and mtime are unchanged is not
    rehashed."""
    cache = dict(cache or {})
    digests = {}
    for role, paths in sorted((inputs or {}).items()):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        digests[role] = []
        for path in paths:
            key, stat = str(path), _stat_key(path)
            if cache.get(key, [None, None])[:2] != stat:
                cache[key] = stat + [file_digest(path)]
            digests[role].append(cache[key][2])
    return digests, cache


def make_identity(job, version, settings, inputs=None, cache=None):
    """(identity, stat cache) for a job: see the module docstring."""
    digests, cache = input_digests(inputs, cache)
    identity = canonical({"job": job, "version": int(version), "settings": settings, "inputs": digests})
    return identity, cache


def differences(stored, current, prefix=""):
    """Readable 'key: stored -> current' lines where two identities (nested dicts) differ; [] when equal."""
    if isinstance(stored, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                lines.append(f"{name}: (absent) -> {_short(current[key])}")
            elif key not in current:
                lines.append(f"{name}: {_short(stored[key])} -> (absent)")
            else:
                lines.extend(differences(stored[key], current[key], name))
        return lines
    if isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        return [line for i, (a, b) in enumerate(zip(stored, current)) for line in differences(a, b, f"{prefix}.{i}")]
    return [] if stored == current else [f"{prefix or 'value'}: {_short(stored)} -> {_short(current)}"]


def _short(value):
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}..."  # a file digest: its start tells files apart
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_mismatch(stored, current):
    """One phrase saying why `stored` is not `current` (for the log line that discards state)."""
    if stored is None:
        return "it has no identity record (written by an older version, or damaged)"
    lines = differences(stored, current)
    if not lines:
        return "identical"
    shown = "; ".join(lines[:6]) + (f"; and {len(lines) - 6} more" if len(lines) > 6 else "")
    return f"it was made with other settings or inputs ({shown})"


def read_identity(folder):
    """The identity record stored in `folder` ({"identity": ..., "cache": ...}) or None if absent/unreadable."""
    path = Path(folder) / IDENTITY_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "identity" in record else None


def claim_folder(folder, *, job, version, settings, inputs=None, what="state"):
    """Make `folder` hold state of this job's identity; returns the identity (a dict with its "digest").

    A folder with state of another identity (or with files but no readable identity record) is moved aside to
    `<folder>.stale`, replacing any earlier one, with one warning naming what differs; the job then starts from an
    empty folder. A folder of the same identity is kept (the job resumes)."""
    folder = Path(folder)
    record = read_identity(folder)
    identity, cache = make_identity(job, version, settings, inputs, record["cache"] if record else None)
    has_state = folder.is_dir() and any(entry.name != IDENTITY_FILE for entry in folder.iterdir())
    if has_state and (record is None or record["identity"] != identity):
        aside = folder.with_name(folder.name + STALE_SUFFIX)
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        log.warning("discarding the %s in %s: %s; moved it to %s and recomputing", what, folder,
                    describe_mismatch(record and record["identity"], identity), aside)
    folder.mkdir(parents=True, exist_ok=True)
    if record is None or record["identity"] != identity or record["cache"] != cache or not has_state:
        atomic_write_json(folder / IDENTITY_FILE, {"identity": identity, "cache": cache})
    return {**identity, "digest": identity_digest(identity)}


def set_aside(path, reason, what="state"):
    """Move one per-item state file that cannot be resumed from to `<path>.stale` (replacing an earlier one), with
    one warning saying why; the job then recomputes that item. Returns the new path."""
    path = Path(path)
    aside = path.with_name(path.name + STALE_SUFFIX)
    os.replace(path, aside)
    log.warning("discarding the %s %s: %s; moved it to %s and recomputing", what, path, reason, aside)
    return aside
