"""`loongtrain`: 2D attention = head-parallel all-to-all (degree ``head_parallel``) x double ring.

Ranks form head groups of ``hp`` consecutive ranks (one ring position each). The all-to-all inside a
head group turns "my tokens, all heads" into "the position's tokens, my heads" (Q heads split; KV heads
split, or replicated when there are fewer KV heads than ``hp``). The context ring over the ``C = N/hp``
positions is the zigzag layout run as a double ring: an inner ring inside windows of ``window``
positions and an outer ring between windows, overlapped with the inner sweep. A second all-to-all
returns the output to token sharding. Backward mirrors it (autograd through both all-to-alls).

Options: ``head_parallel`` (default: gcd(world size, num_kv_heads)), ``window`` (default: the ring
positions of one node, i.e. devices_per_node / head_parallel, when it divides C; else C),
``devices_per_node``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.ring_core import RingAttentionFn
from dcp_backend.baselines.ring_family import RingFamilyBackend, RingFamilyOptions, RingFamilyPlan, check_topology
from dcp_backend.comm import Exchange
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels import get_kernel
from dcp_backend.errors import CPError

TAG_A2A = 21


@dataclass(frozen=True)
class LoongTrainOptions(RingFamilyOptions):
    head_parallel: int | None = None
    window: int | None = None

    def validate(self) -> None:
        super().validate()
        for name in ("head_parallel", "window"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise CPError(f"loongtrain option {name} must be a positive int, got {v!r}")


class HeadSplit(list):
    """Heads each head slot receives (a list per slot: a split, or replication when num_heads < hp), with
    the same lists as index tensors uploaded once per device (the backward scatters by them every layer)."""

    def __init__(self, num_heads: int, hp: int):
        if num_heads >= hp:
            per = num_heads // hp
            super().__init__(list(range(s * per, (s + 1) * per)) for s in range(hp))
        else:
            super().__init__([s * num_heads // hp] for s in range(hp))
        self.tables = HostTables(np.int64)
        for heads in self:
            self.tables.add(heads)

    def on(self, device) -> list[torch.Tensor]:
        return self.tables.on(device)


@functools.lru_cache(maxsize=64)
def _head_index(num_heads: int, hp: int) -> HeadSplit:
    return HeadSplit(num_heads, hp)


def _exchange(parts_out: list[torch.Tensor | None], shapes_in: list[tuple], slot: int, ranks: list[int], group,
              counters, like: torch.Tensor) -> list[torch.Tensor]:
    """Send parts_out[p] to head slot p and receive a tensor of shapes_in[p] from it (p != slot)."""
    x = Exchange(group, "LoongTrain head all-to-all", counters=counters)
    recv = []
    for p, shape in enumerate(shapes_in):
        if p == slot:
            recv.append(None)
            continue
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        x.send(parts_out[p], ranks[p], TAG_A2A)
        x.recv(buf, ranks[p], TAG_A2A)
        recv.append(buf)
    x.launch().wait()
    return recv


class _SeqToHeads(torch.autograd.Function):
    """[my tokens, all heads] -> [position tokens, my heads]; ``heads[p]`` are the heads slot p gets."""

    @staticmethod
    def forward(ctx, x, heads, slot, counts, ranks, group, counters):
        ctx.meta = (heads, slot, counts, ranks, group, counters, x.shape[1])
        hx, d = len(heads[slot]), x.shape[2]
        index = heads.on(x.device)
        outs = [x.index_select(1, index[p]) for p in range(len(heads))]
        got = _exchange(outs, [(counts[p], hx, d) for p in range(len(heads))], slot, ranks, group, counters, x)
        got[slot] = outs[slot]
        return torch.cat(got, dim=0)

    @staticmethod
    def backward(ctx, g):
        heads, slot, counts, ranks, group, counters, nh = ctx.meta
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
        parts = [g[offs[p]:offs[p + 1]].contiguous() for p in range(len(heads))]
        mine = counts[slot]
        got = _exchange(parts, [(mine, len(heads[p]), g.shape[2]) for p in range(len(heads))], slot, ranks, group,
                        counters, g)
        got[slot] = parts[slot]
        gx = torch.zeros((mine, nh, g.shape[2]), dtype=g.dtype, device=g.device)
        index = heads.on(g.device)
        for p, part in enumerate(got):  # index_add sums replicated KV heads
            gx.index_add_(1, index[p], part)
        return gx, None, None, None, None, None, None


class _HeadsToSeq(torch.autograd.Function):
    """[position tokens, my heads] -> [my tokens, all heads] (query heads are split, never replicated)."""

    @staticmethod
    def forward(ctx, y, heads, slot, counts, ranks, group, counters):
        ctx.meta = (heads, slot, counts, ranks, group, counters)
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
        parts = [y[offs[p]:offs[p + 1]].contiguous() for p in range(len(heads))]
        mine = counts[slot]
        got = _exchange(parts, [(mine, len(heads[p]), y.shape[2]) for p in range(len(heads))], slot, ranks, group,
                        counters, y)
        got[slot] = parts[slot]
        return torch.cat(got, dim=1)

    @staticmethod
    def backward(ctx, g):
        heads, slot, counts, ranks, group, counters = ctx.meta
        hx = len(heads[slot])
        index = heads.on(g.device)
        outs = [g.index_select(1, index[p]) for p in range(len(heads))]
        got = _exchange(outs, [(counts[p], hx, g.shape[2]) for p in range(len(heads))], slot, ranks, group,
                        counters, g)
        got[slot] = outs[slot]
        return torch.cat(got, dim=0), None, None, None, None, None, None


class LoongTrainBackend(RingFamilyBackend):
    name = "loongtrain"
    Options = LoongTrainOptions

    def resolve(self, spec, world_size: int) -> tuple[int, int]:
        """(head_parallel, window) for this spec and world size, validated."""
        o = self.options
        dpn = check_topology(world_size, o.devices_per_node)
        hp = o.head_parallel if o.head_parallel is not None else math.gcd(world_size, spec.num_kv_heads)
        if world_size % hp:
            raise CPError(f"loongtrain: head_parallel={hp} must divide the world size {world_size}")
        self._kv_heads_check(spec, hp)
        positions = world_size // hp
        if o.window is not None:
            window = o.window
            if positions % window:
                raise CPError(
                    f"loongtrain: window={window} must divide the number of ring positions "
                    f"{positions} (= world size {world_size} / head_parallel {hp})"
                )
        else:
            per_node = max(1, dpn // hp) if dpn % hp == 0 else positions
            window = per_node if positions % per_node == 0 else positions
        return hp, window

    def check_spec(self, spec) -> None:
        self.resolve(spec, self.world_size)

    def _make_plan(self, batch, spec, world_size):
        hp, window = self.resolve(spec, world_size)
        return RingFamilyPlan(batch, spec, world_size, self.options, layout=zigzag_layout(batch, world_size // hp),
                              window=window, head_parallel=hp, backend=self.name)

    def _attention(self, q, k, v, plan: RingFamilyPlan):
        hp = plan.head_parallel
        if hp == 1:
            return super()._attention(q, k, v, plan)
        rank = self.rank
        c, slot = divmod(rank, hp)
        counts = [int(x) for x in plan.slot_tokens(c)]
        ranks = [plan.rank_of_position(c, s) for s in range(hp)]
        qh = _head_index(q.shape[1], hp)
        kvh = _head_index(k.shape[1], hp)
        args = (slot, counts, ranks, self.group, self.counters)
        qc = _SeqToHeads.apply(q, qh, *args)
        kc = _SeqToHeads.apply(k, kvh, *args)
        vc = _SeqToHeads.apply(v, kvh, *args)
        kernel = get_kernel(self.options.kernel, q.device)
        oc = RingAttentionFn.apply(qc, kc, vc, plan.rank_work(rank), kernel, plan.spec.scale, self.ring_groups(plan),
                                   self.counters)
        return _HeadsToSeq.apply(oc, qh, *args)
