"""Microbenchmark batches shaped like the published ones: dataset-shaped document lengths, multiplied by a
length scale, documents longer than the budget dropped, packed greedily in order into a token budget,
and a batch kept only if it is at least 75% full (the published preprocessing, dcp_reference.md §5).

Lengths come from the project's shared :func:`dcp_backend.workloads.sample_lengths` (synthetic
LongAlign-/LDC-shaped mixtures, not the datasets' tokenised lengths).
"""
from __future__ import annotations

import numpy as np

from dcp_backend.workloads import sample_lengths


def paper_batches(dataset: str, num_batches: int, tokens_per_batch: int = 131072, scale: float = 1.0,
                  seed: int = 42, min_fill: float = 0.75) -> list[list[int]]:
    """``num_batches`` batches (lists of document lengths), deterministic in the arguments."""
    sample = sample_lengths
    batches: list[list[int]] = []
    cur: list[int] = []
    draw = 0
    while len(batches) < num_batches:
        if draw > 1000:
            raise RuntimeError(f"could not form {num_batches} batches of {tokens_per_batch} tokens from {dataset}")
        lens = sample(dataset, 512, seed * 7919 + draw, 1 << 40, scale)
        draw += 1
        for n in lens.tolist():
            if n > tokens_per_batch:
                continue
            if sum(cur) + n > tokens_per_batch:
                if sum(cur) >= min_fill * tokens_per_batch:
                    batches.append(cur)
                    if len(batches) == num_batches:
                        break
                cur = []
            cur.append(int(n))
    return batches


def describe(batches: list[list[int]]) -> dict:
    docs = np.array([len(b) for b in batches])
    longest = np.array([max(b) for b in batches])
    return {"batches": len(batches), "docs_mean": float(docs.mean()), "docs_min": int(docs.min()),
            "docs_max": int(docs.max()), "longest_mean": float(longest.mean()),
            "tokens_mean": float(np.mean([sum(b) for b in batches]))}
