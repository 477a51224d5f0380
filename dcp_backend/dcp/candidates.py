"""Structured placements of the DCP planner, in DCP's own terms: each returns a
:class:`~dcp_backend.dcp.partition.Placement` that :func:`~dcp_backend.dcp.plan.plan_from_placement`
schedules and compiles like the hypergraph placement (``dcp_backend.dcp.planner.make_plan`` dispatches).

*Zigzag.* The token blocks of every document, in document order, are dealt to the devices in snake
order 0, 1, ..., N-1, N-1, ..., 1, 0, 0, 1, ... (the deal continues across documents), so each device
holds early and late blocks of a long document as zigzag ring attention does; every computation block
runs on its query block's owner (queries, outputs and their gradients never move, only keys and values
do). Its block size is the largest power of two that gives the longest document at least two blocks per
position (within ``min_block_size`` and the hypergraph plan's block size), so a long document is spread
over every device twice.

*2D zigzag* (``zigzag2d``, when there are several head blocks): LoongTrain's layout. Positions are groups
of ``hp`` consecutive devices (hp = gcd(head blocks, world, devices per node)); token blocks are
snake-dealt over the positions and alternate over a position's devices; the computation of head block k
runs on the position's device k mod hp, so queries move only inside the position (LoongTrain's head
all-to-all) and keys/values cross positions.

*Node-packed* (``packed``): documents that fit in a node's share of the compute are dealt whole to the
least loaded node (largest first), the others are snake-dealt over every device; inside a node a
document's blocks are snake-dealt over the node's devices. Short documents then never cross the network.

*Seeded hypergraph placement* (:func:`seeded_placement`, the default ``placement="hypergraph"``): the
structured placements, on the hypergraph placement's own blocks, are repaired under the same balance
limits (:func:`~dcp_backend.dcp.partition.rebalance`) and compared with the hypergraph placement by the
bytes a training step moves across nodes (exactly the compiled plan's, see
:func:`~dcp_backend.dcp.partition.placement_costs`); the cheapest one within the limits is kept. So the
plan never crosses the network more than the best structured placement at the same balance limits.

Choosing among them by simulation (``placement="auto"``) lives above the simulator, in
:mod:`dcp_backend.placement_search`.
"""
from __future__ import annotations

import math

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.blocks import auto_block_size, build_blocks
from dcp_backend.dcp.partition import Hypergraph, Placement, placement_costs, rebalance
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

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
    return Placement(owner, comp_dev, num_devices, devices_per_node, source="zigzag2d" if hp > 1 else "zigzag")


def owners_repaired(bs, pl: Placement, comp_cost: np.ndarray, memory_imbalance: float, element_size: int = 2,
                    partial_dtype: str = "model") -> Placement:
    """``pl`` with token-block owners moved (:func:`~dcp_backend.dcp.partition.rebalance`) until tokens per
    device are within ``memory_imbalance``, computation blocks left where they are: the 2D zigzag placement
    under ``schedule="ring"`` keeps every computation in its head group (whole blocks dealt to positions leave
    some devices a block above the mean)."""
    from dcp_backend.dcp.partition import build_hypergraph

    hg = build_hypergraph(bs, element_size, partial_dtype)
    comp, owner = rebalance(hg, pl.comp_device.copy(), pl.owner.copy(), comp_cost, bs.tb_tokens.astype(np.float64),
                            pl.num_devices, pl.devices_per_node, np.inf, memory_imbalance)
    assert np.array_equal(comp, pl.comp_device)
    return Placement(owner, comp, pl.num_devices, pl.devices_per_node, source=pl.source)


def zigzag_blocks(batch: PackedBatch, spec: AttentionSpec, topology: Topology, options, head_parallel: int = 1):
    """The block set of the zigzag candidates: the largest power of two giving the longest document at
    least two blocks per position, within ``min_block_size`` and the hypergraph plan's block size."""
    n = topology.world_size
    upper = int(options.block_size) if options.block_size != "auto" else auto_block_size(
        batch, n, options.memory_imbalance, options.min_block_size, options.max_block_size)
    block_size = zigzag_block_size(batch, n // head_parallel, upper, options.min_block_size)
    return build_blocks(batch, spec, block_size, options.head_block_size)


def head_parallel_degree(spec: AttentionSpec, options, topology: Topology) -> int:
    """Head slots of the 2D candidate: gcd(head blocks, world size, devices per node), so a head group
    stays inside a node (LoongTrain's head all-to-all degree is gcd(world, KV heads))."""
    from dcp_backend.dcp.blocks import HeadBlocks

    n_q_blocks = HeadBlocks.make(spec, options.head_block_size).n_q_blocks
    return math.gcd(math.gcd(n_q_blocks, topology.world_size), topology.devices_per_node)


def node_packed_placement(bs, comp_cost: np.ndarray, num_devices: int, devices_per_node: int) -> Placement:
    """Documents that fit in a node's share of compute go whole to the least loaded node (largest first),
    longer ones are snake-dealt over every device; inside a node each document's blocks are snake-dealt
    over the node's devices (the deal continuing across documents). Computation runs on the query owner."""
    nodes = num_devices // devices_per_node
    q_of_comp = bs.pair_q[bs.comp_pair(np.arange(bs.n_comp))]
    tb_cost = np.bincount(q_of_comp, weights=comp_cost, minlength=bs.n_tb)
    doc_cost = np.bincount(bs.tb_doc, weights=tb_cost, minlength=bs.batch.num_docs)
    share = doc_cost.sum() / max(nodes, 1)
    owner = np.zeros(bs.n_tb, dtype=np.int64)
    load = np.zeros(nodes)
    deal = np.zeros(nodes, dtype=np.int64)  # snake position inside each node
    global_deal = 0
    starts = np.searchsorted(bs.tb_doc, np.arange(bs.batch.num_docs))
    counts = np.bincount(bs.tb_doc, minlength=bs.batch.num_docs)
    for d in np.argsort(-doc_cost, kind="stable").tolist():  # loop over documents
        blocks = np.arange(starts[d], starts[d] + counts[d])
        if doc_cost[d] > share and nodes > 1:
            owner[blocks] = snake_devices(blocks.size, num_devices, global_deal)
            global_deal += blocks.size
            load += doc_cost[d] / nodes
        else:
            n = int(np.argmin(load))
            owner[blocks] = n * devices_per_node + snake_devices(blocks.size, devices_per_node, int(deal[n]))
            deal[n] += blocks.size
            load[n] += doc_cost[d]
    return Placement(owner, owner[q_of_comp], num_devices, devices_per_node, source="packed")


def structured_placements(bs, comp_cost: np.ndarray, spec: AttentionSpec, topology: Topology, options) -> dict:
    """The structured placements on a block set: zigzag, node-packed and (several head blocks per node)
    the 2D zigzag."""
    n, dpn = topology.world_size, topology.devices_per_node
    out = {"zigzag": zigzag_placement(bs, n, dpn), "packed": node_packed_placement(bs, comp_cost, n, dpn)}
    hp = head_parallel_degree(spec, options, topology)
    if hp > 1:
        out["zigzag2d"] = zigzag_placement(bs, n, dpn, hp)
    return out


def seeded_placement(bs, comp_cost: np.ndarray, hg: Hypergraph, hyper: Placement, spec: AttentionSpec,
                     topology: Topology, options) -> Placement:
    """The cheapest of the hypergraph placement and the structured placements repaired under the same
    balance limits: least inter-node bytes among those within both limits (then least bytes between
    devices; the hypergraph placement on ties). When none is within the limits (blocks too coarse), the
    least imbalanced is kept."""
    n, dpn = topology.world_size, topology.devices_per_node
    if n == 1:
        return hyper
    mem = bs.tb_tokens.astype(np.float64)
    ci, mi = options.compute_imbalance, options.memory_imbalance
    cands = {"hypergraph": hyper}
    for name, pl in structured_placements(bs, comp_cost, spec, topology, options).items():
        comp_dev, owner = rebalance(hg, pl.comp_device.copy(), pl.owner.copy(), comp_cost, mem, n, dpn, ci, mi)
        cands[name] = Placement(owner, comp_dev, n, dpn, source=name)
    costs = {name: placement_costs(hg, pl.comp_device, pl.owner, comp_cost, mem, n, dpn) for name, pl in cands.items()}

    def key(name):
        c = costs[name]
        over = max(c["compute_imbalance"] - 1 - ci, c["memory_imbalance"] - 1 - mi, 0.0)
        return (round(over, 6), c["inter"], c["total"], name != "hypergraph")

    best = min(cands, key=key)
    chosen = cands[best]
    chosen.candidates = {"chosen": best, **costs}
    return chosen
