"""Megatron-Core hybrid CP plans (:mod:`dcp_backend.baselines.hybrid`) as simulator programs.

A rank runs its samples of a round one after another; each sample is Transformer Engine's p2p ring over
the sample's CP group (:func:`dcp_backend.sim.ring.te_programs` of the sample's one-document plan, its
local ranks mapped to the group's global ranks, its messages and handles tagged with the round and the
document so they stay distinct). After each round every rank enters a barrier (megatron's
``torch.distributed.barrier`` over the DP x CP group), modelled as a dissemination barrier: ``ceil(log2
n)`` steps of zero-byte messages to rank ``r + 2**i``, so a round ends when its slowest group ends, plus
the barrier's latencies.

``wrap(group, local_rank, doc) -> (ops before, ops after)`` lets a caller put other work around each
sample's attention on each rank (the end-to-end model puts the sample's GEMMs there); ``rounds`` selects
rounds, ``barrier=False`` drops the barriers.
"""
from __future__ import annotations

import math

from dcp_backend.sim.engine import Launch, Wait
from dcp_backend.sim.op_costs import Costs
from dcp_backend.sim.ring import te_programs


def relabel(ops: list, ranks, prefix) -> list:
    """A sub-group's program on global ranks: local rank ``i`` -> ``ranks[i]``; message ids and launch
    handles prefixed with ``prefix`` (so samples never share a message or a handle)."""
    out = []
    for op in ops:
        if isinstance(op, Launch):
            out.append(Launch((prefix, op.handle), [((prefix, fid), ranks[dst], b) for fid, dst, b in op.sends],
                              [((prefix, fid), ranks[src]) for fid, src in op.recvs]))
        elif isinstance(op, Wait):
            out.append(Wait((prefix, op.handle), op.label))
        else:
            out.append(op)
    return out


def barrier_ops(rank: int, n: int, key) -> list:
    """Rank ``rank``'s part of a dissemination barrier over ``n`` ranks (zero-byte messages)."""
    ops = []
    for i in range(math.ceil(math.log2(n)) if n > 1 else 0):
        d = 1 << i
        to, frm = (rank + d) % n, (rank - d) % n
        h = ("barrier", key, i)
        ops.append(Launch(h, [((h, rank, to), to, 0.0)], [((h, frm, rank), frm)]))
        ops.append(Wait(h, f"barrier {key} step {i}"))
    return ops


def hybrid_programs(plan, backward: bool, c: Costs, cache: dict | None = None, rounds=None, wrap=None,
                    barrier: bool = True) -> list[list]:
    """Per-rank programs of a :class:`~dcp_backend.baselines.hybrid.HybridPlan` for one pass."""
    cache = {} if cache is None else cache
    n = plan.world_size
    progs: list[list] = [[] for _ in range(n)]
    sub_progs: dict = {}
    for j in range(len(plan.rounds)) if rounds is None else rounds:
        for g in plan.rounds[j]:
            k = len(g.ranks)
            for d in g.docs:
                sub = plan.sample_plan(d, k)
                key = (id(sub), backward)
                if key not in sub_progs:
                    sub_progs[key] = te_programs(sub, backward, c, cache)
                for i, r in enumerate(g.ranks):
                    ops = relabel(sub_progs[key][i], g.ranks, ("hybrid", j, d))
                    if wrap is not None:
                        before, after = wrap(g, i, d)
                        ops = list(before) + ops + list(after)
                    progs[r] += ops
        if barrier:
            for r in range(n):
                progs[r] += barrier_ops(r, n, j)
    return progs
