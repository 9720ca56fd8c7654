"""The project's copy of the fixtures is complete and unchanged (tests/fixtures/SHA256SUMS), and equal to
../shared/fixtures wherever that folder is present (refresh the copy and its sums when the shared one changes:
`cp -r ../shared/fixtures/. tests/fixtures/ && cd tests/fixtures && find . -type f ! -name SHA256SUMS | sort |
xargs sha256sum > SHA256SUMS`)."""

import hashlib

from conftest import LOCAL_FIXTURES, SHARED_FIXTURES


def _sums(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "SHA256SUMS"}


def _recorded():
    lines = (LOCAL_FIXTURES / "SHA256SUMS").read_text().splitlines()
    return {name.removeprefix("./"): digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def test_the_fixture_copy_matches_its_recorded_sums():
    recorded = _recorded()
    assert len(recorded) >= 15 and "architectures/score_sde_ncsnpp_small.pt" in recorded
    assert _sums(LOCAL_FIXTURES) == recorded


def test_the_fixture_copy_equals_the_shared_fixtures_where_they_exist():
    # Without ../shared (a clone with nothing beside it) the recorded sums stand in for the shared folder.
    shared = _sums(SHARED_FIXTURES) if SHARED_FIXTURES.is_dir() else _recorded()
    assert shared == _sums(LOCAL_FIXTURES), "tests/fixtures is out of date: refresh it (see this file's docstring)"
