"""`AttnWork`: a batch of independent attention segments, the unit a block kernel executes in one call.

Segment ``s`` pairs query rows ``[cu_q[s], cu_q[s+1])`` with key rows ``[cu_k[s], cu_k[s+1])`` of the
(gathered) q and kv tensors; query row ``t`` sees the keys of its segment inside ``ranges[t]``
(``[R, 2]`` half-open ranges relative to the segment's first key row, canonical as in
:mod:`dcp_backend.masks`). Every query row belongs to exactly one segment; key rows may repeat across
segments only if the caller gathered them twice.

Kernels prepare per-segment data (masks, groups of equal-shape segments, block tables) once per work
object and keep it in ``kernel_state`` under their own key, so the preparation runs once per plan (in the
planning worker), not once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from dcp_backend.errors import CPError

# Segment kinds the CPU kernel specialises.
KIND_GENERAL = 0  # arbitrary ranges: an additive mask
KIND_FULL = 1  # every row sees every key of the segment
KIND_CAUSAL = 2  # square segment, row i sees keys [0, i+1)
KIND_CAUSAL_BR = 3  # q_len < k_len, row i sees keys [0, k_len - q_len + i + 1) (bottom-right causal)


@dataclass(eq=False)
class AttnWork:
    cu_q: np.ndarray
    cu_k: np.ndarray
    ranges: np.ndarray
    # Prepared state per block kernel, under the kernel's own key ("segments", "flex"); only the owner reads
    # or writes its entry (kernels/base.py, kernels/flex.py).
    kernel_state: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.cu_q = np.asarray(self.cu_q, dtype=np.int64)
        self.cu_k = np.asarray(self.cu_k, dtype=np.int64)
        self.ranges = np.asarray(self.ranges, dtype=np.int64)
        if self.cu_q.ndim != 1 or self.cu_q.shape != self.cu_k.shape or self.cu_q.size < 1:
            raise CPError("AttnWork: cu_q and cu_k must be 1-D of equal length >= 1")
        if self.ranges.ndim != 3 or self.ranges.shape[0] != self.total_q or self.ranges.shape[2] != 2:
            raise CPError(
                f"AttnWork: ranges must be [{self.total_q}, R, 2], got {tuple(self.ranges.shape)}"
            )

    @classmethod
    def empty(cls, num_ranges: int = 1) -> "AttnWork":
        z = np.zeros(1, dtype=np.int64)
        return cls(z, z.copy(), np.zeros((0, num_ranges, 2), dtype=np.int64))

    @classmethod
    def concat(cls, works: list["AttnWork"]) -> "AttnWork":
        """Segments of several works side by side (q and kv row offsets shift accordingly)."""
        works = [w for w in works if w.num_segments]
        if not works:
            return cls.empty()
        r = max(w.ranges.shape[1] for w in works)
        cu_q, cu_k, ranges = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], []
        qo = ko = 0
        for w in works:
            cu_q.append(w.cu_q[1:] + qo)
            cu_k.append(w.cu_k[1:] + ko)
            pad = np.zeros((w.total_q, r - w.ranges.shape[1], 2), np.int64)
            ranges.append(np.concatenate([w.ranges, pad], axis=1))
            qo += w.total_q
            ko += w.total_k
        return cls(np.concatenate(cu_q), np.concatenate(cu_k), np.concatenate(ranges))

    @property
    def num_segments(self) -> int:
        return int(self.cu_q.size - 1)

    @property
    def total_q(self) -> int:
        return int(self.cu_q[-1])

    @property
    def total_k(self) -> int:
        return int(self.cu_k[-1])

    @property
    def q_lens(self) -> np.ndarray:
        return np.diff(self.cu_q)

    @property
    def k_lens(self) -> np.ndarray:
        return np.diff(self.cu_k)

    @cached_property
    def row_visible(self) -> np.ndarray:
        """Visible keys of every query row (0: an empty row, whose output is 0 and lse -inf)."""
        return (self.ranges[..., 1] - self.ranges[..., 0]).sum(axis=1)

    def num_pairs(self) -> int:
        """Unmasked (query, key) pairs: the work this batch really does."""
        return int(self.row_visible.sum())

    def seg_ids(self) -> np.ndarray:
        """Segment index of every query row."""
        return np.repeat(np.arange(self.num_segments, dtype=np.int64), self.q_lens)

    def kinds(self) -> np.ndarray:
        """Per segment: KIND_FULL, KIND_CAUSAL or KIND_GENERAL (cached)."""
        return self._kinds

    @cached_property
    def _kinds(self) -> np.ndarray:
        return _classify(self)

    def validate(self) -> None:
        """Check every range lies inside its segment's keys (cheap; used by tests and debug)."""
        if self.total_q == 0:
            return
        klen = np.repeat(self.k_lens, self.q_lens)[:, None]
        s, e = self.ranges[..., 0], self.ranges[..., 1]
        if np.any(s < 0) or np.any(e > klen) or np.any((e < s)):
            raise CPError("AttnWork: a key range falls outside its segment")


def _classify(work: AttnWork) -> np.ndarray:
    n = work.num_segments
    kinds = np.full(n, KIND_GENERAL, dtype=np.int64)
    if work.total_q == 0:
        return kinds
    seg = work.seg_ids()
    klen_row = work.k_lens[seg]
    local_row = np.arange(work.total_q, dtype=np.int64) - work.cu_q[seg]
    first = work.ranges[:, 0, :]
    rest_empty = (
        np.all(work.ranges[:, 1:, 1] <= work.ranges[:, 1:, 0], axis=1)
        if work.ranges.shape[1] > 1
        else np.ones(work.total_q, bool)
    )
    qlen_row = work.q_lens[seg]
    full_row = (first[:, 0] == 0) & (first[:, 1] == klen_row) & rest_empty
    causal_row = (first[:, 0] == 0) & (first[:, 1] == local_row + 1 + klen_row - qlen_row) & rest_empty
    # Reduce row flags per segment (segments with zero q rows stay GENERAL and are skipped).
    nonempty = work.q_lens > 0
    starts = work.cu_q[:-1][nonempty]
    full_seg = np.zeros(n, bool)
    causal_seg = np.zeros(n, bool)
    full_seg[nonempty] = np.logical_and.reduceat(full_row, starts)
    causal_seg[nonempty] = np.logical_and.reduceat(causal_row, starts)
    causal_seg &= work.q_lens <= work.k_lens
    kinds[causal_seg & ~full_seg & (work.q_lens < work.k_lens)] = KIND_CAUSAL_BR
    kinds[causal_seg & ~full_seg & (work.q_lens == work.k_lens)] = KIND_CAUSAL
    kinds[full_seg] = KIND_FULL
    return kinds


def dense_visibility(work: AttnWork, seg: int) -> np.ndarray:
    """Boolean [q_len, k_len] visibility of one segment (for kernels that need a dense mask)."""
    q0, q1 = work.cu_q[seg], work.cu_q[seg + 1]
    klen = int(work.k_lens[seg])
    cols = np.arange(klen, dtype=np.int64)[None, None, :]
    r = work.ranges[q0:q1]
    return np.any((cols >= r[..., 0:1]) & (cols < r[..., 1:2]), axis=1)
