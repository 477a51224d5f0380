"""GPU block kernel on PyTorch FlexAttention: one kernel call per work (all segments at once).

All query rows of the work form one flex "sequence" against all key rows; ``mask_mod`` reads per-row
key ranges (already shifted to absolute key rows), so a row never sees another segment's keys. The
sparse :class:`BlockMask` is built from the ranges' 128x128 tile tables (``BlockMask.from_kv_blocks``),
never from a dense q x kv mask (``create_block_mask`` materialises one and runs out of memory at about
140K x 140K tokens). Lengths are padded to a few bucket sizes (padded rows see no key, padded keys are
never visible, so padded tiles cost nothing) and the kernel is compiled with dynamic shapes and a high
recompile limit, so new plans do not trigger recompilation storms or the slow eager fallback.

Backward recomputes the block forward under autograd and back-propagates
``grad_out = w * dout`` and ``grad_lse = w * (dout . out_b - dout . out)`` with ``w = exp(lse_b - lse)``:
this yields exactly the flash-attention block gradient ``P (dP - rowsum(dout * out))`` with the merged
``out``/``lse``, through FlexAttention's public autograd (which supports log-sum-exp gradients).

On CPU FlexAttention is inference-only; the forward runs there (eager) so the masks and tile tables are
tested without a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from dcp_backend.batch import concat_aranges
from dcp_backend.kernels.base import BlockKernel, acc_dtype
from dcp_backend.kernels.work import AttnWork

TILE = 128


def bucket(n: int, tile: int = TILE) -> int:
    """Padded length: a multiple of ``tile`` with at most 25% padding, from a small set of sizes (four
    per power of two), so compiled kernels see few distinct shapes across plans."""
    if n <= tile:
        return tile
    step = max(tile, (1 << (int(n).bit_length() - 1)) // 4)
    return -(-n // step) * step


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def tile_tables(work: AttnWork, tile: int = TILE, padded: tuple[int, int] | None = None):
    """Per (q tile, kv tile): visible pair counts -> (partial, full) kv tile lists for every q tile.

    Returns ``(kv_num, kv_idx, full_num, full_idx)`` as int32 numpy arrays shaped for
    ``BlockMask.from_kv_blocks`` (without the batch and head dims). ``padded`` = (q, kv) lengths the
    tables are sized for (extra tiles are empty; index widths are padded to a power of two).
    """
    tq, tk = work.total_q, work.total_k
    nq, nk = -(-tq // tile), -(-tk // tile)
    pq = -(-padded[0] // tile) if padded else nq
    seg = work.seg_ids()
    base = work.cu_k[seg][:, None]
    starts = work.ranges[..., 0] + base
    ends = work.ranges[..., 1] + base
    live = ends > starts
    rows = np.broadcast_to(np.arange(tq)[:, None], starts.shape)[live]
    s, e = starts[live], ends[live]
    t0, t1 = s // tile, (e - 1) // tile + 1
    counts = t1 - t0
    tiles = concat_aranges(t0, counts)
    rr = np.repeat(rows, counts)
    ss, ee = np.repeat(s, counts), np.repeat(e, counts)
    overlap = np.minimum(ee, (tiles + 1) * tile) - np.maximum(ss, tiles * tile)
    key = (rr // tile) * nk + tiles
    pairs = np.bincount(key, weights=overlap, minlength=nq * nk).reshape(nq, nk)
    q_rows_in_tile = np.minimum(tile, tq - np.arange(nq) * tile)
    k_cols_in_tile = np.minimum(tile, tk - np.arange(nk) * tile)
    full = (pairs == (q_rows_in_tile[:, None] * k_cols_in_tile[None, :])) & (q_rows_in_tile[:, None] == tile) & (
        k_cols_in_tile[None, :] == tile
    )
    partial = (pairs > 0) & ~full

    def pack(sel: np.ndarray):
        num = np.zeros(pq, dtype=np.int32)
        num[:nq] = sel.sum(1)
        width = max(1, int(num.max()) if num.size else 1)
        width = _pow2(width) if padded else width
        idx = np.zeros((pq, width), dtype=np.int32)
        order = np.argsort(~sel, axis=1, kind="stable")[:, :width]
        idx[:nq, :order.shape[1]] = order
        return num, idx

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    return kv_num, kv_idx, full_num, full_idx


class FlexKernel(BlockKernel):
    name = "flex"

    def __init__(self, compile: bool | None = None):
        self._compile = compile
        self._fn = None

    def supports(self, device, dtype):
        return device.type == "cuda"

    # -------------------------------------------------------------- preparation (once per work)
    def _prepared(self, work: AttnWork, device: torch.device):
        key = ("flex", str(device))
        if key in work._cache:
            return work._cache[key]
        from torch.nn.attention.flex_attention import BlockMask

        seg = work.seg_ids()
        base = work.cu_k[seg][:, None]
        pq, pk = bucket(work.total_q), bucket(work.total_k)
        padded_ranges = np.zeros((pq,) + work.ranges.shape[1:], dtype=np.int64)  # padded rows see nothing
        padded_ranges[: work.total_q] = work.ranges + base[..., None]
        starts = torch.from_numpy(padded_ranges[..., 0]).to(device=device, dtype=torch.int32)
        ends = torch.from_numpy(padded_ranges[..., 1]).to(device=device, dtype=torch.int32)
        nr = starts.shape[1]

        def mask_mod(b, h, q_idx, kv_idx):
            vis = (kv_idx >= starts[q_idx, 0]) & (kv_idx < ends[q_idx, 0])
            for r in range(1, nr):
                vis = vis | ((kv_idx >= starts[q_idx, r]) & (kv_idx < ends[q_idx, r]))
            return vis

        kv_num, kv_idx, full_num, full_idx = tile_tables(work, padded=(pq, pk))

        def t(x):
            return torch.from_numpy(x).to(device)[None, None]

        bm = BlockMask.from_kv_blocks(
            t(kv_num), t(kv_idx), t(full_num), t(full_idx), BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(pq, pk),
        )
        empty = torch.from_numpy(np.nonzero((work.ranges[..., 1] - work.ranges[..., 0]).sum(1) == 0)[0]).to(device)
        work._cache[key] = (bm, empty, pq, pk)
        return work._cache[key]

    def _flex(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        want_compile = self._compile if self._compile is not None else device.type == "cuda"
        if not want_compile:
            return flex_attention
        if self._fn is None:
            import torch._dynamo

            # Every plan has its own shapes and block masks; without a high limit compiled flex
            # silently falls back to a slow dense eager path after a few recompiles.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
            self._fn = torch.compile(flex_attention, dynamic=True)
        return self._fn

    def _call(self, q, k, v, prepared, scale):
        bm, _, pq, pk = prepared
        fn = self._flex(q.device)
        tq = q.shape[0]
        pad = torch.nn.functional.pad
        qq = pad(q, (0, 0, 0, 0, 0, pq - tq)).transpose(0, 1).unsqueeze(0)
        kk = pad(k, (0, 0, 0, 0, 0, pk - k.shape[0])).transpose(0, 1).unsqueeze(0)
        vv = pad(v, (0, 0, 0, 0, 0, pk - v.shape[0])).transpose(0, 1).unsqueeze(0)
        gqa = q.shape[1] != k.shape[1]
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            out, aux = fn(qq, kk, vv, block_mask=bm, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
            lse = aux.lse
        except ImportError:  # older torch
            out, lse = fn(qq, kk, vv, block_mask=bm, scale=scale, enable_gqa=gqa, return_lse=True)
        return out[0, :, :tq].transpose(0, 1), lse[0, :, :tq].transpose(0, 1)

    # -------------------------------------------------------------------------- kernel API
    def forward(self, q, k, v, work: AttnWork, scale: float):
        tq, h, d = q.shape
        acc = acc_dtype(q.dtype)
        if work.total_q == 0 or work.total_k == 0:
            return torch.zeros_like(q), torch.full((tq, h), float("-inf"), dtype=acc, device=q.device)
        prepared = self._prepared(work, q.device)
        empty = prepared[1]
        out, lse = self._call(q, k, v, prepared, scale)
        out, lse = out.contiguous(), lse.to(acc).contiguous()
        if empty.numel():
            out.index_fill_(0, empty, 0.0)
            lse.index_fill_(0, empty, float("-inf"))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, work: AttnWork, scale: float):
        acc = acc_dtype(q.dtype)
        if work.total_q == 0 or work.total_k == 0:
            return torch.zeros_like(q), torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(
                v.shape, dtype=acc, device=v.device
            )
        prepared = self._prepared(work, q.device)
        with torch.enable_grad():
            qg = q.detach().requires_grad_(True)
            kg = k.detach().requires_grad_(True)
            vg = v.detach().requires_grad_(True)
            out_b, lse_b = self._call(qg, kg, vg, prepared, scale)
            lse_f = lse.to(torch.float32)
            lse_bf = lse_b.float()
            finite = torch.isfinite(lse_bf) & torch.isfinite(lse_f)
            w = torch.where(finite, torch.exp(lse_bf - torch.where(finite, lse_f, torch.zeros_like(lse_f))),
                            torch.zeros_like(lse_bf))
            dout_f = dout.float()
            row_b = (dout_f * out_b.detach().float()).sum(-1)
            row = (dout_f * out.float()).sum(-1)
            grad_out = (w.unsqueeze(-1) * dout_f).to(out_b.dtype)
            grad_lse = (w * (row_b - row)).to(lse_b.dtype)
            dq, dk, dv = torch.autograd.grad((out_b, lse_b), (qg, kg, vg), (grad_out, grad_lse))
        return dq.to(q.dtype), dk.to(acc), dv.to(acc)
