"""Placement candidates of the DCP planner: the hypergraph placement, a static zigzag layout in DCP's own
terms, and ``"auto"``, which simulates both and keeps the faster.

*Zigzag candidate.* The token blocks of every document, in document order, are dealt to the devices in
snake order 0, 1, ..., N-1, N-1, ..., 1, 0, 0, 1, ... (the deal continues across documents), so each
device holds early and late blocks of a long document as zigzag ring attention does; every computation
block runs on its query block's owner (queries, outputs and their gradients never move, only keys and
values do). Its block size is the largest power of two that gives the longest document at least ``2N``
blocks (within ``min_block_size`` and the hypergraph plan's block size), so a long document is spread
over every device twice. It is scheduled and compiled by the same stage scheduler and compiler as the
hypergraph placement (one crossing per input and destination node, inputs of stage s+1 during stage s),
so it is a DCP plan like any other: the executor, the verifier and the statistics take it unchanged.

*Auto.* Both plans are compiled for every device and simulated on the cluster (``dcp_backend.sim``) with
the options' cost model (``cost_model``; the analytic roofline when None) and that table's network
preset (H100 table: ``h100-p5``; CPU table: ``cpu-loopback``; analytic: ``h100-p5``); the plan with the
smaller simulated forward + backward time is returned, and ``plan.candidates`` records both times.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.blocks import build_blocks
from dcp_backend.dcp.compile import compile_programs
from dcp_backend.dcp.partition import Placement
from dcp_backend.dcp.schedule import schedule_pass
from dcp_backend.spec import AttentionSpec

PLACEMENTS = ("hypergraph", "zigzag", "auto")


def snake_devices(n_items: int, num_devices: int, start: int = 0) -> np.ndarray:
    """Device of item i under the snake deal 0..N-1, N-1..0, ... starting at deal position ``start``."""
    pos = (start + np.arange(n_items, dtype=np.int64)) % (2 * num_devices)
    return np.where(pos < num_devices, pos, 2 * num_devices - 1 - pos)


def zigzag_block_size(batch: PackedBatch, num_devices: int, upper: int, lower: int) -> int:
    longest = int(batch.seqlens.max())
    b = 1 << max(0, int(np.floor(np.log2(max(1, longest // (2 * num_devices))))))
    return int(max(lower, min(b, upper)))


def zigzag_placement(bs, num_devices: int, devices_per_node: int) -> Placement:
    """Snake-dealt token blocks (documents in order, the deal continuing across documents); computation
    on the query block's owner."""
    owner = snake_devices(bs.n_tb, num_devices)
    comp_dev = owner[bs.pair_q[bs.comp_pair(np.arange(bs.n_comp))]]
    return Placement(owner, comp_dev, num_devices, devices_per_node)


def zigzag_plan(batch: PackedBatch, spec: AttentionSpec, world_size: int, options, element_size: int = 2,
                compile_all: bool = False, block_size: int | None = None):
    """The static zigzag candidate as a compiled :class:`~dcp_backend.dcp.planner.DCPPlan`."""
    from dcp_backend.dcp.planner import DCPPlan, auto_block_size, pair_cost, resolve_topology

    timings = {}
    t0 = time.perf_counter()
    dpn = resolve_topology(world_size, options.devices_per_node)
    if block_size is None:
        upper = int(options.block_size) if options.block_size != "auto" else auto_block_size(
            batch, world_size, options.memory_imbalance, options.min_block_size, options.max_block_size)
        block_size = zigzag_block_size(batch, world_size, upper, options.min_block_size)
    bs = build_blocks(batch, spec, block_size, options.head_block_size)
    cost = pair_cost(bs, options.cost_model, element_size)
    t1 = time.perf_counter()
    timings["blocks"] = t1 - t0
    pl = zigzag_placement(bs, world_size, dpn)
    t2 = time.perf_counter()
    timings["partition"] = t2 - t1
    tok = bs.tb_tokens.astype(np.float64)
    h = bs.heads
    e = element_size
    q_fwd = np.repeat(bs.q_bytes_per_token(e) * tok, h.n_q)
    kv_b = np.repeat(bs.kv_bytes_per_token(e) * tok, h.n_kv)
    q_bwd = np.repeat((3 * bs.q_bytes_per_token(e) + bs.lse_bytes_per_token()) * tok, h.n_q)
    fwd = schedule_pass(bs, pl, cost, q_fwd, kv_b, options.num_stages, options.inter_node_cost, kv_outputs=False)
    bwd = schedule_pass(bs, pl, cost, q_bwd, kv_b, options.num_stages, options.inter_node_cost, kv_outputs=True)
    timings["schedule"] = time.perf_counter() - t2
    layouts, fp, bp = compile_programs(bs, pl, fwd, bwd, eager=compile_all)
    return DCPPlan(batch, spec, world_size, options, blocks=bs, placement=pl, fwd=fwd, bwd=bwd, layouts=layouts,
                   fwd_programs=fp, bwd_programs=bp, timings=timings,
                   comp_cost=cost if options.cost_model is None else pair_cost(bs))  # stats: pair-heads


def simulated_seconds(plan, cost_model, element_size: int) -> tuple[float, float]:
    """(forward, backward) simulated seconds of a DCP plan on its topology (see the module docstring)."""
    from dcp_backend.cost import dtype_name, load_cost_model
    from dcp_backend.sim.simulate import simulate_plan

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
