"""The project's copy of the fixtures is complete and unchanged (tests/fixtures/SHA256SUMS), and equal to
../shared/fixtures wherever that folder is present, apart from the files the project made itself
(tests/fixtures/PROJECT_MADE.md). Refresh the copy and its sums when the shared one changes:
`cp -r ../shared/fixtures/. tests/fixtures/ && cd tests/fixtures && find . -type f ! -name SHA256SUMS | sort |
xargs sha256sum > SHA256SUMS`."""

import hashlib
import re

from conftest import LOCAL_FIXTURES, SHARED_FIXTURES

PROJECT_MADE_LIST = "PROJECT_MADE.md"


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


def _project_made():
    """The files PROJECT_MADE.md lists (the first column of its table), and the list itself."""
    text = (LOCAL_FIXTURES / PROJECT_MADE_LIST).read_text()
    return {PROJECT_MADE_LIST} | set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))


def _shared_part(sums):
    made = _project_made()
    return {name: digest for name, digest in sums.items() if name not in made}


def test_the_fixture_copy_equals_the_shared_fixtures_where_they_exist():
    # Without ../shared (a clone with nothing beside it) the recorded sums stand in for the shared folder.
    shared = _sums(SHARED_FIXTURES) if SHARED_FIXTURES.is_dir() else _shared_part(_recorded())
    assert shared == _shared_part(_sums(LOCAL_FIXTURES)), \
        "tests/fixtures is out of date: refresh it (see this file's docstring)"


def test_the_project_made_fixtures_are_listed_recorded_and_not_in_the_shared_folder():
    made = _project_made()
    assert {"architectures/robustbench_cifar10_dm_wrn70_16.json", "architectures/robustbench_dm_wrn_small.pt"} <= made
    assert made <= set(_recorded())  # present and checked against SHA256SUMS like the rest
    if SHARED_FIXTURES.is_dir():  # once the shared folder has one of them, its copy is the shared one
        assert not made & set(_sums(SHARED_FIXTURES)), "drop the shared files from PROJECT_MADE.md"
