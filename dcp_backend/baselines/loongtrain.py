"""`loongtrain`: 2D attention = head-parallel all-to-all (degree ``head_parallel``) x double ring.

Ranks form head groups of ``hp`` consecutive ranks (one ring position each). The all-to-all inside a
head group turns "my tokens, all heads" into "the position's tokens, my heads" (Q heads split; KV heads
split, or replicated when there are fewer KV heads than ``hp``). The context ring over the ``C = N/hp``
positions is the zigzag layout run as a double ring: an inner ring inside windows of ``window``
positions and an outer ring between windows, overlapped with the inner sweep. A second all-to-all
returns the output to token sharding. Backward mirrors it: each direction of the all-to-all is the
other's gradient.

Options: ``head_parallel`` (default: gcd(world size, num_kv_heads)), ``window`` (default: the ring
positions of one node, i.e. devices_per_node / head_parallel, when it divides C; else C).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.ring_core import RingAttentionFn
from dcp_backend.baselines.ring_family import (RingFamilyExecutor, RingFamilyOptions, RingFamilyPlan,
                                               RingFamilyPlanner)
from dcp_backend.comm import Exchange
from dcp_backend.contract import CPBackend, option, positive_int
from dcp_backend.errors import CPError
from dcp_backend.host_tables import HostTables

TAG_A2A = 21


@dataclass(frozen=True)
class LoongTrainOptions(RingFamilyOptions):
    head_parallel: int | None = option(None, "head all-to-all degree (default: gcd(CP size, KV heads)); ranks of "
                                             "one head group are consecutive")
    window: int | None = option(None, "double-ring inner window in ring positions (default: the positions of one "
                                      "node); 1 = every hand-off on the outer ring")

    def validate(self) -> None:
        super().validate()
        for name in ("head_parallel", "window"):
            positive_int("loongtrain", name, getattr(self, name), allow_none=True)


class HeadSplit(list):
    """Heads each head slot receives (a list per slot: a split, or replication when num_heads < hp), with
    the same lists as index tensors uploaded once per device (the all-to-alls gather and scatter by them
    every layer)."""

    def __init__(self, num_heads: int, hp: int):
        if num_heads >= hp:
            per = num_heads // hp
            super().__init__(list(range(s * per, (s + 1) * per)) for s in range(hp))
        else:
            super().__init__([s * num_heads // hp] for s in range(hp))
        self.num_heads = num_heads
        self.tables = HostTables(np.int64)
        for heads in self:
            self.tables.add(heads)

    def on(self, device) -> list[torch.Tensor]:
        return self.tables.on(device)


@functools.lru_cache(maxsize=64)
def _head_index(num_heads: int, hp: int) -> HeadSplit:
    return HeadSplit(num_heads, hp)


@dataclass(frozen=True)
class _Group:
    """One head group as seen from a rank: its slot, the tokens of every slot, their ranks."""

    slot: int
    counts: tuple
    ranks: tuple
    group: object
    counters: object

    def exchange(self, parts_out: list, shapes_in: list, like: torch.Tensor) -> list:
        """Send ``parts_out[p]`` to slot p and receive a ``shapes_in[p]`` tensor from it (p != my slot);
        my own part stays."""
        x = Exchange(self.group, "LoongTrain head all-to-all", counters=self.counters)
        got = []
        for p, shape in enumerate(shapes_in):
            if p == self.slot:
                got.append(parts_out[p])
                continue
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            x.send(parts_out[p], self.ranks[p], TAG_A2A)
            x.recv(buf, self.ranks[p], TAG_A2A)
            got.append(buf)
        x.launch().wait()
        return got


def seq_to_heads(x: torch.Tensor, heads: HeadSplit, g: _Group) -> torch.Tensor:
    """[my tokens, all heads] -> [the position's tokens, my heads]."""
    index = heads.on(x.device)
    parts = [x.index_select(1, index[p]) for p in range(len(heads))]
    mine = len(heads[g.slot])
    got = g.exchange(parts, [(g.counts[p], mine, x.shape[2]) for p in range(len(heads))], x)
    return torch.cat(got, dim=0)


def heads_to_seq(y: torch.Tensor, heads: HeadSplit, g: _Group) -> torch.Tensor:
    """[the position's tokens, my heads] -> [my tokens, all heads]; heads held by several slots (KV heads
    replicated when there are fewer than hp) are summed, which is the gradient of :func:`seq_to_heads`."""
    offs = np.concatenate([[0], np.cumsum(g.counts)])
    parts = [y[int(offs[p]):int(offs[p + 1])].contiguous() for p in range(len(heads))]
    mine = g.counts[g.slot]
    got = g.exchange(parts, [(mine, len(heads[p]), y.shape[2]) for p in range(len(heads))], y)
    out = torch.zeros((mine, heads.num_heads, y.shape[2]), dtype=y.dtype, device=y.device)
    index = heads.on(y.device)
    for p, part in enumerate(got):
        out.index_add_(1, index[p], part)
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, heads, g):
        ctx.meta = (heads, g)
        return seq_to_heads(x, heads, g)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, *ctx.meta), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, heads, g):
        ctx.meta = (heads, g)
        return heads_to_seq(y, heads, g)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, *ctx.meta), None, None


class LoongTrainPlanner(RingFamilyPlanner):
    name = "loongtrain"
    Options = LoongTrainOptions

    def resolve(self, spec, topology) -> tuple[int, int]:
        """(head_parallel, window) for this spec and topology, validated."""
        o = self.options
        world_size, dpn = topology.world_size, topology.devices_per_node
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

    def check_spec(self, spec, topology) -> None:
        self.resolve(spec, topology)

    def _make_plan(self, batch, spec, topology):
        hp, window = self.resolve(spec, topology)
        return RingFamilyPlan(self.name, batch, spec, topology, self.options,
                              layout=zigzag_layout(batch, topology.world_size // hp), window=window, head_parallel=hp)


class LoongTrainExecutor(RingFamilyExecutor):
    name = "loongtrain"

    def _attention(self, q, k, v, plan: RingFamilyPlan):
        hp = plan.head_parallel
        if hp == 1:
            return super()._attention(q, k, v, plan)
        rank = self.rank
        c, slot = divmod(rank, hp)
        g = _Group(slot, tuple(int(x) for x in plan.slot_tokens(c)),
                   tuple(plan.rank_of_position(c, s) for s in range(hp)), self.group, self.counters)
        qh, kvh = _head_index(q.shape[1], hp), _head_index(k.shape[1], hp)
        qc = _SeqToHeads.apply(q, qh, g)
        kc = _SeqToHeads.apply(k, kvh, g)
        vc = _SeqToHeads.apply(v, kvh, g)
        oc = RingAttentionFn.apply(qc, kc, vc, plan.rank_work(rank), self.kernel(q.device), plan.spec.scale,
                                   self.ring_groups(plan), self.counters)
        return _HeadsToSeq.apply(oc, qh, g)


class LoongTrainBackend(CPBackend):
    name = "loongtrain"
    Planner = LoongTrainPlanner
    Executor = LoongTrainExecutor
