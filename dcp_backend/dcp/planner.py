"""The DCP planner: lengths -> blocks -> placement -> forward/backward schedules -> per-device programs.

:func:`make_plan` is the one dispatcher over placement strategies: ``hypergraph`` (Mt-KaHyPar,
:mod:`.partition`), ``zigzag`` / ``zigzag2d`` (structured, :mod:`.candidates`), and ``auto``, which plans
the others, simulates them and keeps the fastest (:mod:`dcp_backend.placement_search`, above the
simulator). Every phase runs on the CPU (no process group) and is timed; the result is a
:class:`~dcp_backend.dcp.plan.DCPPlan`. :class:`DCPPlanner` is the backend contract's planner.
"""
from __future__ import annotations

import dataclasses
import time

from dcp_backend.batch import PackedBatch
from dcp_backend.contract import Planner
from dcp_backend.dcp.blocks import HeadBlocks, auto_block_size, build_blocks
from dcp_backend.dcp.candidates import (head_parallel_degree, owners_repaired, seeded_placement, zigzag_blocks,
                                       zigzag_placement)
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.partition import build_hypergraph, place
from dcp_backend.dcp.plan import DCPPlan, pair_cost, plan_from_placement
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

STRATEGIES = ("hypergraph", "zigzag", "zigzag2d")


def placement_of(strategy: str, batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: DCPOptions,
                 element_size: int, timings: dict):
    """(blocks, computation-block costs, placement) of one strategy; fills ``timings`` (blocks, partition)."""
    t0 = time.perf_counter()
    n, dpn = topology.world_size, topology.devices_per_node
    if strategy == "hypergraph":
        if options.block_size == "auto":
            block = auto_block_size(batch, n, options.memory_imbalance, options.min_block_size, options.max_block_size)
        else:
            block = int(options.block_size)
        bs = build_blocks(batch, spec, block, options.head_block_size)
    else:
        hp = head_parallel_degree(spec, options, topology) if strategy == "zigzag2d" else 1
        bs = zigzag_blocks(batch, spec, topology, options, hp)
    cost = pair_cost(bs, options.cost_model, element_size)
    t1 = time.perf_counter()
    timings["blocks"] = t1 - t0
    if strategy == "hypergraph":
        hg = build_hypergraph(bs, element_size, options.partial_dtype) if n > 1 else None
        pl = place(bs, cost, n, dpn, compute_imbalance=options.compute_imbalance,
                   memory_imbalance=options.memory_imbalance, inter_node_factor=options.inter_node_imbalance_factor,
                   seed=options.seed, partitioner=options.partitioner, element_size=element_size, hg=hg)
        if n > 1 and options.placement_seeds == "structured":
            pl = seeded_placement(bs, cost, hg, pl, spec, topology, options)
    else:
        pl = zigzag_placement(bs, n, dpn, hp)
        if hp > 1 and options.schedule == "ring":  # balance memory, keep computations in their head groups
            pl = owners_repaired(bs, pl, cost, options.memory_imbalance, element_size, options.partial_dtype)
    timings["partition"] = time.perf_counter() - t1
    return bs, cost, pl


AUTO_LOOSE_COMPUTE = 2.0  # placement="auto" also plans the hypergraph at this many times compute_imbalance
LOOSE = "hypergraph_loose"  # that candidate's name in plan.candidates


def auto_candidates(spec: AttentionSpec, options: DCPOptions, topology: Topology) -> dict[str, tuple]:
    """The plans ``placement="auto"`` compares, {name: (strategy, options)}: the hypergraph plan, and on
    several devices the hypergraph plan at ``AUTO_LOOSE_COMPUTE`` times the compute tolerance (a looser
    balance may cut fewer bytes across nodes; which wins varies by batch), the hypergraph plan with the other
    schedule (``stages`` / ``ring``: the ring wins under a memory limit on batches of a few long documents), the
    zigzag plan and (with several head blocks per node) the 2D zigzag plan with either schedule."""
    if topology.world_size == 1:
        return {"hypergraph": ("hypergraph", options)}
    loose = dataclasses.replace(options, compute_imbalance=AUTO_LOOSE_COMPUTE * options.compute_imbalance)
    other = "ring" if options.schedule == "stages" else "stages"
    out = {"hypergraph": ("hypergraph", options), LOOSE: ("hypergraph", loose),
           f"hypergraph_{other}": ("hypergraph", dataclasses.replace(options, schedule=other)),
           "zigzag": ("zigzag", options)}
    if head_parallel_degree(spec, options, topology) > 1:
        out["zigzag2d"] = ("zigzag2d", options)
        out[f"zigzag2d_{other}"] = ("zigzag2d", dataclasses.replace(options, schedule=other))
    return out


def make_plan(batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: DCPOptions,
              element_size: int = 2, compile_all: bool = False, strategy: str | None = None) -> DCPPlan:
    """Plan one batch with ``strategy`` (default: ``options.placement``). Programs are compiled on first
    use per rank unless ``compile_all``."""
    strategy = strategy or options.placement
    if strategy == "auto":
        from dcp_backend.placement_search import pick_fastest

        t0 = time.perf_counter()
        plans = {name: make_plan(batch, spec, topology, opts, element_size, compile_all=True, strategy=strategy)
                 for name, (strategy, opts) in auto_candidates(spec, options, topology).items()}
        return pick_fastest(plans, options.cost_model, element_size, started=t0)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown DCP placement strategy {strategy!r}; choose from {STRATEGIES + ('auto',)}")
    timings: dict[str, float] = {}
    bs, cost, pl = placement_of(strategy, batch, spec, topology, options, element_size, timings)
    return plan_from_placement(batch, spec, topology, options, bs, cost, pl, timings, element_size, compile_all)


class DCPPlanner(Planner):
    name = "dcp"
    Options = DCPOptions

    def check_spec(self, spec: AttentionSpec, topology: Topology) -> None:
        HeadBlocks.make(spec, self.options.head_block_size)

    def _make_plan(self, batch, spec, topology):
        return make_plan(batch, spec, topology, self.options)
