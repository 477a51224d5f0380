"""Transformer Engine's packed (THD) context-parallel token layout, in pure numpy (testable on CPU).

TE's context parallelism wants every document padded at its tail to a multiple of ``2 * cp`` tokens and
split into ``2 * cp`` equal chunks; rank ``r`` keeps chunks ``r`` and ``2cp-1-r`` of *every* document
("DualChunkSwap", the per-document zigzag). The rank's THD buffer is its chunks back to back, document by
document, so document ``d`` occupies local rows ``[cu_seqlens_padded[d] / cp, cu_seqlens_padded[d+1] / cp)``.
TE is called with the *global* ``cu_seqlens`` (real lengths) and ``cu_seqlens_padded`` (physical
offsets); padding rows are zeros that the kernel skips (``pad_between_seqs=True``).

The contract's ``local_indices(rank)`` lists only a rank's *real* tokens (so the ranks partition the
batch); :meth:`TELayout.buffer_positions` says where each of them sits in the padded buffer. A rank may
hold no real token of a short document (or none at all when there are more ranks than tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dcp_backend.batch import PackedBatch, concat_aranges
from dcp_backend.errors import CPError


def padded_lengths(seqlens: np.ndarray, cp: int) -> np.ndarray:
    """Each length rounded up to a multiple of ``2 * cp`` (TE's divisibility rule for CP)."""
    m = 2 * cp
    return -(-np.asarray(seqlens, dtype=np.int64) // m) * m


def bucket_lengths(padded: np.ndarray, max_groups: int) -> np.ndarray:
    """Raise lengths to at most ``max_groups`` distinct values, adding the fewest causal attention pairs.

    TE's hierarchical a2a+p2p path takes no THD, so every distinct padded length is one BSHD batch: one
    complete context-parallel pass (all-to-alls and the K/V ring) per layer. Raising a document to the
    next chosen length costs ``(B^2 - P^2) / 2`` extra causal pairs (tail padding is never visible to a
    real query). An exact dynamic programme over the sorted distinct lengths picks the group bounds.
    """
    padded = np.asarray(padded, dtype=np.int64)
    values, counts = np.unique(padded, return_counts=True)
    m = values.size
    if m <= max_groups:
        return padded.copy()
    v = values.astype(np.float64)
    sq = np.concatenate([[0.0], np.cumsum(counts * v * v)])  # prefix sums of count * len^2
    cnt = np.concatenate([[0.0], np.cumsum(counts)])

    def cost(a: int, b: int) -> float:  # lengths a..b (inclusive) raised to values[b]
        return (cnt[b + 1] - cnt[a]) * v[b] * v[b] - (sq[b + 1] - sq[a])

    inf = float("inf")
    best = np.full((max_groups + 1, m), inf)
    arg = np.zeros((max_groups + 1, m), dtype=np.int64)
    for b in range(m):
        best[1, b] = cost(0, b)
    for k in range(2, max_groups + 1):
        for b in range(m):
            for a in range(1, b + 1):  # the last group is a..b
                c = best[k - 1, a - 1] + cost(a, b)
                if c < best[k, b]:
                    best[k, b], arg[k, b] = c, a
    k = int(np.argmin(best[1:, m - 1])) + 1
    upper = np.empty(m, dtype=np.int64)
    b = m - 1
    while k >= 1:
        a = arg[k, b] if k > 1 else 0
        upper[a:b + 1] = values[b]
        b, k = a - 1, k - 1
    return upper[np.searchsorted(values, padded)]


@dataclass(frozen=True, eq=False)
class TELayout:
    """DualChunkSwap layout of a packed batch over ``cp`` ranks. ``max_length_groups`` (the BSHD path of
    a2a+p2p) raises padded lengths to at most that many distinct values (:func:`bucket_lengths`)."""

    batch: PackedBatch
    cp: int
    max_length_groups: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cp, (int, np.integer)) or self.cp < 1:
            raise CPError(f"TE layout: the context-parallel size must be a positive int, got {self.cp!r}")

    # ------------------------------------------------------------------ TE's metadata
    @cached_property
    def padded_seqlens(self) -> np.ndarray:
        padded = padded_lengths(self.batch.seqlens, self.cp)
        if self.max_length_groups is not None:
            padded = bucket_lengths(padded, self.max_length_groups)
        return padded

    @property
    def cu_seqlens(self) -> np.ndarray:
        """Global offsets of the real tokens (TE's ``cu_seqlens_q/kv``)."""
        return self.batch.cu_seqlens

    @cached_property
    def cu_seqlens_padded(self) -> np.ndarray:
        """Global offsets with every document padded (TE's ``cu_seqlens_q/kv_padded``)."""
        return np.concatenate([[0], np.cumsum(self.padded_seqlens)]).astype(np.int64)

    @property
    def max_seqlen(self) -> int:
        """Longest padded document (TE's ``max_seqlen_q/kv``)."""
        return int(self.padded_seqlens.max())

    @cached_property
    def chunk_sizes(self) -> np.ndarray:
        """Tokens per chunk of every document (padded length / 2cp)."""
        return self.padded_seqlens // (2 * self.cp)

    @property
    def local_tokens(self) -> int:
        """Rows of every rank's padded THD buffer (the same on all ranks)."""
        return int(self.cu_seqlens_padded[-1]) // self.cp

    @cached_property
    def local_cu_seqlens_padded(self) -> np.ndarray:
        """Offsets of the documents inside one rank's padded buffer."""
        return self.cu_seqlens_padded // self.cp

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        """The two chunks (of ``2cp``) that ``rank`` keeps of every document."""
        self._check_rank(rank)
        return rank, 2 * self.cp - 1 - rank

    # ------------------------------------------------------------------ token <-> buffer mapping
    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.cp:
            raise CPError(f"rank must be in [0, {self.cp}), got {rank!r}")

    def _rank_map(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_maps", {})
        if rank in cache:
            return cache[rank]
        self._check_rank(rank)
        lens, c = self.batch.seqlens, self.chunk_sizes
        first, second = self.chunk_ids(rank)
        nd = lens.size
        # Two segments per document: chunk `first` then chunk `second`, real tokens only.
        doc_start = np.stack([first * c, second * c], axis=1).reshape(-1)  # document-local
        buf_start = np.stack([self.local_cu_seqlens_padded[:-1], self.local_cu_seqlens_padded[:-1] + c],
                             axis=1).reshape(-1)
        real = np.clip(np.repeat(lens, 2) - doc_start, 0, np.repeat(c, 2))
        doc = np.repeat(np.arange(nd), 2)
        glob = concat_aranges(self.batch.cu_seqlens[doc] + doc_start, real)
        pos = concat_aranges(buf_start, real)
        cache[rank] = (glob, pos)
        return glob, pos

    def local_indices(self, rank: int) -> np.ndarray:
        """Global packed indices of ``rank``'s real tokens, in buffer order."""
        return self._rank_map(rank)[0]

    def buffer_positions(self, rank: int) -> np.ndarray:
        """Row of the padded THD buffer where each of ``local_indices(rank)`` goes."""
        return self._rank_map(rank)[1]

    def real_tokens(self) -> np.ndarray:
        """Real tokens held per rank."""
        return np.array([self.local_indices(r).size for r in range(self.cp)], dtype=np.int64)

    def local_real_seqlens(self, rank: int) -> np.ndarray:
        """Real tokens of each document on ``rank`` (what TE derives from cu_seqlens and cu_seqlens_padded)."""
        self._check_rank(rank)
        lens, c = self.batch.seqlens, self.chunk_sizes
        first, second = self.chunk_ids(rank)
        return np.clip(lens - first * c, 0, c) + np.clip(lens - second * c, 0, c)

    def to_buffer(self, x, rank: int):
        """Scatter ``x`` (rows = ``local_indices(rank)``) into a zero-padded buffer (numpy or torch)."""
        pos = self.buffer_positions(rank)
        if x.shape[0] != pos.size:
            raise CPError(f"TE layout: rank {rank} holds {pos.size} real tokens, got {x.shape[0]} rows")
        try:
            import torch

            if isinstance(x, torch.Tensor):
                idx = torch.from_numpy(pos).to(x.device)
                buf = x.new_zeros((self.local_tokens,) + tuple(x.shape[1:]))
                return buf.index_copy(0, idx, x)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        buf = np.zeros((self.local_tokens,) + tuple(x.shape[1:]), dtype=x.dtype)
        buf[pos] = x
        return buf

    def from_buffer(self, buf, rank: int):
        """The rows of a padded buffer that hold ``rank``'s real tokens (inverse of :meth:`to_buffer`)."""
        pos = self.buffer_positions(rank)
        if buf.shape[0] != self.local_tokens:
            raise CPError(f"TE layout: the padded buffer has {self.local_tokens} rows, got {buf.shape[0]}")
        try:
            import torch

            if isinstance(buf, torch.Tensor):
                return buf.index_select(0, torch.from_numpy(pos).to(buf.device))
        except ImportError:  # pragma: no cover
            pass
        return buf[pos]

    # ------------------------------------------------------------------ BSHD groups (a2a+p2p)
    @cached_property
    def length_groups(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Documents grouped by padded length, for TE paths that take no THD (hierarchical a2a+p2p).

        Returns ``[(padded_length, docs, rows)]``: ``rows`` are the rows of a rank's padded buffer of
        those documents in order, so ``buf[rows].view(len(docs), padded_length // cp, ...)`` is a BSHD
        batch whose sequence dimension is each document's two chunks (the same layout on every rank).
        """
        groups = []
        loc = self.local_cu_seqlens_padded
        for plen in np.unique(self.padded_seqlens).tolist():
            docs = np.nonzero(self.padded_seqlens == plen)[0]
            rows = concat_aranges(loc[docs], np.full(docs.size, plen // self.cp, dtype=np.int64))
            groups.append((int(plen), docs, rows))
        return groups
