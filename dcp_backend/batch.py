"""A packed batch of documents: validated lengths, offsets, and per-token document ids and positions.

Every backend and the planner describe tokens by their *global packed index*: document ``d`` occupies
``[cu_seqlens[d], cu_seqlens[d+1])``. All helpers here are vectorised (no Python loop over tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from dcp_backend.errors import CPError


def validate_seqlens(seqlens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return the lengths as an int64 array, or raise :class:`CPError` naming what is wrong."""
    if isinstance(seqlens, (str, bytes)):
        raise CPError(f"seqlens must be a sequence of positive ints, got {seqlens!r}")
    try:
        arr = np.asarray(list(seqlens) if not isinstance(seqlens, np.ndarray) else seqlens)
    except TypeError as exc:
        raise CPError(f"seqlens must be a sequence of positive ints, got {seqlens!r}") from exc
    if arr.ndim != 1:
        raise CPError(f"seqlens must be one-dimensional (one length per packed document), got shape {arr.shape}")
    if arr.size == 0:
        raise CPError("seqlens is empty: a batch needs at least one document")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise CPError(f"seqlens must be whole numbers, got {arr.tolist()}")
    elif arr.dtype.kind not in "iu":
        raise CPError(f"seqlens must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.nonzero(arr <= 0)[0]
    if bad.size:
        raise CPError(
            f"seqlens must be positive: document {int(bad[0])} has length {int(arr[bad[0]])}; "
            "drop empty documents before planning"
        )
    return arr


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Documents packed back to back; token ``t`` belongs to document ``doc_ids[t]`` at ``positions[t]``."""

    seqlens: np.ndarray

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int] | np.ndarray) -> "PackedBatch":
        return cls(validate_seqlens(seqlens))

    @property
    def num_docs(self) -> int:
        return int(self.seqlens.size)

    @cached_property
    def cu_seqlens(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.seqlens)]).astype(np.int64)

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @cached_property
    def doc_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_docs, dtype=np.int64), self.seqlens)

    @cached_property
    def positions(self) -> np.ndarray:
        """Position of each token inside its own document (0-based)."""
        return np.arange(self.total_tokens, dtype=np.int64) - self.cu_seqlens[self.doc_ids]

    @cached_property
    def token_seqlens(self) -> np.ndarray:
        """Length of the document each token belongs to."""
        return self.seqlens[self.doc_ids]


def concat_aranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets
