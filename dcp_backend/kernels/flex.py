"""GPU block kernel on PyTorch FlexAttention: one kernel call per work (all segments at once).

All query rows of the work form one flex "sequence" against all key rows; ``mask_mod`` reads per-row
key ranges (already shifted to absolute key rows), so a row never sees another segment's keys. The
sparse :class:`BlockMask` is built from the ranges' 128x128 tile tables, never from a dense q x kv mask
(``create_block_mask`` materialises one and runs out of memory at about 140K x 140K tokens).

Tables follow torch's BlockMask convention: ``kv_indices`` is ``[q tiles, kv tiles]`` (every row as wide
as the number of kv tiles, the first ``kv_num[i]`` entries valid) and ``q_indices`` its transpose
``[kv tiles, q tiles]`` (read by the backward kernel). Both directions, partial and full tiles, the key
ranges and the empty rows are computed on the host by :func:`flex_host_tables` (in the planning
workers, through :meth:`FlexKernel.prepare`) and uploaded once per work as one int32 buffer.

Lengths are padded to a few bucket sizes (padded rows see no key, padded keys are never visible, so
padded tiles cost nothing). On CUDA the kernel is ``torch.compile(flex_attention, dynamic=True,
fullgraph=True)`` with a high recompile limit: a graph break raises instead of silently running the
dense eager path, and new plans do not exhaust the recompile budget.

Backward recomputes the block forward under autograd and back-propagates
``grad_out = w * dout`` and ``grad_lse = w * (dout . out_b - dout . out)`` with ``w = exp(lse_b - lse)``:
this yields exactly the flash-attention block gradient ``P (dP - rowsum(dout * out))`` with the merged
``out``/``lse``, through FlexAttention's public autograd (which supports log-sum-exp gradients). The
recompute costs one extra block forward per backward (:attr:`FlexKernel.backward_recompute`, counted by
``tools/bench_attention.py`` as executed FLOPs).

On CPU FlexAttention has no backward; its forward runs eagerly (a dense masked softmax), which is how
the masks and tables are tested without a GPU. :meth:`FlexKernel.backward` on CPU raises a
:class:`~dcp_backend.spec.CPError` saying so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dcp_backend.batch import concat_aranges
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels.base import BlockKernel, acc_dtype
from dcp_backend.kernels.work import AttnWork
from dcp_backend.errors import CPError

TILE = 128
RECOMPILE_LIMIT = 1024


def bucket(n: int, tile: int = TILE) -> int:
    """Padded length: a multiple of ``tile`` with at most 25% padding, from a small set of sizes (four
    per power of two), so compiled kernels see few distinct shapes across plans."""
    if n <= tile:
        return tile
    step = max(tile, (1 << (int(n).bit_length() - 1)) // 4)
    return -(-n // step) * step


def tile_pairs(work: AttnWork, tile: int = TILE, padded: tuple[int, int] | None = None) -> np.ndarray:
    """Visible (query, key) pairs of every (q tile, kv tile) of the work's absolute key rows; the grid
    covers ``padded`` lengths when given (tiles of padding hold no pair)."""
    tq, tk = work.total_q, work.total_k
    pq, pk = padded if padded else (tq, tk)
    nq, nk = -(-pq // tile), -(-pk // tile)
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
    return np.bincount(key, weights=overlap, minlength=nq * nk).reshape(nq, nk)


def _ordered(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean [rows, cols] -> (count per row, column indices of the selected entries first, as wide as
    the number of columns): torch's ordered BlockMask format."""
    num = sel.sum(1).astype(np.int32)
    idx = np.argsort(~sel, axis=1, kind="stable").astype(np.int32)
    return num, idx


def tile_tables(work: AttnWork, tile: int = TILE, padded: tuple[int, int] | None = None):
    """Per q tile: the partial and the full kv tiles, in torch's BlockMask format.

    Returns ``(kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx)`` as int32
    arrays (without batch and head dims). ``kv_idx`` is ``[q tiles, kv tiles]``, ``q_idx`` its transpose
    ``[kv tiles, q tiles]``. A tile is full when all its ``tile x tile`` pairs are visible (so tiles with
    padding or a partial edge are never full), partial when some are.
    """
    tq, tk = work.total_q, work.total_k
    pq, pk = padded if padded else (tq, tk)
    pairs = tile_pairs(work, tile, (pq, pk))
    full = pairs == tile * tile
    partial = (pairs > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    q_num, q_idx = _ordered(partial.T)
    full_q_num, full_q_idx = _ordered(full.T)
    return kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx


TABLE_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
               "q_indices", "full_q_num_blocks", "full_q_indices")


@dataclass(eq=False)
class FlexHostTables:
    """Everything a work needs on the device, on the host: padded lengths and one int32 buffer with the
    key ranges (absolute key rows, ``[padded q, R]``), the eight tile tables and the empty rows."""

    padded_q: int
    padded_k: int
    num_ranges: int
    tables: HostTables
    handles: dict


@dataclass(eq=False)
class FlexState:
    """The flex kernel's entry of ``AttnWork.kernel_state``: host tables, and per device the BlockMask."""

    host: FlexHostTables
    on_device: dict = field(default_factory=dict)


def flex_host_tables(work: AttnWork) -> FlexHostTables:
    pq, pk = bucket(work.total_q), bucket(work.total_k)
    seg = work.seg_ids()
    base = work.cu_k[seg][:, None]
    r = work.ranges.shape[1]
    starts = np.zeros((pq, r), dtype=np.int64)  # padded rows see nothing: [0, 0)
    ends = np.zeros((pq, r), dtype=np.int64)
    starts[: work.total_q] = work.ranges[..., 0] + base
    ends[: work.total_q] = work.ranges[..., 1] + base
    empty = np.nonzero(work.row_visible == 0)[0]
    tables = HostTables(np.int32)
    handles = {"starts": tables.add(starts), "ends": tables.add(ends), "empty": tables.add(empty)}
    for name, t in zip(TABLE_NAMES, tile_tables(work, TILE, (pq, pk))):
        handles[name] = tables.add(t[None, None])  # [batch 1, heads 1, ...]
    tables.host  # pack now (in the planning worker)
    return FlexHostTables(pq, pk, r, tables, handles)


def _block_mask(host: FlexHostTables, device: torch.device):
    """(BlockMask, empty rows as int64) on ``device`` from the uploaded tables."""
    from torch.nn.attention.flex_attention import BlockMask

    views = host.tables.on(device)
    h = host.handles
    starts, ends = views[h["starts"]], views[h["ends"]]
    nr = host.num_ranges

    def mask_mod(b, hd, q_idx, kv_idx):
        vis = (kv_idx >= starts[q_idx, 0]) & (kv_idx < ends[q_idx, 0])
        for j in range(1, nr):
            vis = vis | ((kv_idx >= starts[q_idx, j]) & (kv_idx < ends[q_idx, j]))
        return vis

    t = {name: views[h[name]] for name in TABLE_NAMES}
    try:
        bm = BlockMask(seq_lengths=(host.padded_q, host.padded_k), **t, BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod)
    except TypeError:  # a torch whose constructor differs: let it transpose the kv tables itself
        bm = BlockMask.from_kv_blocks(t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"],
                                      t["full_kv_indices"], BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                      seq_lengths=(host.padded_q, host.padded_k))
    return bm, views[h["empty"]].long()


class FlexKernel(BlockKernel):
    name = "flex"
    backward_recompute = 1.0  # one block forward recomputed per block backward

    def __init__(self, compile: bool | None = None):
        self._compile = compile
        self._fn = None

    def supports(self, device, dtype):
        return device.type == "cuda"

    # -------------------------------------------------------------- preparation (once per work)
    def prepare(self, work: AttnWork) -> FlexHostTables:
        """Host tables of ``work`` (its ``kernel_state["flex"]``; planning workers call this through
        ``Plan.prepare``)."""
        state = work.kernel_state.get("flex")
        if state is None:
            state = work.kernel_state["flex"] = FlexState(flex_host_tables(work))
        return state.host

    def _prepared(self, work: AttnWork, device: torch.device):
        self.prepare(work)
        state = work.kernel_state["flex"]
        key = str(device)
        if key not in state.on_device:
            host = state.host
            bm, empty = _block_mask(host, device)
            state.on_device[key] = (bm, empty, host.padded_q, host.padded_k)
        return state.on_device[key]

    def _flex(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        want_compile = self._compile if self._compile is not None else device.type == "cuda"
        if not want_compile:
            return flex_attention
        if self._fn is None:
            import torch._dynamo

            # Every plan has its own shapes and block masks; without a high limit compiled flex falls back
            # to a slow dense eager path after a few recompiles.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            # fullgraph: a graph break raises instead of silently running the dense eager path.
            self._fn = torch.compile(flex_attention, dynamic=True, fullgraph=True)
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
        # q, k, v share a dtype here; older torch versions have no autocast rule for flex, so it must not
        # re-cast them inside the call.
        with torch.autocast(device_type=q.device.type, enabled=False):
            try:
                from torch.nn.attention.flex_attention import AuxRequest

                out, aux = fn(qq, kk, vv, block_mask=bm, scale=scale, enable_gqa=gqa,
                              return_aux=AuxRequest(lse=True))
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
        if q.device.type == "cpu":
            raise CPError(
                "kernel 'flex': PyTorch's FlexAttention has no backward on CPU (its CPU path is forward-only); "
                "train on CPU with kernel='auto' or 'cpu_flash', and use 'flex' on CUDA"
            )
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
