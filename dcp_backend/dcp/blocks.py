"""DCP blocks: token blocks, head blocks, and the computation blocks the mask leaves, with exact costs.

* A *token block* is ``block_size`` consecutive tokens of one document (the last block of a document
  may be shorter; nothing is padded). All data of a token block (q, k, v, out, lse for every head)
  stays on one device, so a rank owns whole tokens.
* A *head block* is ``head_block_size`` query heads and the KV heads they read (GQA: a KV head block
  serves ``q_per_kv`` query head blocks).
* A *block pair* ``(q token block i, kv token block j)`` of one document exists only if the mask leaves
  at least one (query, key) pair; ``pair_count`` is the exact number of unmasked pairs per head.
  A *computation block* is a block pair times a query head block (index ``pair * n_q + k``).

Pair counts are computed without any loop over tokens or block pairs: for every query block the row
key-range endpoints are sorted once and each key block's overlap is read off prefix sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dcp_backend.batch import PackedBatch, concat_aranges
from dcp_backend.dtypes import acc_element_size
from dcp_backend.masks import build_ranges
from dcp_backend.spec import AttentionSpec
from dcp_backend.errors import CPError


@dataclass(frozen=True)
class HeadBlocks:
    num_heads: int
    num_kv_heads: int
    hb: int  # query heads per head block
    khb: int  # KV heads per KV head block

    @classmethod
    def make(cls, spec: AttentionSpec, head_block_size: int | None) -> "HeadBlocks":
        g = spec.group_size
        hb = g if head_block_size is None else head_block_size
        if spec.num_heads % hb:
            raise CPError(
                f"dcp: head_block_size={hb} must divide num_heads={spec.num_heads}"
            )
        if hb <= g:
            if g % hb:
                raise CPError(
                    f"dcp: head_block_size={hb} must divide the query heads per KV head ({g}) or be a multiple "
                    "of it, so a head block reads whole KV heads"
                )
            khb = 1
        else:
            if hb % g:
                raise CPError(
                    f"dcp: head_block_size={hb} must be a multiple of the query heads per KV head ({g})"
                )
            khb = hb // g
        return cls(spec.num_heads, spec.num_kv_heads, hb, khb)

    @property
    def n_q_blocks(self) -> int:
        return self.num_heads // self.hb

    @property
    def n_kv_blocks(self) -> int:
        return self.num_kv_heads // self.khb

    @property
    def q_per_kv(self) -> int:
        """Query head blocks reading one KV head block."""
        return self.n_q_blocks // self.n_kv_blocks

    def kv_of_q(self, k):
        return np.asarray(k) // self.q_per_kv


@dataclass(eq=False)
class BlockSet:
    batch: PackedBatch
    spec: AttentionSpec
    block_size: int
    heads: HeadBlocks
    ranges: np.ndarray  # [T, R, 2] document-local key ranges of every token
    tb_doc: np.ndarray  # per token block
    tb_start: np.ndarray  # document-local
    tb_end: np.ndarray
    pair_q: np.ndarray  # per block pair: q token block
    pair_kv: np.ndarray  # kv token block
    pair_count: np.ndarray  # unmasked (query, key) pairs per head

    @property
    def n_tb(self) -> int:
        return int(self.tb_doc.size)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_q.size)

    @property
    def n_comp(self) -> int:
        return self.n_pairs * self.heads.n_q_blocks

    @cached_property
    def tb_tokens(self) -> np.ndarray:
        return self.tb_end - self.tb_start

    @cached_property
    def tb_global_start(self) -> np.ndarray:
        return self.batch.cu_seqlens[self.tb_doc] + self.tb_start

    def tb_global_indices(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.int64)
        return concat_aranges(self.tb_global_start[blocks], self.tb_tokens[blocks])

    @cached_property
    def token_block(self) -> np.ndarray:
        """Token block of every global token."""
        return np.repeat(np.arange(self.n_tb, dtype=np.int64), self.tb_tokens)

    # per-token byte sizes (element_size for q/k/v/out; lse is fp32)
    def q_bytes_per_token(self, e: int) -> int:
        return self.heads.hb * self.spec.head_dim * e

    def kv_bytes_per_token(self, e: int) -> int:
        return 2 * self.heads.khb * self.spec.head_dim * e

    def lse_bytes_per_token(self) -> int:
        return self.heads.hb * 4

    def comp_pair(self, comp: np.ndarray) -> np.ndarray:
        return np.asarray(comp) // self.heads.n_q_blocks

    def comp_head(self, comp: np.ndarray) -> np.ndarray:
        return np.asarray(comp) % self.heads.n_q_blocks


def block_bytes(bs: BlockSet, element_size: int = 2, partial_dtype: str = "fp32") -> dict:
    """Bytes of every input block and partial result, per pass, as the DCP executor sends them: q-side
    ids (tb * n_q + k) for "q_fwd" (q), "out_fwd" (out + lse), "q_bwd" (q, out, dout, lse), "dq"; kv ids
    (tb * n_kv + m) for "kv" (k + v, either pass), "dkv" (dk + dv). Partials (out, dq, dk, dv) at the
    accumulation size, or at ``element_size`` with ``partial_dtype="model"``; lse at 4 bytes."""
    tok = bs.tb_tokens.astype(np.float64)
    heads = bs.heads
    e = element_size
    part = e if partial_dtype == "model" else acc_element_size(e)
    q_el = heads.hb * bs.spec.head_dim  # elements per token of one query head block
    kv_el = 2 * heads.khb * bs.spec.head_dim  # k + v elements per token of one KV head block
    lse = bs.lse_bytes_per_token()
    q = lambda per_token: np.repeat(per_token * tok, heads.n_q_blocks)  # noqa: E731
    kv = lambda per_token: np.repeat(per_token * tok, heads.n_kv_blocks)  # noqa: E731
    return {"q_fwd": q(q_el * e), "out_fwd": q(q_el * part + lse), "q_bwd": q(3 * q_el * e + lse),
            "dq": q(q_el * part), "kv": kv(kv_el * e), "dkv": kv(kv_el * part)}


def token_blocks(batch: PackedBatch, block_size: int):
    """(doc, start, end) of every token block, documents in order."""
    nb = -(-batch.seqlens // block_size)
    doc = np.repeat(np.arange(batch.num_docs, dtype=np.int64), nb)
    first = np.concatenate([[0], np.cumsum(nb)[:-1]])
    j = np.arange(doc.size, dtype=np.int64) - first[doc]
    start = j * block_size
    end = np.minimum(start + block_size, batch.seqlens[doc])
    return doc, start, end


def count_block_pairs(ranges: np.ndarray, token_tb: np.ndarray, token_pos: np.ndarray, tb_doc: np.ndarray,
                      tb_start: np.ndarray, block_size: int, num_docs: int):
    """Unmasked pairs of every (q block, kv block) of the same document; returns nonzero pairs only."""
    n_tb = tb_doc.size
    # Candidate pairs: all block pairs inside each document.
    doc_first = np.searchsorted(tb_doc, np.arange(num_docs))
    doc_nb = np.bincount(tb_doc, minlength=num_docs)
    q_cand = np.repeat(np.arange(n_tb), doc_nb[tb_doc])
    kv_cand = concat_aranges(doc_first[tb_doc], doc_nb[tb_doc])
    a = tb_start[kv_cand]
    big = int(ranges.max(initial=0)) + 2 * block_size + 1
    group_end = np.cumsum(np.bincount(token_tb, minlength=n_tb))
    total = np.zeros(q_cand.size, dtype=np.int64)
    for r in range(ranges.shape[1]):
        for col, sign in ((1, 1), (0, -1)):
            x = ranges[:, r, col]
            keys = token_tb * big + x
            order = np.argsort(keys, kind="stable")
            ks = keys[order]
            prefix = np.concatenate([[0], np.cumsum(x[order])])
            base = q_cand * big
            lo = np.searchsorted(ks, base + a, side="right")
            mid = np.searchsorted(ks, base + a + block_size, side="left")
            hi = group_end[q_cand]
            g = (prefix[mid] - prefix[lo]) - a * (mid - lo) + block_size * (hi - mid)
            total += sign * g
    keep = total > 0
    return q_cand[keep], kv_cand[keep], total[keep]


def build_blocks(batch: PackedBatch, spec: AttentionSpec, block_size: int, head_block_size: int | None) -> BlockSet:
    heads = HeadBlocks.make(spec, head_block_size)
    ranges = build_ranges(batch, spec.mask, spec.mask_args)
    tb_doc, tb_start, tb_end = token_blocks(batch, block_size)
    token_tb = np.repeat(np.arange(tb_doc.size, dtype=np.int64), tb_end - tb_start)
    pq, pk, pc = count_block_pairs(ranges, token_tb, batch.positions, tb_doc, tb_start, block_size, batch.num_docs)
    return BlockSet(batch, spec, block_size, heads, ranges, tb_doc, tb_start, tb_end, pq, pk, pc)


def auto_block_size(batch: PackedBatch, num_devices: int, memory_imbalance: float, min_block: int = 16,
                    max_block: int = 8192) -> int:
    """Largest power of two whose token blocks can be spread over the devices within the memory tolerance.

    Start from the longest document (rounded up to a power of two) and halve while a largest-first
    greedy placement of the blocks leaves max/mean tokens above ``1 + memory_imbalance`` or there are
    fewer than two blocks per device. Bounded by [min_block, max_block]; never below 128 tokens when
    the batch has at least 256 tokens per device (smaller blocks multiply planning time and kernel calls
    for little balance gain: the dry-run sweep saw 10-48 s plans at 16-64 token blocks).
    """
    longest = int(batch.seqlens.max())
    b = 1 << max(0, int(np.ceil(np.log2(max(longest, 1)))))
    b = int(min(max(b, min_block), max_block))
    floor = max(min_block, 128) if batch.total_tokens >= 256 * num_devices else min_block
    floor = min(floor, max_block)
    while b > floor:
        _, s, e = token_blocks(batch, b)
        sizes = np.sort(e - s)[::-1]
        if sizes.size >= 2 * num_devices and _lpt_imbalance(sizes, num_devices) <= 1 + memory_imbalance:
            break
        b //= 2
    return max(b, floor)


def _lpt_imbalance(sizes_desc: np.ndarray, k: int) -> float:
    load = np.zeros(k)
    for s in sizes_desc:  # loop over blocks (not tokens); a few hundred at most in practice
        load[np.argmin(load)] += s
    return float(load.max() / load.mean()) if load.mean() > 0 else 1.0
