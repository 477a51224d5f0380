"""The shared ring engine of ring, zigzag and LoongTrain: a double ring with a pluggable block kernel.

``C`` ring positions are cut into windows of ``w`` consecutive positions (``nw = C / w`` windows).
Position ``c = (win, j)`` (``win = c // w``, ``j = c % w``) holds at outer step ``o`` and inner step ``t``
the K/V block that started at position ``((win - o) % nw, (j - t) % w)``: the *inner ring* rotates a
block through the window, the *outer ring* hands each position the next window's block, its transfer
overlapped with the whole inner sweep. ``w = C`` is the plain single ring; LoongTrain uses ``w < C``.

Forward: every step launches the next transfer, computes local queries against the held block through
the block kernel, and merges (out, lse) by log-sum-exp. Backward: K/V travel the same way; the partial
dK/dV of a block travel with it (each step computes into a fresh partial, adds the accumulator that
arrived from the previous position and passes the sum on), so every block's gradient ends at its owner.
Every batch posts both sides of each exchange it takes part in, sends and receives between any two ranks
are posted in the same order on both sides (NCCL matches point-to-point messages in order), and tags
separate the four message kinds for gloo. The outer ring runs on its own process group when one is
given (:class:`RingGroups`), so its transfers overlap the inner sweep on a second NCCL communicator;
``dcp_backend.comm_order`` replays recorded traces under NCCL's ordering rules to check all of this.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dcp_backend.comm import CommCounters, Exchange
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels import BlockKernel, acc_dtype, merge_into_

TAG_KV_INNER, TAG_DKV_INNER, TAG_KV_OUTER, TAG_DKV_OUTER = 11, 12, 13, 14


@dataclass(frozen=True)
class RingGroups:
    """Process groups of the two rings: ``outer`` may be a second communicator over the same ranks as
    ``inner`` (a separate NCCL stream, so outer hand-offs overlap the inner sweep), or ``inner`` itself."""

    inner: object
    outer: object


@dataclass(frozen=True)
class RingGeometry:
    num_positions: int
    window: int
    position: int
    rank_of_position: tuple[int, ...]  # group rank of every ring position

    @property
    def num_windows(self) -> int:
        return self.num_positions // self.window

    def coords(self, c: int) -> tuple[int, int]:
        return c // self.window, c % self.window

    def at(self, win: int, j: int) -> int:
        return (win % self.num_windows) * self.window + (j % self.window)

    def source(self, o: int, t: int, c: int | None = None) -> int:
        """Ring position whose block position ``c`` (default: mine) holds at outer step o, inner step t."""
        win, j = self.coords(self.position if c is None else c)
        return self.at(win - o, j - t)

    def rank(self, c: int) -> int:
        return self.rank_of_position[c]

    @property
    def inner_next(self) -> int:
        win, j = self.coords(self.position)
        return self.rank(self.at(win, j + 1))

    @property
    def inner_prev(self) -> int:
        win, j = self.coords(self.position)
        return self.rank(self.at(win, j - 1))

    @property
    def outer_next(self) -> int:
        win, j = self.coords(self.position)
        return self.rank(self.at(win + 1, j))

    @property
    def outer_prev(self) -> int:
        win, j = self.coords(self.position)
        return self.rank(self.at(win - 1, j))


@dataclass(eq=False)
class RingRankWork:
    """Everything one position needs at run time; built once per plan (in the planning worker) and
    reused by every layer: the per-source attention work and its row tables packed for one upload."""

    geometry: RingGeometry
    works: dict  # source position -> PairWork
    tokens: np.ndarray  # tokens held by every position (receive-buffer sizes)
    tables: HostTables = field(init=False, repr=False)
    handles: dict = field(init=False, repr=False)  # source position -> [(q rows, kv rows) per round]

    def __post_init__(self) -> None:
        self.tables = HostTables(np.int64)
        self.handles = {src: [(self.tables.add(r.q_rows), self.tables.add(r.kv_rows)) for r in pw.rounds]
                        for src, pw in self.works.items()}
        self.tables.host  # pack now

    def prepare_kernel(self, kernel: BlockKernel) -> None:
        """Host-side kernel state of every round (e.g. flex tile tables), built ahead of the first call."""
        for pw in self.works.values():
            for rnd in pw.rounds:
                kernel.prepare(rnd.work)

    def rounds(self, src: int, device: torch.device):
        """[(round, q rows, kv rows)] of source position ``src``, the rows as tensors on ``device``."""
        views = self.tables.on(device)
        return [(rnd, views[hq], views[hk]) for rnd, (hq, hk) in zip(self.works[src].rounds, self.handles[src])]


def _block_buffer(n: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty((2, n, like.shape[-2], like.shape[-1]), dtype=dtype or like.dtype, device=like.device)


def ring_forward(q, k, v, rw: RingRankWork, kernel: BlockKernel, scale: float, groups: RingGroups,
                 counters: CommCounters | None = None):
    """Returns (out [T,H,D] in q.dtype, lse [T,H] in the accumulation dtype)."""
    geo = rw.geometry
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=acc, device=q.device)
    outer_block = torch.stack([k, v])
    for o in range(geo.num_windows):
        outer_x = None
        if o < geo.num_windows - 1:
            nxt = _block_buffer(int(rw.tokens[geo.source(o + 1, 0)]), k)
            outer_x = Exchange(groups.outer, "LoongTrain outer-ring K/V exchange", counters=counters)
            outer_x.send(outer_block, geo.outer_next, TAG_KV_OUTER)
            outer_x.recv(nxt, geo.outer_prev, TAG_KV_OUTER)
            outer_x.launch()
        cur = outer_block
        for t in range(geo.window):
            inner_x = None
            if t < geo.window - 1:
                nxt_in = _block_buffer(int(rw.tokens[geo.source(o, t + 1)]), k)
                inner_x = Exchange(groups.inner, "ring K/V exchange", counters=counters)
                inner_x.send(cur, geo.inner_next, TAG_KV_INNER)
                inner_x.recv(nxt_in, geo.inner_prev, TAG_KV_INNER)
                inner_x.launch()
            for rnd, qr, kr in rw.rounds(geo.source(o, t), q.device):
                o_b, l_b = kernel.forward(q.index_select(0, qr), cur[0].index_select(0, kr),
                                          cur[1].index_select(0, kr), rnd.work, scale)
                merge_into_(out, lse, o_b, l_b, rows=qr)
            if inner_x is not None:
                inner_x.wait()
                cur = nxt_in
        if outer_x is not None:
            outer_x.wait()
            outer_block = nxt
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, rw: RingRankWork, kernel: BlockKernel, scale: float, groups: RingGroups,
                  counters: CommCounters | None = None):
    """Returns (dq, dk, dv) in the input dtype; ``out``/``lse`` are the merged forward results.

    Every batch posts both sides of each exchange (NCCL may hold a send until the peer's matching receive
    runs, so a send-only batch whose receive comes in the peer's next batch deadlocks the ring): the
    dK/dV accumulator of the previous inner step travels in the next step's batch, the last one in a
    closing batch with the receive of the window's total, and the same for the outer ring.
    """
    geo = rw.geometry
    acc = acc_dtype(q.dtype)
    w, nw = geo.window, geo.num_windows
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    outer_block = torch.stack([k, v])
    outer_carry = None  # total of the previous window's outer block, still to be passed to outer_next
    for o in range(nw):
        start = Exchange(groups.outer, "outer-ring K/V and dK/dV exchange", counters=counters)
        outer_acc = None
        if o > 0:  # pass the previous total on; receive this step's outer block's accumulator
            start.send(outer_carry, geo.outer_next, TAG_DKV_OUTER)
            outer_acc = _block_buffer(int(rw.tokens[geo.source(o, 0)]), k, acc)
            start.recv(outer_acc, geo.outer_prev, TAG_DKV_OUTER)
        if o < nw - 1:
            nxt = _block_buffer(int(rw.tokens[geo.source(o + 1, 0)]), k)
            start.send(outer_block, geo.outer_next, TAG_KV_OUTER)
            start.recv(nxt, geo.outer_prev, TAG_KV_OUTER)
        start.launch()
        cur = outer_block
        carry = None  # dK/dV accumulator of the block held at the previous inner step
        for t in range(w):
            step = Exchange(groups.inner, "ring K/V and dK/dV exchange", counters=counters)
            inner_acc = None
            if t > 0:
                step.send(carry, geo.inner_next, TAG_DKV_INNER)
                inner_acc = _block_buffer(int(rw.tokens[geo.source(o, t)]), k, acc)
                step.recv(inner_acc, geo.inner_prev, TAG_DKV_INNER)
            if t < w - 1:
                nxt_in = _block_buffer(int(rw.tokens[geo.source(o, t + 1)]), k)
                step.send(cur, geo.inner_next, TAG_KV_INNER)
                step.recv(nxt_in, geo.inner_prev, TAG_KV_INNER)
            step.launch()
            partial = torch.zeros((2,) + tuple(cur.shape[1:]), dtype=acc, device=q.device)
            for rnd, qr, kr in rw.rounds(geo.source(o, t), q.device):
                dq_b, dk_b, dv_b = kernel.backward(
                    dout.index_select(0, qr), q.index_select(0, qr), cur[0].index_select(0, kr),
                    cur[1].index_select(0, kr), out.index_select(0, qr), lse.index_select(0, qr), rnd.work, scale,
                )
                dq.index_add_(0, qr, dq_b.to(acc))
                partial[0].index_add_(0, kr, dk_b)
                partial[1].index_add_(0, kr, dv_b)
            step.wait()
            if inner_acc is not None:
                partial += inner_acc
            carry = partial
            if t < w - 1:
                cur = nxt_in
        if w > 1:  # the last accumulator goes on; the window's total of my outer block comes back
            window_total = _block_buffer(int(rw.tokens[geo.source(o, 0)]), k, acc)
            fin = Exchange(groups.inner, "ring dK/dV exchange", counters=counters)
            fin.send(carry, geo.inner_next, TAG_DKV_INNER)
            fin.recv(window_total, geo.inner_prev, TAG_DKV_INNER)
            fin.launch().wait()
        else:
            window_total = carry
        start.wait()
        if outer_acc is not None:
            window_total = window_total + outer_acc
        outer_carry = window_total
        if o < nw - 1:
            outer_block = nxt
    if nw > 1:  # the last window total goes on; my own block's total comes back
        own_dkv = _block_buffer(int(rw.tokens[geo.position]), k, acc)
        fin = Exchange(groups.outer, "outer-ring dK/dV exchange", counters=counters)
        fin.send(outer_carry, geo.outer_next, TAG_DKV_OUTER)
        fin.recv(own_dkv, geo.outer_prev, TAG_DKV_OUTER)
        fin.launch().wait()
    else:
        own_dkv = outer_carry
    return dq.to(q.dtype), own_dkv[0].to(k.dtype), own_dkv[1].to(v.dtype)


class RingAttentionFn(torch.autograd.Function):
    """Differentiable ring attention for one rank (wraps :func:`ring_forward` / :func:`ring_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, rw, kernel, scale, groups, counters):
        with torch.no_grad():
            out, lse = ring_forward(q, k, v, rw, kernel, scale, groups, counters)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rw, ctx.kernel, ctx.scale, ctx.groups, ctx.counters = rw, kernel, scale, groups, counters
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.rw, ctx.kernel, ctx.scale,
                                       ctx.groups, ctx.counters)
        return dq, dk, dv, None, None, None, None, None
