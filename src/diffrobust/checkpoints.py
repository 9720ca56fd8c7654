"""Checkpoint files on disk: where they go, and whether they are present and verified.

A registry entry (config/checkpoints.yaml) names a file as <name>/<path> below data/checkpoints/; the download job
writes there and the loaders read there. `checkpoint_path` is the one place such a path is built, and it refuses one
that leaves data/checkpoints/ (a '..' or '.' part, an absolute path, or a symlink out), so that an edited registry
cannot make a download overwrite, or a loader read, a file elsewhere. The registry's schema refuses the same paths.
"""

from pathlib import Path, PurePosixPath

from diffrobust.download import file_digest, read_lock
from diffrobust.errors import DiffrobustError

CHECKPOINTS_DIR = Path("data/checkpoints")


class CheckpointPathError(DiffrobustError, ValueError):
    """A registry entry whose file would lie outside data/checkpoints/."""


def _relative_parts_problem(text):
    """Why `text` is not a plain relative path (None when it is): no absolute path, no '', '.' or '..' parts."""
    if not isinstance(text, str) or not text:
        return "is empty"
    if "\\" in text:
        return "holds a backslash"
    if PurePosixPath(text).is_absolute():
        return "is an absolute path"
    bad = [part for part in text.split("/") if part in ("", ".", "..")]
    return f"has a {bad[0]!r} part" if bad else None


def checkpoint_path_problem(name, file_entry, root=CHECKPOINTS_DIR):
    """Why file `file_entry` of checkpoint `name` would not lie below `root`/<name>/ (None when it does): a name
    that is not one plain folder name, a path with an absolute, '.' or '..' part, or a path that resolves outside
    `root` through a symlink (checked on what is on disk now)."""
    where = f"checkpoint registry entry {name!r}, file {file_entry.get('path')!r}"
    name_problem = _relative_parts_problem(name) or ("holds a '/'" if "/" in name else None)
    if name_problem:
        return (f"{where}: the checkpoint name {name_problem}; a name is one folder below {root}/ "
                "(letters, digits, '_', '-', '.', not '.' or '..')")
    path_problem = _relative_parts_problem(file_entry.get("path"))
    if path_problem:
        return (f"{where}: the path {path_problem}; a path is relative to {root}/{name}/, its parts separated by "
                "'/', none of them '.' or '..'")
    path = Path(root) / name / file_entry["path"]
    resolved, inside = path.resolve(), Path(root).resolve()
    if not resolved.is_relative_to(inside):
        return (f"{where}: {path} resolves to {resolved}, outside {inside} (a symlink leads out); checkpoint files "
                f"are read and written only below {root}/: replace the link by the files themselves")
    return None


def registry_path_problems(registry, root=CHECKPOINTS_DIR):
    """checkpoint_path_problem of every file of every registry entry, one line each ([] when all lie below `root`);
    entries too malformed to have a path are left to the registry's schema."""
    problems = []
    for name, entry in registry.items() if isinstance(registry, dict) else ():
        files = entry.get("files") if isinstance(entry, dict) else None
        for file_entry in files if isinstance(files, list) else []:
            if isinstance(file_entry, dict) and isinstance(file_entry.get("path"), str):
                problems.append(checkpoint_path_problem(str(name), file_entry, root))
    return [problem for problem in problems if problem]


def checkpoint_path(name, file_entry, root=CHECKPOINTS_DIR):
    """Where file `file_entry` of checkpoint `name` lies: `root`/<name>/<path>. Raises CheckpointPathError (naming
    the entry) when that would be outside `root` (see checkpoint_path_problem)."""
    problem = checkpoint_path_problem(name, file_entry, root)
    if problem:
        raise CheckpointPathError(problem)
    return Path(root) / name / file_entry["path"]


def lock_key(name, file_entry):
    return f"{name}/{file_entry['path']}"


def file_status(name, file_entry, root=CHECKPOINTS_DIR, lock=None):
    """Presence, size and verification state of one registry file.

    `verified` is 'published sha256', 'published md5' or 'recorded sha256' when the digest matches that reference,
    'MISMATCH' when it does not, and 'no reference' when nothing was published or recorded yet."""
    path = checkpoint_path(name, file_entry, root)
    row = {"checkpoint": name, "file": file_entry["path"], "path": str(path), "present": path.is_file(),
           "size_bytes": None, "verified": "missing", "manual": not file_entry["urls"]}
    if not row["present"]:
        return row
    row["size_bytes"] = path.stat().st_size
    recorded = (lock or {}).get(lock_key(name, file_entry), {})
    for label, algorithm, expected in (("published sha256", "sha256", file_entry.get("sha256")),
                                       ("published md5", "md5", file_entry.get("md5")),
                                       ("recorded sha256", "sha256", recorded.get("sha256"))):
        if expected:
            row["verified"] = label if file_digest(path, algorithm) == expected else "MISMATCH"
            return row
    row["verified"] = "no reference"
    return row


def status_table(registry, names, root=CHECKPOINTS_DIR, lock_path="config/checkpoints.lock.yaml"):
    """One row per file of the named checkpoints (see file_status), plus the registry's paper and licence."""
    lock = read_lock(lock_path)
    rows = []
    for name in names:
        entry = registry[name]
        for file_entry in entry["files"]:
            row = file_status(name, file_entry, root, lock)
            row.update({"paper": ", ".join(entry["paper"]), "license": entry["license"]})
            rows.append(row)
    return rows
