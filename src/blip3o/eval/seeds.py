"""Seeds derived from a user's seed: one hash, shared by the evaluation's batches and self-check's rounds."""

from __future__ import annotations

import numpy as np


def hashed_seed(seed: int, index: int) -> int:
    """A 64-bit seed for stream `index` of `seed`. A hash, not `seed + index`, so that no stream of one seed
    repeats another seed's (seed 1's batch 0 would be seed 0's batch 1)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
