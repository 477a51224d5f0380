"""Static token layouts of the ring-family baselines and the attention work between two ranks.

A layout gives every *ring position* a list of chunks ``(doc, start, end)`` (document-local, sorted by
document then start). A position stores its chunks back to back, so the rows of one document are
contiguous in its buffer. Layouts:

* ``contiguous`` (ring): document split into N near-equal parts, position p keeps part p;
* ``zigzag``: document split into 2N parts, position p keeps parts p and 2N-1-p (balanced causal work).

Documents shorter than the number of parts give empty parts (any length is valid). `pair_work`
computes, for the q rows of one position against the kv rows of another, one attention segment per
document that has at least one unmasked pair, with key ranges mapped into the source's buffer; fully
masked document pairs are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dcp_backend.batch import PackedBatch, concat_aranges
from dcp_backend.kernels.work import AttnWork
from dcp_backend.masks import build_ranges


@dataclass(frozen=True, eq=False)
class ChunkLayout:
    """Chunks per ring position: arrays of equal length, sorted by (position, doc, start)."""

    batch: PackedBatch
    num_positions: int
    pos: np.ndarray  # ring position owning the chunk
    doc: np.ndarray
    start: np.ndarray  # document-local [start, end)
    end: np.ndarray

    @cached_property
    def tokens_per_position(self) -> np.ndarray:
        return np.bincount(self.pos, weights=self.end - self.start, minlength=self.num_positions).astype(np.int64)

    @cached_property
    def offset(self) -> np.ndarray:
        """Offset of each chunk in its position's buffer."""
        lens = self.end - self.start
        before = np.concatenate([[0], np.cumsum(lens)[:-1]])
        pos_start = np.concatenate([[0], np.cumsum(self.tokens_per_position)[:-1]])
        return before - pos_start[self.pos]

    def chunks_of(self, p: int) -> slice:
        lo, hi = np.searchsorted(self.pos, [p, p + 1])
        return slice(int(lo), int(hi))

    def global_indices(self, p: int) -> np.ndarray:
        """Global packed-token indices of position ``p``, in buffer order."""
        s = self.chunks_of(p)
        cu = self.batch.cu_seqlens
        return concat_aranges(cu[self.doc[s]] + self.start[s], self.end[s] - self.start[s])


def _layout(batch: PackedBatch, num_positions: int, parts_per_doc: int, owner_parts) -> ChunkLayout:
    """Split each document into ``parts_per_doc`` near-equal parts; ``owner_parts[p]`` = parts of p."""
    lens = batch.seqlens
    k = np.arange(parts_per_doc + 1)
    bounds = (lens[:, None] * k[None, :]) // parts_per_doc  # [docs, parts+1]
    pos, doc, start, end = [], [], [], []
    for p in range(num_positions):
        for part in owner_parts[p]:
            pos.append(np.full(batch.num_docs, p))
            doc.append(np.arange(batch.num_docs))
            start.append(bounds[:, part])
            end.append(bounds[:, part + 1])
    pos, doc, start, end = (np.concatenate(x).astype(np.int64) for x in (pos, doc, start, end))
    keep = end > start
    pos, doc, start, end = pos[keep], doc[keep], start[keep], end[keep]
    order = np.lexsort((start, doc, pos))
    return ChunkLayout(batch, num_positions, pos[order], doc[order], start[order], end[order])


def contiguous_layout(batch: PackedBatch, n: int) -> ChunkLayout:
    return _layout(batch, n, n, [[p] for p in range(n)])


def zigzag_layout(batch: PackedBatch, n: int) -> ChunkLayout:
    return _layout(batch, n, 2 * n, [[p, 2 * n - 1 - p] for p in range(n)])


@dataclass(eq=False)
class PairWork:
    """Attention of position ``dst``'s queries against position ``src``'s keys."""

    work: AttnWork
    q_rows: np.ndarray  # rows of dst's buffer, in segment order
    kv_rows: np.ndarray  # rows of src's buffer, in segment order
    pairs: int

    @property
    def empty(self) -> bool:
        return self.work.num_segments == 0


class PairWorkBuilder:
    """Builds :class:`PairWork` for any (dst, src) of a layout under a mask (ranges computed once)."""

    def __init__(self, layout: ChunkLayout, mask: str, mask_args):
        self.layout = layout
        self.batch = layout.batch
        self.ranges = build_ranges(self.batch, mask, mask_args)  # per global token, document-local
        self._index_cache: dict[int, np.ndarray] = {}

    def _indices(self, p: int) -> np.ndarray:
        if p not in self._index_cache:
            self._index_cache[p] = self.layout.global_indices(p)
        return self._index_cache[p]

    def build(self, dst: int, src: int) -> PairWork:
        lay = self.layout
        qs, ks = lay.chunks_of(dst), lay.chunks_of(src)
        q_doc, q_start, q_end, q_off = lay.doc[qs], lay.start[qs], lay.end[qs], lay.offset[qs]
        k_doc, k_start, k_end, k_off = lay.doc[ks], lay.start[ks], lay.end[ks], lay.offset[ks]
        if q_doc.size == 0 or k_doc.size == 0:
            return PairWork(AttnWork.empty(), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        # Rows of each document in the two buffers (chunks of a document are adjacent).
        docs = np.intersect1d(q_doc, k_doc)
        if docs.size == 0:
            return PairWork(AttnWork.empty(), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        qd_first = np.searchsorted(q_doc, docs)
        qd_last = np.searchsorted(q_doc, docs, side="right")
        kd_first = np.searchsorted(k_doc, docs)
        kd_last = np.searchsorted(k_doc, docs, side="right")
        q_len_doc = _seg_sum(q_end - q_start, qd_first, qd_last)
        k_len_doc = _seg_sum(k_end - k_start, kd_first, kd_last)
        q_row0 = q_off[qd_first]
        k_row0 = k_off[kd_first]
        # Query rows of dst that belong to these docs, with their document-local ranges.
        q_rows = concat_aranges(q_row0, q_len_doc)
        gidx = self._indices(dst)[q_rows]
        ranges = self.ranges[gidx]  # [n, R, 2] document-local
        row_doc_slot = np.repeat(np.arange(docs.size), q_len_doc)
        # Map each range onto the source's chunks of that document (at most `kmax` chunks per doc).
        kmax = int((kd_last - kd_first).max())
        pieces = []
        for c in range(kmax):
            ci = kd_first + c
            valid = ci < kd_last
            ci = np.where(valid, ci, kd_first)
            cs = np.where(valid, k_start[ci], 0)[row_doc_slot][:, None]
            ce = np.where(valid, k_end[ci], 0)[row_doc_slot][:, None]
            # position of this chunk inside the concatenation of the doc's kv chunks
            base = (k_off[ci] - k_row0)[row_doc_slot][:, None]
            s = np.maximum(ranges[..., 0], cs)
            e = np.minimum(ranges[..., 1], ce)
            live = e > s
            pieces.append(np.stack([np.where(live, s - cs + base, 0), np.where(live, e - cs + base, 0)], -1))
        local = np.concatenate(pieces, axis=1)  # sorted by chunk start, so sorted and disjoint
        counts = (local[..., 1] - local[..., 0]).sum(axis=1)
        pairs_doc = np.bincount(row_doc_slot, weights=counts, minlength=docs.size).astype(np.int64)
        keep_doc = pairs_doc > 0
        if not keep_doc.any():
            return PairWork(AttnWork.empty(), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        keep_row = keep_doc[row_doc_slot]
        local = _compact(local[keep_row])
        q_rows = q_rows[keep_row]
        ql, kl = q_len_doc[keep_doc], k_len_doc[keep_doc]
        cu_q = np.concatenate([[0], np.cumsum(ql)])
        cu_k = np.concatenate([[0], np.cumsum(kl)])
        kv_rows = concat_aranges(k_row0[keep_doc], kl)
        return PairWork(AttnWork(cu_q, cu_k, local), q_rows, kv_rows, int(pairs_doc.sum()))


def _seg_sum(values: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    cs = np.concatenate([[0], np.cumsum(values)])
    return cs[last] - cs[first]


def _compact(ranges: np.ndarray) -> np.ndarray:
    """Move empty ranges last and drop range columns that are empty in every row."""
    empty = ranges[..., 1] <= ranges[..., 0]
    order = np.argsort(empty, axis=1, kind="stable")
    ranges = np.take_along_axis(ranges, order[..., None], axis=1)
    width = max(1, int((~empty).sum(axis=1).max())) if ranges.shape[0] else 1
    return ranges[:, :width]
