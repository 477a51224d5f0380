"""Seeded synthetic document lengths shaped like LongAlign-10k and Long-Data-Collections, packed into
fixed-size batches, for tools/bench_attention.py.

A stop-gap local to tools/: the launcher branch brings the project's shared
``sample_lengths(dataset, num, seed, max_len, scale)``; once it lands, this module should call it (the
signature here is the same) so that every tool draws from one definition.

Shapes (before ``scale``), as log-uniform mixtures:

* ``longalign``: 85% of documents in [8K, 64K] tokens, a 15% short tail in [256, 8K];
* ``ldc``: 80% under 4K ([64, 4K]), a 20% long tail in [4K, 128K].

``scale`` multiplies every length (to fit a small machine, e.g. 0.05); lengths are at least 1 and at
most ``max_len`` (longer draws are clipped).
"""
from __future__ import annotations

import numpy as np

SHAPES = {
    "longalign": ((0.85, 8192, 65536), (0.15, 256, 8192)),
    "ldc": ((0.80, 64, 4096), (0.20, 4096, 131072)),
}


def sample_lengths(dataset: str, num: int, seed: int, max_len: int, scale: float = 1.0) -> np.ndarray:
    """``num`` lengths (int64, in [1, max_len]) drawn from ``dataset``'s shape; deterministic in the args."""
    if dataset not in SHAPES:
        raise ValueError(f"unknown length dataset {dataset!r}; choose one of {sorted(SHAPES)}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if max_len < 1 or num < 0:
        raise ValueError(f"need num >= 0 and max_len >= 1, got num={num}, max_len={max_len}")
    rng = np.random.default_rng([seed, sum(map(ord, dataset))])
    comps = SHAPES[dataset]
    which = rng.choice(len(comps), size=num, p=[c[0] for c in comps])
    lo = np.log(np.array([c[1] for c in comps], dtype=np.float64))[which]
    hi = np.log(np.array([c[2] for c in comps], dtype=np.float64))[which]
    raw = np.exp(rng.uniform(lo, hi)) * scale
    return np.clip(np.rint(raw), 1, max_len).astype(np.int64)


def make_batches(dataset: str, num_batches: int, tokens_per_batch: int, scale: float, seed: int = 0) -> list[list[int]]:
    """``num_batches`` packed batches of exactly ``tokens_per_batch`` tokens each: documents are drawn in
    order and the last document of a batch is cut to fit (as a packing data loader does)."""
    if tokens_per_batch < 1 or num_batches < 1:
        raise ValueError("num_batches and tokens_per_batch must be positive")
    batches = []
    stream = iter(())
    draw = 0
    for _ in range(num_batches):
        batch, used = [], 0
        while used < tokens_per_batch:
            try:
                n = int(next(stream))
            except StopIteration:
                stream = iter(sample_lengths(dataset, 256, seed * 1000 + draw, tokens_per_batch, scale))
                draw += 1
                continue
            n = min(n, tokens_per_batch - used)
            batch.append(n)
            used += n
        batches.append(batch)
    return batches
