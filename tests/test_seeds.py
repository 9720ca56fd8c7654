"""The one seed derivation: streams are named by integer keys, independent of each other, and the only place that
turns seeds into streams is diffrobust.seeds."""

from pathlib import Path

import torch

from diffrobust import seeds

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffrobust"


def test_a_stream_is_its_key():
    assert seeds.derived_seed(7, 3, 1) == seeds.derived_seed(7, 3, 1)
    distinct = {seeds.derived_seed(seed, *key) for seed in (0, 1) for key in ((0,), (1,), (0, 0), (0, 1), (1, 0))}
    assert len(distinct) == 10  # other seeds, other keys, other key lengths: other streams
    assert all(0 <= value < 2**63 for value in distinct)
    a, b = seeds.generator(7, 3, 1), seeds.generator(7, 3, 2)
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    assert seeds.generator(5).initial_seed() == 5


def test_no_second_derivation_in_the_package():
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if "SeedSequence" in path.read_text())
    assert users == ["seeds.py"]
