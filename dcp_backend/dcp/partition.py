"""Placement of token blocks and computation blocks on devices by hypergraph partitioning.

Hypergraph (built vectorised from a :class:`~dcp_backend.dcp.blocks.BlockSet`):

* vertices: every computation block (weight: its cost) and every token block (weight: its tokens;
  all data of a token block, every head, stays together);
* nets: per (q token block, q head block) the owner plus every computation reading that q block and
  writing its output (weight: q + out + lse bytes), and per (kv token block, kv head block) the owner
  plus every computation reading it (weight: k + v bytes). The km1 objective is then exactly the bytes
  moved in the forward pass.

Mt-KaHyPar (deterministic preset, fixed seed) partitions first across nodes, then across the devices of
each node (data of other nodes used there join the node's graph as light vertices, so the partitioner
also picks the device that receives them). The within-node calls use the same preset with a quarter of the
initial-partitioning runs (``mtkahypar_within_node.ini``): they decide only NVLink traffic, and on 128K-token
batches at 4 x 8 they were most of the planning time. Mt-KaHyPar takes one weight per vertex, so it balances a
normalised, compute-dominant sum of compute and memory; a second pass (:func:`rebalance`) then enforces the two limits
separately (compute within ``compute_imbalance``, tokens within ``memory_imbalance``) with greedy
moves of least km1 increase per unit of load moved. The compute limit is therefore a real constraint,
not a side effect of memory weights (the published planner's weights collapsed to 1 after rescaling).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from dcp_backend.dcp.blocks import BlockSet, block_bytes

_MTK = None
_SCALE = 1_000_000
# Share of compute in the partitioner's single vertex weight (memory gets the rest). Measured on the
# acceptance batch, single long documents and LDC/LongAlign 64K batches at 4x8: 0.9 moved 10-40% fewer
# bytes across nodes than an even 0.5 split, at the same final balance.
COMPUTE_SHARE = 0.9
# Mt-KaHyPar context of the within-node partitions: the deterministic preset with 5 initial-partitioning runs
# instead of 20 (measured in docs/BENCHMARKS.md, "Planning time: lighter within-node partitions").
WITHIN_NODE_CONTEXT = os.path.join(os.path.dirname(__file__), "mtkahypar_within_node.ini")


def _mtk():
    global _MTK
    if _MTK is None:
        import mtkahypar

        _MTK = mtkahypar.initialize(1)
    return _MTK


@dataclass(eq=False)
class Hypergraph:
    """CSR hypergraph: net ``e`` has pins ``pins[offsets[e]:offsets[e+1]]``."""

    num_vertices: int
    offsets: np.ndarray
    pins: np.ndarray
    net_weight: np.ndarray  # float bytes

    @property
    def num_nets(self) -> int:
        return int(self.offsets.size - 1)

    def net_of_pin(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_nets), np.diff(self.offsets))

    def subgraph(self, keep_vertex: np.ndarray) -> tuple["Hypergraph", np.ndarray]:
        """Induced hypergraph on the kept vertices (nets with fewer than 2 kept pins dropped).

        Returns the subgraph and the old vertex id of every new vertex.
        """
        old_ids = np.nonzero(keep_vertex)[0]
        new_id = np.full(self.num_vertices, -1, dtype=np.int64)
        new_id[old_ids] = np.arange(old_ids.size)
        net = self.net_of_pin()
        kept = keep_vertex[self.pins]
        net, pins = net[kept], new_id[self.pins[kept]]
        sizes = np.bincount(net, minlength=self.num_nets)
        good = sizes >= 2
        sel = good[net]
        net, pins = net[sel], pins[sel]
        remap = np.cumsum(good) - 1
        net = remap[net]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(net, minlength=int(good.sum())))])
        return Hypergraph(old_ids.size, offsets, pins, self.net_weight[good]), old_ids

    def km1(self, part: np.ndarray, k: int) -> float:
        counts = self.pin_counts(part, k)
        lam = (counts > 0).sum(axis=1)
        return float((self.net_weight * np.maximum(lam - 1, 0)).sum())

    def pin_counts(self, part: np.ndarray, k: int) -> np.ndarray:
        net = self.net_of_pin()
        counts = np.zeros((self.num_nets, k), dtype=np.int64)
        np.add.at(counts, (net, part[self.pins]), 1)
        return counts


def build_hypergraph(bs: BlockSet, element_size: int, partial_dtype: str = "fp32") -> Hypergraph:
    """Vertices: computation blocks [0, n_comp) then token blocks [n_comp, n_comp + n_tb). Net weights: the
    bytes a training step moves for the block (forward and backward, :func:`block_bytes`), so km1 over
    devices is the bytes moved and km1 over nodes is exactly the inter-node bytes of the compiled plan
    with hierarchical communication (one crossing per input and node, one reduced partial per node)."""
    h = bs.heads
    n_q, n_kv, n_comp, n_tb = h.n_q_blocks, h.n_kv_blocks, bs.n_comp, bs.n_tb
    comp = np.arange(n_comp, dtype=np.int64)
    pair, k = comp // n_q, comp % n_q
    q_net = bs.pair_q[pair] * n_q + k
    kv_net = n_tb * n_q + bs.pair_kv[pair] * n_kv + h.kv_of_q(k)
    num_nets = n_tb * n_q + n_tb * n_kv
    data_vertex = n_comp + np.arange(n_tb, dtype=np.int64)
    own_q_net = (np.arange(n_tb)[:, None] * n_q + np.arange(n_q)[None, :]).reshape(-1)
    own_kv_net = (n_tb * n_q + np.arange(n_tb)[:, None] * n_kv + np.arange(n_kv)[None, :]).reshape(-1)
    net = np.concatenate([q_net, kv_net, own_q_net, own_kv_net])
    vert = np.concatenate([comp, comp, np.repeat(data_vertex, n_q), np.repeat(data_vertex, n_kv)])
    order = np.lexsort((vert, net))
    net, vert = net[order], vert[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(net, minlength=num_nets))])
    b = block_bytes(bs, element_size, partial_dtype)
    weights = np.concatenate([b["q_fwd"] + b["out_fwd"] + b["q_bwd"] + b["dq"], 2 * b["kv"] + b["dkv"]])
    hg = Hypergraph(n_comp + n_tb, offsets, vert, weights)
    sizes = np.diff(offsets)
    if (sizes < 2).any():  # a token block nobody reads (custom masks): drop its net
        hg, _ = hg.subgraph(np.ones(hg.num_vertices, bool))
    return hg


def placement_costs(hg: Hypergraph, comp_dev: np.ndarray, owner: np.ndarray, comp_cost: np.ndarray, mem: np.ndarray,
                    k: int, devices_per_node: int) -> dict:
    """Bytes a placement moves per training step (``inter``: across nodes, exactly the compiled plan's with
    hierarchical communication; ``total``: between devices) and its balance (max/mean of compute and of
    tokens per device)."""
    part = np.concatenate([comp_dev, owner])
    node = part // devices_per_node
    comp = np.bincount(comp_dev, weights=comp_cost, minlength=k)
    tokens = np.bincount(owner, weights=mem, minlength=k)
    return {"inter": hg.km1(node, k // devices_per_node), "total": hg.km1(part, k),
            "compute_imbalance": float(comp.max() / max(comp.mean(), 1e-30)),
            "memory_imbalance": float(tokens.max() / max(tokens.mean(), 1e-30))}


def _int_weights(x: np.ndarray, total: int) -> np.ndarray:
    s = x.sum()
    if s <= 0:
        return np.ones(x.size, dtype=np.int64)
    return np.maximum(1, np.round(x * (total / s))).astype(np.int64)


def mtkahypar_context(within_node: bool = False):
    """Mt-KaHyPar's deterministic preset, or for within-node partitions the same with fewer
    initial-partitioning runs (``WITHIN_NODE_CONTEXT``). Both give the same partition on every machine.
    A Mt-KaHyPar that cannot read the file (another version's option names) gets the preset, with a warning:
    planning is then slower, never different between ranks."""
    import mtkahypar

    mtk = _mtk()
    if within_node:
        try:
            return mtk.context_from_file(WITHIN_NODE_CONTEXT)
        except (mtkahypar.InvalidParameterError, mtkahypar.InvalidInputError) as exc:
            warnings.warn(f"dcp: Mt-KaHyPar could not read {WITHIN_NODE_CONTEXT} ({str(exc).strip()}); within-node "
                          f"partitions use its deterministic preset instead (slower planning). mtkahypar 1.7 reads "
                          f"it; tests/dcp_backend/dcp/test_placement.py checks it against the installed version")
    return mtk.context_from_preset(mtkahypar.PresetType.DETERMINISTIC)


def mtkahypar_partition(hg: Hypergraph, vertex_weight: np.ndarray, k: int, epsilon: float, seed: int,
                        within_node: bool = False) -> np.ndarray:
    """Partition into ``k`` blocks minimising km1 with Mt-KaHyPar (:func:`mtkahypar_context`)."""
    import mtkahypar

    if k == 1 or hg.num_vertices == 0:
        return np.zeros(hg.num_vertices, dtype=np.int64)
    if hg.num_vertices <= k:  # nothing to optimise: one vertex per block
        return np.arange(hg.num_vertices, dtype=np.int64)
    mtk = _mtk()
    ctx = mtkahypar_context(within_node)
    ctx.set_partitioning_parameters(k, max(float(epsilon), 0.01), mtkahypar.Objective.KM1)
    ctx.logging = False
    mtkahypar.set_seed(int(seed))
    pins = [hg.pins[hg.offsets[e]:hg.offsets[e + 1]].tolist() for e in range(hg.num_nets)]
    vw = _int_weights(np.asarray(vertex_weight, dtype=np.float64), _SCALE).tolist()
    nw = _int_weights(hg.net_weight, _SCALE // 10).tolist() if hg.num_nets else []
    graph = mtk.create_hypergraph(ctx, hg.num_vertices, hg.num_nets, pins, vw, nw)
    phg = graph.partition(ctx)
    return np.asarray([phg.block_id(v) for v in range(hg.num_vertices)], dtype=np.int64)


def greedy_partition(bs: BlockSet, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Solver-free placement: whole documents onto the least-loaded device (largest first); documents
    larger than a device's share are dealt block by block. Computation goes to the q block's owner."""
    cost_tb = np.bincount(bs.pair_q, weights=bs.pair_count.astype(np.float64), minlength=bs.n_tb)
    doc_cost = np.bincount(bs.tb_doc, weights=cost_tb, minlength=bs.batch.num_docs)
    share = doc_cost.sum() / num_devices
    load = np.zeros(num_devices)
    owner = np.zeros(bs.n_tb, dtype=np.int64)
    for d in np.argsort(-doc_cost, kind="stable"):  # loop over documents
        blocks = np.nonzero(bs.tb_doc == d)[0]
        if doc_cost[d] <= share or blocks.size == 1:
            dev = int(np.argmin(load))
            owner[blocks] = dev
            load[dev] += doc_cost[d]
        else:
            for b in blocks[np.argsort(-cost_tb[blocks], kind="stable")]:
                dev = int(np.argmin(load))
                owner[b] = dev
                load[dev] += cost_tb[b]
    comp_dev = owner[bs.pair_q[bs.comp_pair(np.arange(bs.n_comp))]]
    return owner, comp_dev


@dataclass(eq=False)
class Placement:
    owner: np.ndarray  # device of every token block
    comp_device: np.ndarray  # device of every computation block
    num_devices: int
    devices_per_node: int
    source: str = "hypergraph"  # the strategy (or structured seed) this placement came from
    candidates: dict | None = None  # seeded selection: every candidate's bytes and balance

    def node_of(self, device):
        return np.asarray(device) // self.devices_per_node


def place(bs: BlockSet, comp_cost: np.ndarray, num_devices: int, devices_per_node: int, *, compute_imbalance: float,
          memory_imbalance: float, inter_node_factor: float, seed: int, partitioner: str,
          element_size: int = 2, hg: Hypergraph | None = None) -> Placement:
    n_comp, n_tb = bs.n_comp, bs.n_tb
    if num_devices == 1:
        return Placement(np.zeros(n_tb, np.int64), np.zeros(n_comp, np.int64), 1, devices_per_node)
    hg = build_hypergraph(bs, element_size) if hg is None else hg
    mem = bs.tb_tokens.astype(np.float64)
    if partitioner == "greedy":
        owner, comp_dev = greedy_partition(bs, num_devices)
    else:
        # One combined weight: compute and memory each normalised to the same total.
        # One combined weight, compute-dominant (each normalised, then 0.9 : 0.1): the partitioner's
        # balance then mostly follows compute, and the repair below enforces both limits exactly.
        weight = np.concatenate([COMPUTE_SHARE * comp_cost / max(comp_cost.sum(), 1e-30),
                                 (1 - COMPUTE_SHARE) * mem / max(mem.sum(), 1e-30)])
        nodes = num_devices // devices_per_node
        eps = min(compute_imbalance, memory_imbalance)
        if nodes > 1:
            node_part = mtkahypar_partition(hg, weight, nodes, eps * inter_node_factor, seed)
        else:
            node_part = np.zeros(hg.num_vertices, dtype=np.int64)
        device = node_part * devices_per_node
        if devices_per_node > 1:
            for n in range(nodes):
                local = node_part == n
                # Data of other nodes read here join as light vertices (the partitioner picks the gateway).
                used_here = _data_used_by(hg, local, n_comp)
                keep = local | used_here
                if not local.any():
                    continue
                sub, old = hg.subgraph(keep)
                w = np.where(local[old], weight[old], 0.0)
                w = np.maximum(w, 1e-9 * max(w.max(), 1e-30))
                part = mtkahypar_partition(sub, w, devices_per_node, eps, seed + 1 + n, within_node=True)
                sel = local[old]
                device[old[sel]] = n * devices_per_node + part[sel]
        comp_dev, owner = device[:n_comp], device[n_comp:]
    comp_dev, owner = rebalance(hg, comp_dev.copy(), owner.copy(), comp_cost, mem, num_devices, devices_per_node,
                                compute_imbalance, memory_imbalance)
    return Placement(owner, comp_dev, num_devices, devices_per_node, source="hypergraph")


def _data_used_by(hg: Hypergraph, local_vertex: np.ndarray, n_comp: int) -> np.ndarray:
    """Token-block vertices (not local) sharing a net with a local computation vertex."""
    net = hg.net_of_pin()
    is_comp_local = (hg.pins < n_comp) & local_vertex[hg.pins]
    nets_touched = np.zeros(hg.num_nets, dtype=bool)
    nets_touched[net[is_comp_local]] = True
    out = np.zeros(hg.num_vertices, dtype=bool)
    data_pin = (hg.pins >= n_comp) & nets_touched[net]
    out[hg.pins[data_pin]] = True
    return out & ~local_vertex


class _Rebalancer:
    """The state of one greedy repair: the partition, per-net pin counts per device, and vertex -> nets."""

    def __init__(self, hg: Hypergraph, part: np.ndarray, k: int, devices_per_node: int):
        self.hg, self.part, self.k = hg, part, k
        self.counts = hg.pin_counts(part, k)
        net = hg.net_of_pin()
        order = np.argsort(hg.pins, kind="stable")  # incidence: vertex -> its nets (CSR)
        self.v_nets = net[order]
        self.v_off = np.concatenate([[0], np.cumsum(np.bincount(hg.pins, minlength=hg.num_vertices))])
        self.node = np.arange(k) // devices_per_node

    def delta_matrix(self, vs: np.ndarray, src: int) -> np.ndarray:
        """km1 change of moving each vertex in vs from src to every device (vectorised over vs)."""
        v_off, k = self.v_off, self.k
        deg = v_off[vs + 1] - v_off[vs]
        out = np.zeros((vs.size, k))
        nz = deg > 0
        if not nz.any():
            return out
        # Net weights are whole bytes, so these float sums are exact in any order.
        if (deg == 2).all():  # computation vertices: their q net and their kv net
            nets = self.v_nets[(v_off[vs][:, None] + np.arange(2)).reshape(-1)].reshape(-1, 2)
            weight = self.hg.net_weight[nets]
            pins0, pins1 = self.counts[nets[:, 0]], self.counts[nets[:, 1]]  # [vs, k]
            gain = weight[:, 0] * (pins0[:, src] == 1) + weight[:, 1] * (pins1[:, src] == 1)
            out = weight[:, :1] * (pins0 == 0) + weight[:, 1:] * (pins1 == 0) - gain[:, None]
        else:
            first = np.concatenate([[0], np.cumsum(deg[nz])[:-1]])
            nets = self.v_nets[np.repeat(v_off[vs][nz] - first, deg[nz]) + np.arange(int(deg[nz].sum()))]
            pins = self.counts[nets]  # [pins of all vs, k]
            weight = self.hg.net_weight[nets][:, None]
            contrib = weight * ((pins == 0).astype(float) - (pins[:, src] == 1).astype(float)[:, None])
            out[nz] = np.add.reduceat(contrib, first, axis=0)
        inter = self.node != self.node[src]
        return np.where(out > 0, out * np.where(inter, 4.0, 1.0)[None, :], out)

    def move(self, v: int, src: int, dst: int) -> None:
        nets = self.v_nets[self.v_off[v]:self.v_off[v + 1]]
        self.counts[nets, src] -= 1
        self.counts[nets, dst] += 1
        self.part[v] = dst

    def repair(self, is_candidate: np.ndarray, load_of: np.ndarray, limit: float, moves_left: int) -> int:
        """Move candidate vertices off the most loaded device until every device is under
        ``limit`` x the mean load (or no move helps); returns the moves left."""
        k, part = self.k, self.part
        loads = np.zeros(k)
        np.add.at(loads, part[is_candidate], load_of[is_candidate])
        cap = limit * loads.sum() / k
        while moves_left > 0:
            src = int(np.argmax(loads))
            excess = loads[src] - cap
            if excess <= 1e-9 * max(cap, 1):
                break
            vs = np.nonzero(is_candidate & (part == src))[0]
            if vs.size == 0:
                break
            lw = load_of[vs]
            room = cap - loads
            feasible = (lw[:, None] <= room[None, :] + 1e-9) & (np.arange(k)[None, :] != src)
            if not feasible.any():
                # Nothing fits under the cap: move the smallest vertex to the least loaded device if that
                # lowers the maximum.
                i = int(np.argmin(lw))
                dst = int(np.argmin(loads))
                if loads[dst] + lw[i] >= loads[src]:
                    break
            else:
                if vs.size > 256:  # consider the vertices most worth moving first (bounded work per move)
                    pick = np.argsort(-lw, kind="stable")[:256]
                    vs, lw, feasible = vs[pick], lw[pick], feasible[pick]
                delta = self.delta_matrix(vs, src)
                score = np.where(feasible, delta / np.maximum(np.minimum(lw, excess)[:, None], 1e-30), np.inf)
                i, dst = np.unravel_index(int(np.argmin(score)), score.shape)
            self.move(int(vs[i]), src, int(dst))
            loads[src] -= lw[i]
            loads[dst] += lw[i]
            moves_left -= 1
        return moves_left


def rebalance(hg: Hypergraph, comp_dev: np.ndarray, owner: np.ndarray, comp_cost: np.ndarray, mem: np.ndarray,
              k: int, devices_per_node: int, compute_imbalance: float, memory_imbalance: float,
              max_moves: int | None = None):
    """Greedy repair so that tokens and compute each respect their own limit (if moves allow it).

    A move takes one vertex from an overloaded device to a device with room, choosing the move with
    the least km1 increase per unit of load moved (a byte across nodes counts ``4x``). Memory is
    repaired first (token blocks), then compute (computation blocks).
    """
    n_comp = comp_dev.size
    part = np.concatenate([comp_dev, owner])
    fixer = _Rebalancer(hg, part, k, devices_per_node)
    max_moves = max_moves if max_moves is not None else 4 * hg.num_vertices
    all_load = np.concatenate([comp_cost, mem])
    is_data = np.zeros(part.size, bool)
    is_data[n_comp:] = True
    left = fixer.repair(is_data, all_load, 1 + memory_imbalance, max_moves)
    fixer.repair(~is_data, all_load, 1 + compute_imbalance, left)
    return part[:n_comp], part[n_comp:]
