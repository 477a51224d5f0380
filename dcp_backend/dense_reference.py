"""Single-process dense reference attention over a packed batch (for tests and debugging).

Builds the full ``[T, T]`` visibility from the mask ranges and document boundaries and runs plain
softmax attention, differentiable by autograd. Independent of the block kernels and of every backend;
use it at small sizes only (memory is O(T^2)).
"""
from __future__ import annotations

import numpy as np
import torch

from dcp_backend.batch import PackedBatch
from dcp_backend.masks import build_ranges
from dcp_backend.spec import AttentionSpec


def dense_visibility(seqlens, spec: AttentionSpec) -> np.ndarray:
    """Boolean ``[T, T]``: query row t may attend key column j."""
    batch = PackedBatch.from_seqlens(seqlens)
    ranges = build_ranges(batch, spec.mask, spec.mask_args)
    t = batch.total_tokens
    start = batch.cu_seqlens[batch.doc_ids]
    local = np.arange(t)[None, :] - start[:, None]  # key column relative to the query's document start
    vis = np.zeros((t, t), dtype=bool)
    for r in range(ranges.shape[1]):
        vis |= (local >= ranges[:, r, 0:1]) & (local < ranges[:, r, 1:2])
    return vis


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens, spec: AttentionSpec,
                    return_lse: bool = False):
    """``softmax(q k^T * scale + mask) v`` over a packed batch; q [T,H,D], k/v [T,Hkv,D]."""
    vis = torch.from_numpy(dense_visibility(seqlens, spec)).to(q.device)
    grp = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(grp, dim=1)
    vv = v.repeat_interleave(grp, dim=1)
    s = torch.einsum("thd,shd->hts", q, kk) * spec.scale
    s = s.masked_fill(~vis.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, T]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))
    out = torch.einsum("hts,shd->thd", p, vv)
    if return_lse:
        return out, lse.transpose(0, 1)
    return out
