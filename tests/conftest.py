import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The project's copy of ../shared/fixtures (numbers only: manifests and reference outputs of the official networks),
# so that a fresh clone passes its tests with nothing beside it. DIFFROBUST_FIXTURES points elsewhere (e.g. at a
# newer shared/fixtures); tests/test_fixtures.py says when the copy is out of date.
LOCAL_FIXTURES = REPO / "tests" / "fixtures"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURES = Path(os.environ.get("DIFFROBUST_FIXTURES", LOCAL_FIXTURES))


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"test fixtures not found at {FIXTURES}: unset DIFFROBUST_FIXTURES to use the "
                                f"project's copy in {LOCAL_FIXTURES}")
    return FIXTURES
