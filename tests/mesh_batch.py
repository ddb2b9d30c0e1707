"""The input batch of the mesh tests (shared by sharding_worker.py and the pytest side)."""

import numpy as np


def batch(vocab: int, b: int = 8, s: int = 8):
    """ids [b, s] int32 avoiding 0 (pad), mask [b, s] with left padding on rows 0 and 5."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    ids[0, :3], mask[0, :3] = 0, 0
    ids[5, :1], mask[5, :1] = 0, 0
    return ids, mask
