"""Placement candidates of the DCP planner: the hypergraph placement, static zigzag layouts in DCP's own
terms, and ``"auto"``, which simulates them and keeps the fastest.

*Zigzag candidate.* The token blocks of every document, in document order, are dealt to the devices in
snake order 0, 1, ..., N-1, N-1, ..., 1, 0, 0, 1, ... (the deal continues across documents), so each
device holds early and late blocks of a long document as zigzag ring attention does; every computation
block runs on its query block's owner (queries, outputs and their gradients never move, only keys and
values do). Its block size is the largest power of two that gives the longest document at least two
blocks per position (within ``min_block_size`` and the hypergraph plan's block size), so a long document
is spread over every device twice.

*2D zigzag candidate* (``zigzag2d``, when there are several head blocks): LoongTrain's layout. Positions
are groups of ``hp`` consecutive devices (hp = gcd(head blocks, world, devices per node)); token blocks
are snake-dealt over the positions and alternate over a position's devices; the computation of head block
k runs on the position's device k mod hp, so queries move only inside the position (LoongTrain's head
all-to-all) and keys/values cross positions.

Candidates are scheduled and compiled by the same stage scheduler and compiler as the hypergraph
placement (one crossing per input and destination node, inputs of stage s+1 during stage s), so each is
a DCP plan like any other: the executor, the verifier and the statistics take it unchanged.

*Auto.* Every candidate is compiled for every device and simulated on the cluster (``dcp_backend.sim``)
with the options' cost model (``cost_model``; the analytic roofline when None) and that table's network
preset (H100 table: ``h100-p5``; CPU table: ``cpu-loopback``; analytic: ``h100-p5``); the plan with the
smallest simulated forward + backward time is returned (ties go to the hypergraph plan), and
``plan.candidates`` records every candidate's times.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.blocks import build_blocks
from dcp_backend.dcp.partition import Placement
from dcp_backend.spec import AttentionSpec

def snake_devices(n_items: int, num_devices: int, start: int = 0) -> np.ndarray:
    """Device of item i under the snake deal 0..N-1, N-1..0, ... starting at deal position ``start``."""
    pos = (start + np.arange(n_items, dtype=np.int64)) % (2 * num_devices)
    return np.where(pos < num_devices, pos, 2 * num_devices - 1 - pos)


def zigzag_block_size(batch: PackedBatch, num_devices: int, upper: int, lower: int) -> int:
    longest = int(batch.seqlens.max())
    b = 1 << max(0, int(np.floor(np.log2(max(1, longest // (2 * num_devices))))))
    return int(max(lower, min(b, upper)))


def zigzag_placement(bs, num_devices: int, devices_per_node: int, head_parallel: int = 1) -> Placement:
    """Snake-dealt token blocks (documents in order, the deal continuing across documents) over
    ``num_devices / head_parallel`` positions of ``head_parallel`` consecutive devices; inside a position
    the blocks alternate over its devices. A computation block runs on its query block's position, on the
    device of its head slot (head block k -> slot k mod head_parallel): with ``head_parallel`` 1 that is
    the query block's owner, with more it is LoongTrain's head-parallel split inside the position."""
    hp = int(head_parallel)
    C = num_devices // hp
    pos = snake_devices(bs.n_tb, C)
    slot = (np.arange(bs.n_tb) // (2 * C)) % hp if hp > 1 else np.zeros(bs.n_tb, np.int64)
    owner = pos * hp + slot
    comp = np.arange(bs.n_comp)
    q_pos = pos[bs.pair_q[bs.comp_pair(comp)]]
    comp_dev = q_pos * hp + (bs.comp_head(comp) % hp) if hp > 1 else owner[bs.pair_q[bs.comp_pair(comp)]]
    return Placement(owner, comp_dev, num_devices, devices_per_node)


def zigzag_plan(batch: PackedBatch, spec: AttentionSpec, world_size: int, options, element_size: int = 2,
                compile_all: bool = False, block_size: int | None = None, head_parallel: int = 1):
    """The static zigzag candidate as a compiled :class:`~dcp_backend.dcp.planner.DCPPlan` (with
    ``head_parallel`` > 1: the LoongTrain-like 2D variant, see :func:`zigzag_placement`)."""
    from dcp_backend.dcp.planner import auto_block_size, pair_cost, plan_from_placement, resolve_topology

    timings = {}
    t0 = time.perf_counter()
    dpn = resolve_topology(world_size, options.devices_per_node)
    if block_size is None:
        upper = int(options.block_size) if options.block_size != "auto" else auto_block_size(
            batch, world_size, options.memory_imbalance, options.min_block_size, options.max_block_size)
        block_size = zigzag_block_size(batch, world_size // head_parallel, upper, options.min_block_size)
    bs = build_blocks(batch, spec, block_size, options.head_block_size)
    cost = pair_cost(bs, options.cost_model, element_size)
    t1 = time.perf_counter()
    timings["blocks"] = t1 - t0
    pl = zigzag_placement(bs, world_size, dpn, head_parallel)
    t2 = time.perf_counter()
    timings["partition"] = t2 - t1
    return plan_from_placement(batch, spec, world_size, options, bs, cost, pl, timings, element_size, compile_all)


def head_parallel_degree(spec: AttentionSpec, options, world_size: int) -> int:
    """Head slots of the 2D candidate: gcd(head blocks, world size, devices per node), so a head group
    stays inside a node (LoongTrain's head all-to-all degree is gcd(world, KV heads))."""
    from dcp_backend.dcp.blocks import HeadBlocks

    n_q = HeadBlocks.make(spec, options.head_block_size).n_q_blocks
    dpn = options.devices_per_node or world_size
    return math.gcd(math.gcd(n_q, world_size), dpn)


def simulated_seconds(plan, cost_model, element_size: int) -> tuple[float, float]:
    """(forward, backward) simulated seconds of a DCP plan on its topology (see the module docstring)."""
    from dcp_backend.cost_model import load_cost_model
    from dcp_backend.dtypes import dtype_name
    from dcp_backend.sim.simulator import simulate_plan

    cm = load_cost_model(cost_model)
    rep = simulate_plan(plan, cm, cm.network or "h100-p5", dtype_name(element_size), with_stats=False)
    return rep.fwd.time, rep.bwd.time


def make_plan(batch: PackedBatch, spec: AttentionSpec, world_size: int, options, element_size: int = 2,
              compile_all: bool = False):
    """Plan with ``options.placement`` in ("zigzag", "auto"); "hypergraph" is the planner's own path."""
    from dcp_backend.dcp.planner import make_plan as hypergraph_plan

    if options.placement == "zigzag":
        return zigzag_plan(batch, spec, world_size, options, element_size, compile_all)
    t0 = time.perf_counter()
    base = dataclasses.replace(options, placement="hypergraph")
    plans = {"hypergraph": hypergraph_plan(batch, spec, world_size, base, element_size, compile_all=True)}
    if world_size > 1:
        plans["zigzag"] = zigzag_plan(batch, spec, world_size, options, element_size, compile_all=True)
        hp = head_parallel_degree(spec, options, world_size)
        if hp > 1:
            plans["zigzag2d"] = zigzag_plan(batch, spec, world_size, options, element_size, compile_all=True,
                                            head_parallel=hp)
    times = {}
    for name, p in plans.items():
        f, b = simulated_seconds(p, options.cost_model, element_size)
        times[name] = {"fwd_s": f, "bwd_s": b}
    best = min(times, key=lambda k: (times[k]["fwd_s"] + times[k]["bwd_s"], k != "hypergraph"))
    plan = plans[best]
    plan.options = options
    plan.candidates = {"chosen": best, **times}
    plan._timings["select"] = time.perf_counter() - t0 - sum(
        sum(v for k, v in p._timings.items()) for p in plans.values())
    for name, p in plans.items():
        if p is not plan:
            plan._timings[f"candidate_{name}"] = p.planning_seconds
    return plan
