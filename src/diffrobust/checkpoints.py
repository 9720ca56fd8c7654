"""Checkpoint files on disk: where they go, and whether they are present and verified."""

from pathlib import Path

from diffrobust.download import file_digest, read_lock

CHECKPOINTS_DIR = Path("data/checkpoints")


def checkpoint_path(name, file_entry, root=CHECKPOINTS_DIR):
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
