"""Checkpoint downloader: resumable, retried, verified, and atomic.

The workflow's download rule runs one fetch() per file. A file is streamed to `<dest>.part` beside its destination,
resumed with an HTTP Range request after an interruption, retried with exponential backoff on transient failures,
verified (size, sha256, md5), and only then moved to `dest` with os.replace, so that `dest` either does not exist or
holds a verified file. Where the publisher states no sha256, the digest seen at the first download is recorded in a
lock file (config/checkpoints.lock.yaml) and every later download is verified against it.
"""

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import requests
import urllib3
import yaml
from tqdm import tqdm

from diffrobust import __version__
from diffrobust.errors import DiffrobustError

CHUNK_SIZE = 1 << 20  # bytes read and written at a time, and hashed at a time
MAX_BACKOFF = 60.0  # seconds; the longest wait between two attempts on one URL
PART_SUFFIX = ".part"
USER_AGENT = f"diffrobust/{__version__} (checkpoint downloader)"

# Failures after which the same URL may well work on the next attempt.
_TRANSIENT_REQUEST_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,  # raised by raw reads of the body: dropped connection, read timeout
)

_LOCK_HEADER = """\
# sha256 and size of checkpoint files whose publisher states no checksum, as seen at their first download.
# Written by diffrobust.download.fetch(); every later download is verified against these entries.
# Delete an entry only if the publisher changed the file on purpose (url null: the file was placed by hand).
"""


class DownloadError(DiffrobustError, RuntimeError):
    """A file could not be brought to its destination."""


class ChecksumError(DownloadError):
    """A file's size or digest differs from what was expected."""


class _TransientError(Exception):
    """One attempt failed in a way the next attempt may not (5xx, dropped connection, short body, timeout)."""


class _URLFailed(Exception):
    """This URL will not give the file however often it is asked (4xx, an HTML page, retries used up)."""


# ---------------------------------------------------------------------------------------------------------------------
# Digests and verification


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in chunks so that multi-gigabyte checkpoints need no memory."""
    return _file_digests(path, [algorithm])[algorithm]


def _file_digests(path, algorithms):
    """Several hex digests of a file in one pass over it: {algorithm: hexdigest}."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _measure(path, sha256=None, md5=None, size=None):
    """Measure a file and compare it with what is expected.

    Returns (facts, problems): facts holds path, size, sha256 (always computed, so that it can be reported and
    recorded) and md5 (only when one is expected); problems lists one "what: expected X, got Y" line per mismatch.
    """
    digests = _file_digests(path, ["sha256", "md5"] if md5 else ["sha256"])
    facts = {"path": str(path), "size": os.path.getsize(path), "sha256": digests["sha256"], "md5": digests.get("md5")}
    problems = []
    if size is not None and facts["size"] != int(size):
        problems.append(f"size: expected {int(size)} bytes, got {facts['size']} bytes")
    if sha256 and facts["sha256"] != sha256.lower():
        problems.append(f"sha256: expected {sha256.lower()}, got {facts['sha256']}")
    if md5 and facts["md5"] != md5.lower():
        problems.append(f"md5: expected {md5.lower()}, got {facts['md5']}")
    return facts, problems


def verify_file(path, sha256=None, md5=None, size=None):
    """Check a file against the given size and digests; return {path, size, sha256, md5} or raise ChecksumError."""
    facts, problems = _measure(path, sha256=sha256, md5=md5, size=size)
    if problems:
        raise ChecksumError(f"{path} does not match what was expected: " + "; ".join(problems))
    return facts


# ---------------------------------------------------------------------------------------------------------------------
# The lock file of digests recorded at first download


@dataclass
class _Expected:
    """What a file must match, and where the sha256 came from (for the advice in error messages)."""

    sha256: str | None
    md5: str | None
    size: int | None
    lock: Path | None = None  # lock file consulted; None when a sha256 was given or no lock is used
    lock_key: str | None = None
    from_lock: bool = False  # sha256 (and maybe size) come from an entry recorded earlier

    def remedy(self):
        """What to do if the file differs from what is expected on purpose."""
        if self.from_lock:
            return (
                f"If the publisher changed the file on purpose, delete the entry '{self.lock_key}' from {self.lock} "
                "and run again, so that the new file is recorded"
            )
        return "If the publisher changed the file on purpose, update the published checksum in the checkpoint registry"


def _expectations(sha256, md5, size, lock, lock_key):
    """Combine the published checksums with the lock entry (consulted only when no sha256 is published)."""
    if sha256 or lock is None:
        return _Expected(sha256=sha256, md5=md5, size=size)
    if not lock_key:
        raise ValueError("fetch(): lock_key is needed to use a lock file")
    entry = read_lock(lock).get(lock_key)
    if entry is None:
        return _Expected(sha256=None, md5=md5, size=size, lock=lock, lock_key=lock_key)
    recorded_size = entry.get("size")
    return _Expected(
        sha256=entry["sha256"],
        md5=md5,
        size=size if size is not None else recorded_size,
        lock=lock,
        lock_key=lock_key,
        from_lock=True,
    )


def read_lock(lock):
    """The lock file's entries ({} if it does not exist yet)."""
    lock = Path(lock)
    if not lock.exists():
        return {}
    from diffrobust.config import read_yaml

    entries = read_yaml(lock) or {}
    if not isinstance(entries, dict):
        raise ValueError(f"{lock}: expected a mapping of file keys to recorded checksums")
    return entries


@contextlib.contextmanager
def _lock_held(lock):
    """Hold an exclusive flock while the lock file is read and rewritten.

    The flock is taken on a side file, not on the lock file itself: the lock file is replaced by os.replace, and a
    flock on the replaced inode would not stop the next writer.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    side = lock.with_name(f".{lock.name}.flock")
    with open(side, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_lock(lock, entries):
    """Rewrite the lock file atomically (temporary file in the same folder, then os.replace), keys sorted."""
    text = _LOCK_HEADER + yaml.safe_dump(
        {key: entries[key] for key in sorted(entries)}, sort_keys=False, default_flow_style=False
    )
    temporary = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, lock)
    finally:
        temporary.unlink(missing_ok=True)


def _record_in_lock(lock, lock_key, facts, url):
    """Record a file's sha256 and size under lock_key unless an entry is there already.

    Returns (entry, recorded): the entry now in the lock file, and whether this call wrote it. Another download job
    may have recorded the same key since the lock was first read; its entry then stands and is returned.
    """
    with _lock_held(lock):
        entries = read_lock(lock)
        if lock_key in entries:
            return entries[lock_key], False
        entries[lock_key] = {
            "sha256": facts["sha256"],
            "size": facts["size"],
            "url": url,
            "recorded": datetime.now(timezone.utc).date().isoformat(),
        }
        _write_lock(lock, entries)
        return entries[lock_key], True


def _verify(path, expected, url):
    """Verify a file, then record it in the lock file if it has no entry there yet.

    Returns the measured facts plus `recorded`; raises ChecksumError carrying only the mismatches (callers add where
    the file came from and what to do).
    """
    facts, problems = _measure(path, sha256=expected.sha256, md5=expected.md5, size=expected.size)
    facts["recorded"] = False
    if problems:
        raise ChecksumError("; ".join(problems))
    if expected.lock is None or expected.from_lock:
        return facts
    entry, facts["recorded"] = _record_in_lock(expected.lock, expected.lock_key, facts, url)
    if not facts["recorded"]:
        # Another job recorded this key while we downloaded: the file must match what it saw.
        expected.sha256, expected.from_lock = entry["sha256"], True
        if entry["sha256"] != facts["sha256"]:
            raise ChecksumError(f"sha256: expected {entry['sha256']}, got {facts['sha256']}")
    return facts


# ---------------------------------------------------------------------------------------------------------------------
# HTTP transfer


def _part_path(dest):
    return dest.with_name(dest.name + PART_SUFFIX)


def _content_range(header):
    """Parse 'bytes START-END/TOTAL' or 'bytes */TOTAL' into (start or None, total or None)."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[len("bytes ") :].partition("/")
    start = int(span.split("-")[0]) if span != "*" and span.split("-")[0].isdigit() else None
    return start, int(total) if total.isdigit() else None


def _refuse_html(response, url, dest):
    """An HTML answer where a checkpoint is expected is a web page, not the file (Google Drive's confirmation page)."""
    content_type = response.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() == "text/html":
        raise _URLFailed(
            f"answered with an HTML page (Content-Type {content_type}) instead of the file; sites such as Google "
            f"Drive show a confirmation page for large files. Download {url} by hand in a browser and place the file "
            f"at {dest}"
        )


def _body_chunks(response):
    """Yield the response body as it arrives.

    urllib3's read1() hands over every byte received before a connection drops, so a resume starts exactly where the
    data on disk stops; iter_content() fills whole chunks first and loses the unfinished one when the read fails.
    """
    if not hasattr(response.raw, "read1"):  # urllib3 1.x
        yield from response.iter_content(CHUNK_SIZE)
        return
    while chunk := response.raw.read1(CHUNK_SIZE, decode_content=True):
        yield chunk


def _stream_body(response, part, mode, offset, total, label, progress):
    """Write the response body to part (mode 'ab' to append after offset bytes, 'wb' to start over)."""
    length = response.headers.get("Content-Length")
    # A compressed body's Content-Length counts compressed bytes, not the bytes written; then only urllib3 checks it.
    encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
    expected_body = int(length) if length and length.isdigit() and not encoded else None
    received = 0
    with (
        open(part, mode) as out,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for chunk in _body_chunks(response):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if expected_body is not None and received < expected_body:
        raise _TransientError(f"connection closed after {received} of {expected_body} bytes")


def _attempt(session, url, part, dest, *, timeout, progress):
    """One request for url: resume part from its current size if it exists; return once the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
            status = response.status_code
            if status == 416 and offset:
                # Nothing left to send: the part is complete if it is exactly as long as the file.
                _, total = _content_range(response.headers.get("Content-Range"))
                if total == offset:
                    return
                part.unlink(missing_ok=True)
                raise _TransientError(f"server refused to resume at byte {offset} (HTTP 416); starting over")
            if 400 <= status < 500:
                raise _URLFailed(f"HTTP {status} {response.reason} (not retried: a 4xx answer stays the same)")
            if status >= 500:
                raise _TransientError(f"HTTP {status} {response.reason}")
            if status not in (200, 206):
                raise _URLFailed(f"unexpected HTTP status {status} {response.reason}")
            _refuse_html(response, url, dest)
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise _TransientError(f"asked to resume at byte {offset}, server sent from byte {start}")
                mode = "ab"
            else:
                # 200: either no Range was asked, or the server ignores Range and sends the whole file again.
                length = response.headers.get("Content-Length")
                offset, mode, total = 0, "wb", int(length) if length and length.isdigit() else None
            _stream_body(response, part, mode, offset, total, dest.name, progress)
    except _TRANSIENT_REQUEST_ERRORS as exc:
        raise _TransientError(f"{type(exc).__name__}: {exc}") from exc
    except requests.exceptions.RequestException as exc:
        raise _URLFailed(f"{type(exc).__name__}: {exc}") from exc


def _download(session, url, part, dest, *, retries, backoff, timeout, progress):
    """Bring url's bytes into part, retrying transient failures; each attempt resumes from the bytes on disk."""
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF))
        try:
            _attempt(session, url, part, dest, timeout=timeout, progress=progress)
            return
        except _TransientError as exc:
            last_error = exc
    raise _URLFailed(f"gave up after {retries + 1} attempts; last error: {last_error}")


def _by_hand(dest, manual_hint):
    """The closing advice of a failed download: where to put the file by hand."""
    advice = f"Download the file by hand and place it at {dest}"
    return f"{advice}. {manual_hint}" if manual_hint else f"{advice}."


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def fetch(
    urls,
    dest,
    *,
    sha256=None,
    md5=None,
    size=None,
    lock=None,
    lock_key=None,
    retries=4,
    backoff=1.0,
    timeout=60,
    progress=True,
    manual_hint=None,
):
    """Download one file to dest, verified; return what was verified.

    urls: addresses tried in order (mirrors); empty means the file cannot be fetched by a script.
    sha256, md5, size: published checksums to verify against. Without a sha256, `lock` (a YAML file) holds the
    sha256 and size recorded under `lock_key` at the first download, and later downloads are verified against it.
    retries: further attempts per URL after the first, on connection errors, timeouts, 5xx and truncated bodies,
    waiting backoff * 2**n seconds (capped at MAX_BACKOFF) before the n-th; 4xx answers are not retried.
    manual_hint: added to the error when the file must be fetched by hand.

    If dest exists it is verified, never downloaded again and never deleted. Returns {path, size, sha256, md5, url,
    downloaded, recorded}; url is None when dest was already there. Raises DownloadError, or ChecksumError when a
    file was obtained but does not match.
    """
    dest = Path(dest)
    lock = Path(lock) if lock is not None else None
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    expected = _expectations(sha256, md5, size, lock, lock_key)
    if dest.exists():
        return _verify_existing(dest, expected)
    if not urls:
        raise DownloadError(f"{dest.name} has no download address. {_by_hand(dest, manual_hint)}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    failures, checksum_failed = [], False
    with requests.Session() as session:
        session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        for url in urls:
            try:
                _download(
                    session, url, part, dest, retries=retries, backoff=backoff, timeout=timeout, progress=progress
                )
            except _URLFailed as exc:
                failures.append(f"{url}: {exc}")  # the .part stays, for the next mirror or the next run to resume
                continue
            try:
                facts = _verify(part, expected, url)
            except ChecksumError as exc:
                # A complete but wrong file cannot be resumed into a right one.
                part.unlink(missing_ok=True)
                failures.append(f"{url}: the downloaded file does not match: {exc}")
                checksum_failed = True
                continue
            os.replace(part, dest)
            facts.update(path=str(dest), url=url, downloaded=True)
            return facts

    attempts = "\n".join(f"  - {failure}" for failure in failures)
    if checksum_failed:
        raise ChecksumError(
            f"{dest.name} could not be downloaded intact:\n{attempts}\n"
            f"The partial download was deleted and nothing was placed at {dest}. {expected.remedy()}; otherwise run "
            "again (the transfer may have been corrupted) or check the mirror."
        )
    raise DownloadError(f"{dest.name} could not be downloaded:\n{attempts}\n{_by_hand(dest, manual_hint)}")


def _verify_existing(dest, expected):
    """Verify a file already at dest (downloaded earlier or placed by hand); never delete it."""
    try:
        facts = _verify(dest, expected, url=None)
    except ChecksumError as exc:
        raise ChecksumError(
            f"{dest} already exists but does not match: {exc}. It was left in place (it may have been put there by "
            f"hand): remove or replace it, then run again. {expected.remedy()}."
        ) from None
    facts.update(url=None, downloaded=False)
    return facts
