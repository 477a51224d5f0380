"""Synthetic workloads for benchmarks and dry runs: seeded document lengths shaped like the two
datasets of the published study, and packing of documents into token-budget batches.

The real datasets (LongAlign-10k, Long-Data-Collections) are not shipped; these generators reproduce
their *shape* so every tool (``tools/bench_attention.py``, ``tools/dry_run.py``) draws from one
definition. Shapes before ``scale``, as log-uniform mixtures (a length is drawn from a component,
then uniformly in log space between its bounds):

* ``longalign``: 85% of documents in [8K, 64K] tokens, a 15% short tail in [256, 8K];
* ``ldc``: 80% under 4K ([64, 4K]), a 20% long tail in [4K, 128K];
* ``uniform``: uniform in [1, max_len] (a neutral reference; ``scale`` does not apply).

``read_seqlens_file`` reads a user's own lengths (one per line, or JSON batches) into batches.

Every function is deterministic in its arguments (numpy ``default_rng`` seeded with the seed and the
dataset name). "Max length" of a dry-run configuration is the batch budget in tokens: documents are
clipped to it and packed into batches of at most that many tokens (as in the published study, where
the global batch in tokens equals the maximum sequence length).
"""
from __future__ import annotations

import json

from typing import Iterable

import numpy as np

SHAPES = {
    "longalign": ((0.85, 8192, 65536), (0.15, 256, 8192)),
    "ldc": ((0.80, 64, 4096), (0.20, 4096, 131072)),
}
DATASETS = tuple(SHAPES) + ("uniform",)
_CHUNK = 256  # lengths drawn per generator call by dataset_batches (fixed: keeps streams prefix-stable)


def _check_dataset(dataset: str, scale: float) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown length dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def _draw(rng: np.random.Generator, dataset: str, num: int, max_len: int, scale: float) -> np.ndarray:
    if dataset == "uniform":
        return rng.integers(1, max_len + 1, size=num, dtype=np.int64)
    comps = SHAPES[dataset]
    which = rng.choice(len(comps), size=num, p=[c[0] for c in comps])
    lo = np.log(np.array([c[1] for c in comps], dtype=np.float64))[which]
    hi = np.log(np.array([c[2] for c in comps], dtype=np.float64))[which]
    raw = np.exp(rng.uniform(lo, hi)) * scale
    return np.clip(np.rint(raw), 1, max_len).astype(np.int64)


def sample_lengths(dataset: str, num: int, seed: int, max_len: int, scale: float = 1.0) -> np.ndarray:
    """``num`` document lengths (int64, in [1, max_len]) drawn from ``dataset``'s shape.

    ``scale`` multiplies every length (to fit a small machine, e.g. 0.05); draws longer than
    ``max_len`` are clipped to it. Deterministic in the arguments.
    """
    _check_dataset(dataset, scale)
    if max_len < 1 or num < 0:
        raise ValueError(f"need num >= 0 and max_len >= 1, got num={num}, max_len={max_len}")
    rng = np.random.default_rng([seed, sum(map(ord, dataset))])
    return _draw(rng, dataset, num, max_len, scale)


def pack_batches(lengths: Iterable[int], tokens_per_batch: int) -> list[list[int]]:
    """Pack whole documents, greedily and in order, into batches of at most ``tokens_per_batch``.

    A batch is closed when the next document does not fit; that document opens the next batch. No
    document is dropped, cut or reordered, so ``sum(batches, [])`` equals the input. A document longer
    than the budget cannot be packed and raises :class:`ValueError` naming it and the budget.
    """
    if isinstance(tokens_per_batch, bool) or not isinstance(tokens_per_batch, (int, np.integer)) \
            or tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be a positive int, got {tokens_per_batch!r}")
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"document {i}: length must be an int, got {n!r}")
        n = int(n)
        if n < 1:
            raise ValueError(f"document {i}: length must be at least 1, got {n}")
        if n > tokens_per_batch:
            raise ValueError(
                f"document {i} has {n} tokens, more than the batch budget of {tokens_per_batch} tokens "
                "(--tokens-per-batch); raise the budget or split the document"
            )
        if used + n > tokens_per_batch:
            batches.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += n
    if cur:
        batches.append(cur)
    return batches


def pack_indices(lengths, tokens_per_batch: int) -> list[np.ndarray]:
    """:func:`pack_batches`, returning each batch as the indices of its documents in ``lengths``."""
    counts = np.cumsum([len(b) for b in pack_batches(lengths, tokens_per_batch)])
    if counts.size == 0:
        return []
    return np.split(np.arange(int(counts[-1]), dtype=np.int64), counts[:-1])


def dataset_batches(dataset: str, num_batches: int, tokens_per_batch: int, seed: int,
                    scale: float = 1.0) -> list[list[int]]:
    """Exactly ``num_batches`` batches of whole documents drawn from ``dataset``'s shape.

    Lengths (times ``scale``) are clipped to ``tokens_per_batch`` and packed greedily in order with
    :func:`pack_batches` semantics from an endless seeded stream: a batch closes when the next document
    does not fit, and that document opens the next batch. Nothing is dropped for being short: every
    batch returned is as full as in-order packing makes it (at least ``tokens_per_batch`` minus the
    next document's length), so fill varies; count it with ``sum(batch)``. The stream is drawn in
    fixed chunks, so the first ``k`` batches do not depend on ``num_batches``; documents drawn after
    the last returned batch are simply not used.
    """
    _check_dataset(dataset, scale)
    if num_batches < 0 or tokens_per_batch < 1:
        raise ValueError(f"need num_batches >= 0 and tokens_per_batch >= 1, got {num_batches}, {tokens_per_batch}")
    rng = np.random.default_rng([seed, sum(map(ord, dataset)), 1])
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    while len(batches) < num_batches:
        for n in _draw(rng, dataset, _CHUNK, tokens_per_batch, scale).tolist():
            if used + n > tokens_per_batch:
                batches.append(cur)
                cur, used = [], 0
                if len(batches) == num_batches:
                    break
            cur.append(n)
            used += n
    return batches


def checked_batch(batch, where: str) -> list[int]:
    """``batch`` if it is a non-empty list of positive int lengths; else ValueError naming ``where``."""
    if not isinstance(batch, list) or not batch:
        raise ValueError(f"{where}: a batch must be a non-empty list of document lengths, got {batch!r}")
    for n in batch:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: document lengths must be positive ints, got {n!r}")
    return batch


def read_seqlens_file(path: str, tokens_per_batch: int) -> list[list[int]]:
    """Batches from ``path``: a JSON list of batches (or an object with a ``batches`` list) is used as
    given; document lengths (one per line, ``#`` comments allowed, or a flat JSON list) are packed whole
    and in order into batches of ``tokens_per_batch`` (:func:`pack_batches`)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        lengths = []
        for i, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                lengths.append(int(line))
            except ValueError:
                raise ValueError(f"{path}:{i}: expected one document length (an int) per line, got {line!r}")
    if data is not None:
        if isinstance(data, dict):
            if "batches" not in data:
                raise ValueError(f"{path}: a JSON object must hold a 'batches' list")
            data = data["batches"]
        if isinstance(data, int):
            data = [data]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path}: expected a JSON list of batches or of document lengths")
        if all(isinstance(b, list) for b in data):
            return [checked_batch(b, f"{path}: batch {i}") for i, b in enumerate(data)]
        lengths = data
    if not lengths:
        raise ValueError(f"{path}: no document lengths found")
    checked_batch(lengths, path)
    try:
        return pack_batches(lengths, tokens_per_batch)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
