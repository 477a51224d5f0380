"""Static token layouts of the ring-family baselines and the attention work between two ranks.

A layout gives every *ring position* a list of chunks ``(doc, start, end)`` (document-local, sorted by
document then start). A position stores its chunks back to back, so the rows of one document are
contiguous in its buffer. Layouts:

* ``contiguous`` (ring): document split into N near-equal parts, position p keeps part p;
* ``zigzag``: document split into 2N parts, position p keeps parts p and 2N-1-p (balanced causal work).

Documents shorter than the number of parts give empty parts (any length is valid). `pair_work`
computes, for the q rows of one position against the kv rows of another, one attention segment per
(query chunk, key chunk) pair of a document that has at least one unmasked pair, in rounds whose query
rows are distinct; fully masked chunk pairs are skipped.
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
class Round:
    """One kernel call: segments (query chunk x key chunk) whose query rows are all distinct."""

    work: AttnWork
    q_rows: np.ndarray  # rows of dst's buffer, in segment order
    kv_rows: np.ndarray  # rows of src's buffer, in segment order


@dataclass(eq=False)
class PairWork:
    """Attention of position ``dst``'s queries against position ``src``'s keys, as rounds.

    Every segment pairs one query chunk with one key chunk of the same document, so under the usual
    masks it is fully visible, square causal, or skipped (a kernel never computes masked-out chunk
    pairs); round ``c`` holds the pairs with the source's ``c``-th chunk of each document.
    """

    rounds: list
    pairs: int

    @property
    def empty(self) -> bool:
        return not self.rounds


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
            return PairWork([], 0)
        # The source's chunks of each document are adjacent: first/last chunk index per document.
        k_first = np.searchsorted(k_doc, q_doc)
        k_last = np.searchsorted(k_doc, q_doc, side="right")
        q_len = q_end - q_start
        q_rows_all = concat_aranges(q_off, q_len)
        ranges = self.ranges[self._indices(dst)[q_rows_all]]  # [rows, R, 2] document-local
        row_chunk = np.repeat(np.arange(q_doc.size), q_len)
        rounds, total = [], 0
        for c in range(int((k_last - k_first).max(initial=0))):
            ci = k_first + c
            has = ci < k_last  # query chunks whose document has a c-th source chunk
            ci = np.where(has, ci, 0)
            cs = k_start[ci][row_chunk][:, None]
            ce = k_end[ci][row_chunk][:, None]
            s = np.maximum(ranges[..., 0], cs)
            e = np.minimum(ranges[..., 1], ce)
            live = (e > s) & has[row_chunk][:, None]
            local = np.stack([np.where(live, s - cs, 0), np.where(live, e - cs, 0)], -1)
            counts = (local[..., 1] - local[..., 0]).sum(axis=1)
            pairs = np.bincount(row_chunk, weights=counts, minlength=q_doc.size).astype(np.int64)
            keep = pairs > 0
            if not keep.any():
                continue
            keep_row = keep[row_chunk]
            kl = (k_end - k_start)[ci][keep]
            work = AttnWork(np.concatenate([[0], np.cumsum(q_len[keep])]), np.concatenate([[0], np.cumsum(kl)]),
                            _compact(local[keep_row]))
            rounds.append(Round(work, q_rows_all[keep_row], concat_aranges(k_off[ci][keep], kl)))
            total += int(pairs.sum())
        return PairWork(rounds, total)


def _compact(ranges: np.ndarray) -> np.ndarray:
    """Move empty ranges last and drop range columns that are empty in every row."""
    empty = ranges[..., 1] <= ranges[..., 0]
    order = np.argsort(empty, axis=1, kind="stable")
    ranges = np.take_along_axis(ranges, order[..., None], axis=1)
    width = max(1, int((~empty).sum(axis=1).max())) if ranges.shape[0] else 1
    return ranges[:, :width]
