"""The one seed derivation of the project: every stream of random draws is named by integers under a job's seed.

`derived_seed(seed, *key)` feeds numpy's SeedSequence with the key as its spawn key, so streams with different keys
are independent and a stream does not depend on how many others exist or in which order they are drawn: an image's
smoothing noise depends on (seed, dataset index, stream) only, never on its shard; a training step's draws on
(seed, step, stream) only, never on when the job was interrupted. Generators are CPU generators (see `device`).
"""

import numpy as np
import torch


def derived_seed(seed, *key):
    """A 63-bit torch seed for the stream `key` (non-negative integers) of a job seeded `seed`."""
    sequence = np.random.SeedSequence(int(seed), spawn_key=tuple(int(part) for part in key))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed, *key):
    """A CPU torch.Generator seeded for the stream `key` of `seed` (no key: `seed` itself)."""
    return torch.Generator().manual_seed(derived_seed(seed, *key) if key else int(seed))
