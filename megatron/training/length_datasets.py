"""Synthetic, seeded document-length datasets shaped like LongAlign and Long-Data-Collections (LDC).

The published DCP evaluation draws batches from the token lengths of two Hugging Face datasets
(LongAlign-10k and a 10k-sample Long-Data-Collections subset). Those lengths are not shipped anywhere we
can use offline, so benchmarks, dry runs and ``pretrain_gpt.py --mock-data`` use these generators
instead. They reproduce the *shape* that matters to context parallelism (how many documents share a
batch and how skewed their lengths are), not the exact published histograms:

* ``longalign``: long instruction/chat samples. Log-normal around 12K tokens (sigma 0.55), 8% short
  samples (log-normal around 1.5K), lengths 256..64K before scaling: few documents per batch, most of
  them long.
* ``ldc``: a pre-training mix. 65% short documents (log-normal around 1.2K, sigma 1.0) and 35% long
  ones (log-normal around 16K, sigma 0.9), lengths 16..128K before scaling: many short documents next
  to a few very long ones.
* ``uniform``: lengths uniform in ``[1, max_len]`` (a neutral reference).

``scale`` multiplies every length (the published study used 0.5, 1, 2 and 4). Lengths above
``max_len`` are re-drawn, never clipped or dropped, so the result always has ``num`` entries (an
error is raised if the requested scale makes that impossible in reasonable time).

API (stable; ``tools/dry_run.py`` and the benchmarks import it)::

    sample_lengths(dataset, num, seed, max_len, scale=1.0) -> np.ndarray   # int64, shape [num]
    pack_batches(lengths, tokens_per_batch) -> list[list[int]]             # indices into lengths
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["LENGTH_DATASETS", "available_length_datasets", "pack_batches", "sample_lengths"]


@dataclass(frozen=True)
class _Component:
    weight: float
    median: float  # tokens, before scaling
    sigma: float  # log-space standard deviation


@dataclass(frozen=True)
class _LengthModel:
    components: tuple[_Component, ...]
    low: int  # inclusive bounds before scaling
    high: int
    description: str


LENGTH_DATASETS: dict[str, _LengthModel] = {
    "longalign": _LengthModel(
        (_Component(0.92, 12_000, 0.55), _Component(0.08, 1_500, 0.8)), 256, 65_536,
        "LongAlign-shaped: mostly long chat/instruction samples (median ~11K tokens, up to 64K)",
    ),
    "ldc": _LengthModel(
        (_Component(0.65, 1_200, 1.0), _Component(0.35, 16_000, 0.9)), 16, 131_072,
        "Long-Data-Collections-shaped: many short documents plus a heavy tail of very long ones",
    ),
}


def available_length_datasets() -> list[str]:
    return sorted(LENGTH_DATASETS) + ["uniform"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def sample_lengths(dataset: str, num: int, seed: int, max_len: int, scale: float = 1.0) -> np.ndarray:
    """``num`` document lengths (int64, each in ``[1, max_len]``) drawn from ``dataset``'s shape.

    Deterministic in ``(dataset, num, seed, max_len, scale)``.
    """
    num = _check_int("num", num, 0)
    max_len = _check_int("max_len", max_len, 1)
    seed = _check_int("seed", seed, 0)
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    rng = np.random.default_rng([seed, 0x1E46])
    if dataset == "uniform":
        return rng.integers(1, max_len + 1, size=num, dtype=np.int64)
    if dataset not in LENGTH_DATASETS:
        raise ValueError(f"unknown length dataset {dataset!r}; available: {', '.join(available_length_datasets())}")
    model = LENGTH_DATASETS[dataset]
    weights = np.array([c.weight for c in model.components])
    weights = weights / weights.sum()
    out = np.empty(0, dtype=np.int64)
    for _ in range(64):  # rejection rounds; each draws a generous surplus
        need = num - out.size
        if need <= 0:
            break
        draw = max(2 * need, 64)
        comp = rng.choice(len(weights), size=draw, p=weights)
        med = np.array([c.median for c in model.components])[comp]
        sig = np.array([c.sigma for c in model.components])[comp]
        raw = np.exp(rng.normal(np.log(med), sig))
        raw = np.clip(raw, model.low, model.high)  # the dataset's own range, before scaling
        lens = np.maximum(1, np.rint(raw * scale)).astype(np.int64)
        out = np.concatenate([out, lens[lens <= max_len]])
    if out.size < num:
        raise ValueError(
            f"could not draw {num} {dataset} lengths <= max_len={max_len} at scale {scale}: too few samples fit; "
            "raise max_len or lower scale"
        )
    return out[:num]


def pack_batches(lengths: Sequence[int] | np.ndarray, tokens_per_batch: int) -> list[list[int]]:
    """Pack documents greedily, in the given order, into batches of at most ``tokens_per_batch`` tokens.

    A new batch starts whenever the next document does not fit in the current one. Every index appears in
    exactly one batch, in order; nothing is dropped. A document longer than the budget is an error (split
    it first, e.g. with ``pretrain_gpt.py --split-long-documents``).
    """
    budget = _check_int("tokens_per_batch", tokens_per_batch, 1)
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 1):
        raise ValueError("lengths must be positive integers")
    too_long = np.nonzero(arr > budget)[0]
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"document {i} has {int(arr[i])} tokens, more than the batch budget of {budget} tokens "
            f"({too_long.size} document(s) are too long); split long documents or raise the budget"
        )
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(arr.tolist()):
        if used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches
