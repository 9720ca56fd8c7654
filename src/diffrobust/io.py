"""Atomic writes: everything goes to a temporary file in the target folder, then os.replace() moves it into place,
so a killed job never leaves a half-written output behind. `read_npz` is the matching reader: a damaged archive
(truncated, overwritten, not a zip) is one `DamagedFileError` naming the file, never a bare zipfile traceback."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

from diffrobust.errors import DiffrobustError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp creates 0600 files; outputs should get the usual permissions
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def atomic_write_text(path, text):
    with atomic_path(path) as temp:
        temp.write_text(text)


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path, data):
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def atomic_write_npz(path, arrays):
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)


class DamagedFileError(DiffrobustError, ValueError):
    """A stored file that cannot be read back (truncated by a crash or a full disk, or overwritten)."""


def read_npz(path):
    """Every array of the `.npz` at `path` as {name: array}, read eagerly (no pickles).

    Raises DamagedFileError naming `path` when the archive or one of its members cannot be read: numpy raises
    zipfile.BadZipFile, EOFError, zlib.error, OSError or ValueError depending on where a file was cut, none of
    which names the file."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as contents:
            return {key: contents[key] for key in contents.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as error:
        raise DamagedFileError(f"{path}: damaged, cannot be read ({type(error).__name__}: {error})") from error
