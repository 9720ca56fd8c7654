import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures beside the checkout (CI clones the project with shared/ beside it).
FIXTURES = Path(os.environ.get("DIFFROBUST_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        raise FileNotFoundError(
            f"test fixtures not found at {FIXTURES}: clone the project next to shared/ or set DIFFROBUST_FIXTURES"
        )
    return FIXTURES
