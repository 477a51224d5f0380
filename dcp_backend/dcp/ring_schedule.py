"""The ring-shaped schedule of a DCP pass (``DCPOptions.schedule="ring"``): LoongTrain's double ring in DCP's own
instructions, over any placement.

Devices form *ring positions* of ``group`` consecutive devices (the 2D zigzag placement's head groups; 1
otherwise) and *windows* of the positions of one node. A key/value block owned at position ``Q`` visits the
positions in double-ring order: the rest of its own window (inner ring), then each later window (outer ring),
entering it at ``Q``'s offset and sweeping it the same way. A device at outer distance ``o`` and inner distance
``i`` from the block's owner computes with it in stage ``1 + o * w + i`` (``w`` positions per window); stage 0
holds the computations whose query and key/value blocks are both its own.

* A block travels from needer to needer of one chain (the devices of one head slot that read it, in visiting
  order): inside a window from the previous needer, one stage before it is needed; into a window received up
  to ``w`` stages early, spread over those stages, from the previous window's needer that holds it last before
  that launch (a node's crossings then use every NIC in every stage and overlap a whole inner sweep, as
  LoongTrain's outer ring does). So every block crosses into each node once per head slot, and a device holds only the blocks of
  its current and next steps and of its next crossing.
* Backward: a block's dK/dV partial travels along the same chain and accumulates: every needer sends its
  partial to the next needer (which sums it into the rows of the block it is computing with) and the last
  one sends the total to the owner. Query blocks (and forward outputs) move as usual: to the computing device
  before their first use, their partial back to the owner after their last.

Every piece is an ordinary input or output transfer (:class:`~dcp_backend.dcp.schedule.Transfers`), so the
compiler, the verifier, the statistics, the simulator and the executor run it unchanged.
"""
from __future__ import annotations

import numpy as np

from dcp_backend.dcp.blocks import BlockSet
from dcp_backend.dcp.partition import Placement
from dcp_backend.dcp.schedule import KIND_KV, KIND_Q, PassSchedule, Transfers, comp_inputs


def ring_stages(pl: Placement, comp_dev: np.ndarray, kv_owner: np.ndarray, group: int) -> np.ndarray:
    """Stage ``1 + o * w + i`` of a device reading a block owned at outer distance ``o`` and inner distance
    ``i`` (in ring positions of ``group`` devices, ``w`` positions per node)."""
    w = pl.devices_per_node // group
    windows = pl.num_devices // pl.devices_per_node
    p, q = comp_dev // group, kv_owner // group
    return 1 + ((p // w - q // w) % windows) * w + (p % w - q % w) % w


def ring_schedule(bs: BlockSet, pl: Placement, kv_outputs: bool, group: int = 1, lead: int | None = None) -> PassSchedule:
    """Schedule one pass in double-ring order (see the module docstring); ``kv_outputs``: the backward
    pass (dK/dV partials travel with their blocks and return to the owners); ``lead``: how many stages before
    its first use a block crossing into a node may be received (default: the positions of a node, a whole
    inner sweep; 1 = the stage before, the least memory)."""
    if pl.devices_per_node % group:
        raise ValueError(f"ring group {group} must divide devices_per_node {pl.devices_per_node}")
    h = bs.heads
    dpn = pl.devices_per_node
    w = dpn // group
    lead = w if lead is None else max(1, int(lead))
    qid, kvid = comp_inputs(bs)
    dev = pl.comp_device
    q_owner = pl.owner[qid // h.n_q_blocks]
    kv_owner = pl.owner[kvid // h.n_kv_blocks]
    stage = ring_stages(pl, dev, kv_owner, group)
    local_kv = kv_owner == dev
    stage[local_kv] = np.where(q_owner[local_kv] == dev[local_kv], 0, 1)
    stage[(stage == 0) & (q_owner != dev)] = 1

    q_blk, q_dev, q_src, q_first, q_last = _remote_queries(qid, q_owner, dev, stage)
    ones = np.ones(q_blk.size, dtype=np.int64)
    inputs = [Transfers(KIND_Q * ones, q_blk, q_src, q_dev, q_first, ones)]  # from the owner, for the first use
    outputs = [Transfers(KIND_Q * ones, q_blk, q_dev, q_src, q_last, ones)]  # the partial home after the last
    # key/value chains: (block, head slot) -> needers in stage order
    rem = ~local_kv
    top = int(stage.max()) + 1
    code = np.unique((kvid[rem] * pl.num_devices + dev[rem]) * top + stage[rem])
    st, pair = code % top, code // top
    blk, d = pair // pl.num_devices, pair % pl.num_devices
    order = np.lexsort((st, d % group, blk))
    blk, d, st = blk[order], d[order], st[order]
    owner = pl.owner[blk // h.n_kv_blocks]
    src = np.empty_like(d)
    launch = st - 1
    chain_start = np.ones(blk.size, dtype=bool)
    chain_start[1:] = (blk[1:] != blk[:-1]) | (d[1:] % group != d[:-1] % group)
    outer = (st - 1) // w
    spread = []  # (index, earliest launch): crossings received early, spread over the stages they may use
    holders = {}  # crossing index -> (first, end) indices of the needers of the previous window that holds it
    first_of_outer = 0  # index of the first needer of the latest outer step seen in this chain
    for j in range(blk.size):
        if chain_start[j]:
            first_of_outer = j
            src[j] = owner[j]
            crossing = owner[j] // dpn != d[j] // dpn
            spread.append((j, max(0, int(st[j]) - lead) if crossing else int(st[j]) - 1))
        elif outer[j] == outer[j - 1]:  # inside a window: from the previous needer, one stage before
            src[j] = d[j - 1]
        else:  # entering a window: from the previous window's needer that holds it last before the launch
            holders[j] = (first_of_outer, j)
            spread.append((j, max(int(st[first_of_outer]), int(st[j]) - lead)))
            first_of_outer = j
    _spread_launches(spread, d, st, launch)
    for j, (a, b) in holders.items():
        src[j] = d[a + int(np.searchsorted(st[a:b], launch[j], "right")) - 1]
    inputs.append(Transfers(np.full(blk.size, KIND_KV), blk, src, d, launch + 1, np.ones(blk.size, dtype=np.int64)))

    if kv_outputs:  # each needer's partial to the next needer of its chain, the last one's to the owner
        last = np.append(chain_start[1:], True)
        nxt = np.arange(blk.size) + 1
        dst = np.where(last, owner, d[np.minimum(nxt, blk.size - 1)])
        # a partial is reduced one stage after its key's launch, into rows the receiver must have by then
        next_launch = np.where(last, 0, launch[np.minimum(nxt, blk.size - 1)])
        out_stage = np.maximum(st, next_launch - 1)
        outputs.append(Transfers(np.full(blk.size, KIND_KV), blk, d, dst, out_stage, np.ones(blk.size, dtype=np.int64)))
    inputs, outputs = Transfers.concat(inputs), Transfers.concat(outputs)
    num_stages = int(max(stage.max(initial=0), inputs.stage.max(initial=0)))
    return PassSchedule(stage, inputs, outputs, num_stages)


def _spread_launches(spread: list, d: np.ndarray, st: np.ndarray, launch: np.ndarray) -> None:
    """Launch stages of the early receipts: a device's receipts that need their block at one stage are
    spread evenly over the stages they may launch in (the last one as late as it can, so memory is held no
    earlier than the spread needs)."""
    groups: dict = {}
    for j, lo in spread:
        groups.setdefault((int(d[j]), int(st[j])), []).append((j, lo))
    for (_, s), members in groups.items():
        k = len(members)
        for r, (j, lo) in enumerate(members):
            span = s - 1 - lo + 1
            launch[j] = s - 1 - ((k - 1 - r) * span) // k


def _remote_queries(qid: np.ndarray, q_owner: np.ndarray, dev: np.ndarray, stage: np.ndarray):
    """Per (query block, computing device that does not own it): the block, the device, the owner, and the
    first and last stage the device computes with it."""
    rem = q_owner != dev
    width = int(dev.max(initial=0)) + 1
    key, inv = np.unique(qid[rem] * width + dev[rem], return_inverse=True)
    first = np.full(key.size, np.iinfo(np.int64).max)
    last = np.full(key.size, -1, dtype=np.int64)
    np.minimum.at(first, inv, stage[rem])
    np.maximum.at(last, inv, stage[rem])
    owner = np.zeros(key.size, dtype=np.int64)
    owner[inv] = q_owner[rem]
    return key // width, key % width, owner, first, last
