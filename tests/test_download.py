"""diffrobust.download against a real HTTP server on 127.0.0.1 that can misbehave on request."""

import hashlib
import http.server
import random
import re
import socket
import threading

import pytest
import yaml

from diffrobust.download import ChecksumError, DownloadError, fetch, file_digest, verify_file

# Retries stay fast in tests: backoff 0.01 s, doubling.
FAST = {"retries": 3, "backoff": 0.01, "timeout": 10, "progress": False}


def _body(n, seed=0):
    """n bytes of deterministic pseudo-random content (so that a misplaced or repeated byte changes every digest)."""
    return random.Random(seed).randbytes(n)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves FileServer's files; supports 'Range: bytes=N-' and the misbehaviours FileServer is told to show."""

    protocol_version = "HTTP/1.1"  # keep-alive, so that a connection closed mid-body is a truncation, not an end

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # keep pytest's output clean

    def do_GET(self):
        state = self.server.state
        path = self.path
        range_header = self.headers.get("Range")
        with state.guard:
            state.requests.append((path, range_header))
            failing = state.fail_first.get(path, 0)
            if failing:
                state.fail_first[path] = failing - 1
            truncate_at = state.truncate_first.pop(path, None)
            body = state.files.get(path)
        if failing:
            return self._send_simple(500, b"temporary failure")
        if body is None:
            return self._send_simple(404, b"not found")

        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and path not in state.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", state.content_type.get(path, "application/octet-stream"))
        self.send_header("Content-Length", str(len(payload)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if truncate_at is not None:
            # Simulate an interrupted transfer: send the first bytes, then drop the connection.
            self.wfile.write(payload[:truncate_at])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def _send_simple(self, status, text):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)


class FileServer:
    """What the test server serves and how it misbehaves, plus a log of (path, Range header) per request."""

    def __init__(self):
        self.guard = threading.Lock()
        self.files = {}  # path -> body
        self.truncate_first = {}  # path -> bytes sent by the next response before the connection is dropped
        self.fail_first = {}  # path -> number of HTTP 500 answers before the file is served
        self.ignore_range = set()  # paths served whole (200) even when a Range is asked
        self.content_type = {}  # path -> Content-Type other than application/octet-stream
        self.requests = []
        self.base_url = None

    def url(self, path):
        return self.base_url + path

    def seen(self, path):
        """Range headers (None where absent) of the requests made for path, in order."""
        with self.guard:
            return [range_header for requested, range_header in self.requests if requested == path]


@pytest.fixture
def server(monkeypatch):
    # Talk to 127.0.0.1 directly even if the environment names a proxy.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = FileServer()
    httpd.state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def closed_port():
    """A loopback port with nothing listening: connections to it are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _part(dest):
    return dest.with_name(dest.name + ".part")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def test_file_digest_and_verify_file(tmp_path):
    data = _body(3 * 1024 * 1024 + 7)  # more than one read chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_digest(path) == _sha256(data)
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()
    facts = verify_file(path, sha256=_sha256(data).upper(), md5=hashlib.md5(data).hexdigest(), size=len(data))
    assert facts["size"] == len(data) and facts["sha256"] == _sha256(data)
    with pytest.raises(ChecksumError, match="size: expected 5 bytes"):
        verify_file(path, size=5)


# ---------------------------------------------------------------------------------------------------------------------
# Verification


def test_good_file_is_verified_and_placed(server, tmp_path):
    data = _body(200_000)
    server.files["/model.pt"] = data
    dest = tmp_path / "ckpt" / "model.pt"
    result = fetch([server.url("/model.pt")], dest, sha256=_sha256(data), size=len(data), **FAST)
    assert dest.read_bytes() == data
    assert not _part(dest).exists()
    assert result["path"] == str(dest)
    assert result["sha256"] == _sha256(data) and result["size"] == len(data)
    assert result["url"] == server.url("/model.pt") and result["downloaded"]


def test_wrong_sha256_leaves_nothing_and_names_both_digests(server, tmp_path):
    data = _body(50_000)
    server.files["/model.pt"] = data
    dest = tmp_path / "model.pt"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as caught:
        fetch([server.url("/model.pt")], dest, sha256=wrong, **FAST)
    message = str(caught.value)
    assert "model.pt" in message and wrong in message and _sha256(data) in message
    assert "run again" in message
    assert not dest.exists() and not _part(dest).exists()


def test_md5_match_and_mismatch(server, tmp_path):
    data = _body(30_000, seed=1)
    server.files["/cifar-10-python.tar.gz"] = data
    url = server.url("/cifar-10-python.tar.gz")
    good = tmp_path / "good" / "cifar-10-python.tar.gz"
    result = fetch([url], good, md5=hashlib.md5(data).hexdigest(), **FAST)
    assert good.read_bytes() == data and result["md5"] == hashlib.md5(data).hexdigest()

    bad = tmp_path / "bad" / "cifar-10-python.tar.gz"
    with pytest.raises(ChecksumError) as caught:
        fetch([url], bad, md5="f" * 32, **FAST)
    assert "f" * 32 in str(caught.value) and hashlib.md5(data).hexdigest() in str(caught.value)
    assert not bad.exists() and not _part(bad).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Resuming


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    data = _body(100_000)
    server.files["/model.pt"] = data
    server.truncate_first["/model.pt"] = 37_000
    dest = tmp_path / "model.pt"
    fetch([server.url("/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert server.seen("/model.pt") == [None, "bytes=37000-"]
    assert dest.read_bytes() == data
    assert not _part(dest).exists()


def test_part_from_a_killed_run_is_resumed(server, tmp_path):
    data = _body(80_000)
    server.files["/model.pt"] = data
    dest = tmp_path / "model.pt"
    _part(dest).write_bytes(data[:12_345])
    fetch([server.url("/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert server.seen("/model.pt") == ["bytes=12345-"]
    assert dest.read_bytes() == data


def test_complete_part_answered_416_goes_to_verification(server, tmp_path):
    data = _body(10_000)
    server.files["/model.pt"] = data
    dest = tmp_path / "model.pt"
    _part(dest).write_bytes(data)
    fetch([server.url("/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert server.seen("/model.pt") == ["bytes=10000-"]
    assert dest.read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = _body(60_000)
    server.files["/model.pt"] = data
    server.ignore_range.add("/model.pt")
    dest = tmp_path / "model.pt"
    _part(dest).write_bytes(b"stale bytes that must not stay in front")
    fetch([server.url("/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert server.seen("/model.pt") == ["bytes=39-"]
    assert dest.read_bytes() == data


# ---------------------------------------------------------------------------------------------------------------------
# Errors and retries


def test_404_fails_at_once_naming_url_and_status(server, tmp_path):
    dest = tmp_path / "missing.pt"
    url = server.url("/missing.pt")
    with pytest.raises(DownloadError) as caught:
        fetch([url], dest, **FAST)
    assert not isinstance(caught.value, ChecksumError)
    assert url in str(caught.value) and "404" in str(caught.value)
    assert len(server.seen("/missing.pt")) == 1
    assert not dest.exists()


def test_500_then_ok_is_retried(server, tmp_path):
    data = _body(20_000)
    server.files["/model.pt"] = data
    server.fail_first["/model.pt"] = 2
    dest = tmp_path / "model.pt"
    fetch([server.url("/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert len(server.seen("/model.pt")) == 3
    assert dest.read_bytes() == data


def test_persistent_500_gives_up_after_the_retries(server, tmp_path):
    server.files["/model.pt"] = _body(1000)
    server.fail_first["/model.pt"] = 100
    dest = tmp_path / "model.pt"
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch([server.url("/model.pt")], dest, **FAST)
    assert len(server.seen("/model.pt")) == FAST["retries"] + 1


def test_next_mirror_is_tried(server, tmp_path):
    data = _body(5000)
    server.files["/mirror/model.pt"] = data
    dest = tmp_path / "model.pt"
    result = fetch([server.url("/gone/model.pt"), server.url("/mirror/model.pt")], dest, sha256=_sha256(data), **FAST)
    assert result["url"] == server.url("/mirror/model.pt")
    assert dest.read_bytes() == data


def test_no_network_names_url_and_where_to_put_the_file(closed_port, tmp_path):
    url = f"http://127.0.0.1:{closed_port}/model.pt"
    dest = tmp_path / "ckpt" / "model.pt"
    with pytest.raises(DownloadError) as caught:
        fetch([url], dest, manual_hint="See the README of the release.", **FAST)
    message = str(caught.value)
    assert url in message and str(dest) in message and "See the README of the release." in message
    assert not dest.exists()


def test_empty_urls_asks_for_the_file_by_hand(tmp_path):
    dest = tmp_path / "ckpt" / "checkpoint_8.pth"
    hint = "Google Drive folder only: fetch checkpoint_8.pth from the score_sde_pytorch release."
    with pytest.raises(DownloadError) as caught:
        fetch([], dest, manual_hint=hint, **FAST)
    assert hint in str(caught.value) and str(dest) in str(caught.value)
    assert not dest.exists()


def test_html_answer_is_refused(server, tmp_path):
    server.files["/uc"] = b"<html><body>Google Drive can't scan this file for viruses.</body></html>"
    server.content_type["/uc"] = "text/html; charset=utf-8"
    dest = tmp_path / "checkpoint_8.pth"
    with pytest.raises(DownloadError) as caught:
        fetch([server.url("/uc")], dest, **FAST)
    message = str(caught.value)
    assert server.url("/uc") in message and "HTML" in message and "by hand" in message and str(dest) in message
    assert len(server.seen("/uc")) == 1
    assert not dest.exists() and not _part(dest).exists()


# ---------------------------------------------------------------------------------------------------------------------
# An existing destination


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    data = _body(4000)
    dest = tmp_path / "model.pt"
    dest.write_bytes(data)
    result = fetch([server.url("/model.pt")], dest, sha256=_sha256(data), size=len(data), **FAST)
    assert server.requests == []
    assert result["downloaded"] is False and result["url"] is None and result["sha256"] == _sha256(data)


def test_existing_bad_file_is_reported_and_kept(server, tmp_path):
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"placed by hand, but not the right file")
    with pytest.raises(ChecksumError) as caught:
        fetch([server.url("/model.pt")], dest, sha256="a" * 64, **FAST)
    message = str(caught.value)
    assert str(dest) in message and "a" * 64 in message and "remove or replace" in message
    assert dest.read_bytes() == b"placed by hand, but not the right file"
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------------------------
# The lock file


def test_lock_records_first_download_and_verifies_later_ones(server, tmp_path):
    data = _body(40_000)
    server.files["/model.pt"] = data
    lock = tmp_path / "config" / "checkpoints.lock.yaml"
    url = server.url("/model.pt")
    key = "guided_diffusion_256_uncond/256x256_diffusion_uncond.pt"

    first = fetch([url], tmp_path / "a" / "model.pt", lock=lock, lock_key=key, **FAST)
    entry = yaml.safe_load(lock.read_text())[key]
    assert first["recorded"] is True
    assert entry["sha256"] == _sha256(data) and entry["size"] == len(data) and entry["url"] == url
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["recorded"])

    lock_text = lock.read_text()
    second = fetch([url], tmp_path / "b" / "model.pt", lock=lock, lock_key=key, **FAST)
    assert second["recorded"] is False and second["sha256"] == _sha256(data)
    assert lock.read_text() == lock_text

    server.files["/model.pt"] = _body(40_000, seed=9)  # the publisher replaced the file
    dest = tmp_path / "c" / "model.pt"
    with pytest.raises(ChecksumError) as caught:
        fetch([url], dest, lock=lock, lock_key=key, **FAST)
    message = str(caught.value)
    assert _sha256(data) in message and _sha256(server.files["/model.pt"]) in message
    assert key in message and str(lock) in message
    assert not dest.exists() and not _part(dest).exists()
    assert lock.read_text() == lock_text


def test_lock_verifies_a_file_placed_by_hand(tmp_path):
    data = _body(3000)
    lock = tmp_path / "checkpoints.lock.yaml"
    placed = tmp_path / "placed.pt"
    placed.write_bytes(data)
    result = fetch([], placed, lock=lock, lock_key="x/placed.pt", **FAST)
    assert result["recorded"] is True
    assert yaml.safe_load(lock.read_text())["x/placed.pt"]["url"] is None

    other = tmp_path / "other.pt"
    other.write_bytes(data[:-1] + b"\0")
    with pytest.raises(ChecksumError, match="x/placed.pt"):
        fetch([], other, lock=lock, lock_key="x/placed.pt", **FAST)
    assert other.exists()


def test_concurrent_downloads_all_land_in_the_lock(server, tmp_path):
    lock = tmp_path / "checkpoints.lock.yaml"
    bodies = {f"/m{i}.pt": _body(20_000, seed=i) for i in range(8)}
    server.files.update(bodies)
    errors = []

    def download(path):
        try:
            fetch([server.url(path)], tmp_path / path.strip("/"), lock=lock, lock_key=path, **FAST)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=download, args=(path,)) for path in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    entries = yaml.safe_load(lock.read_text())
    assert {key: entry["sha256"] for key, entry in entries.items()} == {p: _sha256(b) for p, b in bodies.items()}
