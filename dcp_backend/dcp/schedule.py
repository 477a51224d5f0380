"""Stage scheduling: split each device's computation into a local stage and ``num_stages`` stages whose
inputs are received while the previous stage computes.

* Stage 0 holds the computation blocks whose inputs are all on their device (no communication).
* Stages 1..S: each device receives its remote inputs in per-stage budgets of about 1/S of its total
  receive cost (a byte across nodes costs ``inter_node_cost``); a greedy picks, at every step, the
  pending computation that unlocks the most compute per byte still missing. The last stage takes the
  rest, so every computation is scheduled.
* An input needed by several devices of one node crosses the network once: it goes to the device of
  that node that needs it first (the *gateway*), which forwards it inside the node as an ordinary
  transfer of the stage that needs it, launched before the previous stage computes. When a node-mate
  needs the block in the gateway's own stage s >= 2, the gateway receives it in stage s - 1 so that the
  forward still overlaps compute; only stage-1 relays go as a second phase right after the first
  arrives (nothing computes before stage 0 to hide them behind).
* Partial results (forward out/lse; backward dq, dk/dv) go back to the owner after the last stage that
  touches them on the computing device.

Forward and backward get their own schedules (backward moves q, out, dout and lse for a query block,
and returns dq and dk/dv), over the same placement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcp_backend.dcp.blocks import BlockSet
from dcp_backend.dcp.partition import Placement

KIND_Q, KIND_KV = 0, 1  # input blocks: query side (q; backward also out, dout, lse) and key/value side


@dataclass(eq=False)
class Transfers:
    """Parallel arrays, one entry per transfer."""

    kind: np.ndarray
    block: np.ndarray  # q-side id (tb * n_q + k) or kv id (tb * n_kv + m)
    src: np.ndarray
    dst: np.ndarray
    stage: np.ndarray  # stage whose computation needs it (or, for outputs, after which it is sent)
    phase: np.ndarray  # 1: direct / inter-node; 2: forwarded inside the destination node

    @classmethod
    def empty(cls) -> "Transfers":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, z, z)

    @classmethod
    def concat(cls, parts: list["Transfers"]) -> "Transfers":
        parts = [p for p in parts if p.kind.size]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("kind", "block", "src", "dst", "stage", "phase")))

    def __len__(self) -> int:
        return int(self.kind.size)


@dataclass(eq=False)
class PassSchedule:
    comp_stage: np.ndarray  # stage of every computation block
    inputs: Transfers  # input transfers
    outputs: Transfers  # partial results returned to owners (phase 1, after `stage`)
    num_stages: int  # S (stages are 0..S)


def comp_inputs(bs: BlockSet):
    """(q-side id, kv id) of every computation block."""
    h = bs.heads
    comp = np.arange(bs.n_comp, dtype=np.int64)
    pair, k = comp // h.n_q_blocks, comp % h.n_q_blocks
    return bs.pair_q[pair] * h.n_q_blocks + k, bs.pair_kv[pair] * h.n_kv_blocks + h.kv_of_q(k)


def schedule_pass(bs: BlockSet, pl: Placement, comp_cost: np.ndarray, q_bytes: np.ndarray, kv_bytes: np.ndarray,
                  num_stages: int, inter_node_cost: float, kv_outputs: bool) -> PassSchedule:
    """Schedule one pass. ``q_bytes``/``kv_bytes``: bytes of each q-side / kv input block in this pass;
    ``kv_outputs``: whether kv-side partial results return to owners (backward dk/dv)."""
    h = bs.heads
    qid, kvid = comp_inputs(bs)
    q_owner = pl.owner[qid // h.n_q_blocks]
    kv_owner = pl.owner[kvid // h.n_kv_blocks]
    dev = pl.comp_device
    dpn = pl.devices_per_node
    q_remote = q_owner != dev
    kv_remote = kv_owner != dev
    comp_stage = np.zeros(bs.n_comp, dtype=np.int64)
    S = num_stages
    # stage at which each (device, input) is needed: filled per device
    need_kind, need_block, need_dev, need_stage = [], [], [], []
    for p in range(pl.num_devices):  # loop over devices; the work inside is vectorised
        mine = np.nonzero(dev == p)[0]
        remote = mine[q_remote[mine] | kv_remote[mine]]
        if remote.size == 0:
            continue
        # Local input index space for this device: q-side inputs, then kv inputs.
        qi = np.where(q_remote[remote], qid[remote], -1)
        ki = np.where(kv_remote[remote], kvid[remote], -1)
        uq = np.unique(qi[qi >= 0])
        uk = np.unique(ki[ki >= 0])
        nq = uq.size
        q_loc = np.where(qi >= 0, np.searchsorted(uq, np.maximum(qi, 0)), -1)
        k_loc = np.where(ki >= 0, nq + np.searchsorted(uk, np.maximum(ki, 0)), -1)
        inter_q = pl.node_of(pl.owner[uq // h.n_q_blocks]) != p // dpn
        inter_k = pl.node_of(pl.owner[uk // h.n_kv_blocks]) != p // dpn
        cost = np.concatenate([q_bytes[uq] * np.where(inter_q, inter_node_cost, 1.0),
                               kv_bytes[uk] * np.where(inter_k, inter_node_cost, 1.0)])
        ready_at = np.full(cost.size, -1, dtype=np.int64)  # stage an input arrives (-1: not scheduled)
        work = comp_cost[remote]
        stage_of = np.full(remote.size, -1, dtype=np.int64)
        budget = cost.sum() / S
        for s in range(1, S + 1):
            spent = 0.0
            while True:
                pend = stage_of < 0
                if not pend.any():
                    break
                miss_q = (q_loc >= 0) & (ready_at[np.maximum(q_loc, 0)] < 0)
                miss_k = (k_loc >= 0) & (ready_at[np.maximum(k_loc, 0)] < 0)
                missing = np.where(miss_q, cost[np.maximum(q_loc, 0)], 0.0) + np.where(miss_k, cost[np.maximum(k_loc, 0)], 0.0)
                ready = pend & (missing == 0)
                if ready.any():
                    stage_of[ready] = s
                    continue
                if s < S:
                    score = np.where(pend, missing / np.maximum(work, 1e-30), np.inf)
                    i = int(np.argmin(score))
                    if spent > 0 and spent + missing[i] > budget:
                        break
                else:
                    i = int(np.argmax(pend))
                spent += missing[i]
                if miss_q[i]:
                    ready_at[q_loc[i]] = s
                if miss_k[i]:
                    ready_at[k_loc[i]] = s
        comp_stage[remote] = stage_of
        # first stage each input is needed (the stage it was scheduled for)
        used = np.concatenate([q_loc[q_loc >= 0], k_loc[k_loc >= 0]])
        used_stage = np.concatenate([stage_of[q_loc >= 0], stage_of[k_loc >= 0]])
        first = np.full(cost.size, S + 1, dtype=np.int64)
        np.minimum.at(first, used, used_stage)
        need_kind.append(np.concatenate([np.full(nq, KIND_Q), np.full(uk.size, KIND_KV)]))
        need_block.append(np.concatenate([uq, uk]))
        need_dev.append(np.full(cost.size, p))
        need_stage.append(first)
    inputs = _route(pl, h, need_kind, need_block, need_dev, need_stage)
    outputs = _outputs(bs, pl, comp_stage, qid, kvid, kv_outputs)
    return PassSchedule(comp_stage, inputs, outputs, S)


def _route(pl: Placement, h, need_kind, need_block, need_dev, need_stage) -> Transfers:
    """Turn (input, device, stage) needs into transfers; one inter-node crossing per (input, node)."""
    if not need_kind:
        return Transfers.empty()
    kind = np.concatenate(need_kind)
    block = np.concatenate(need_block)
    dst = np.concatenate(need_dev)
    stage = np.concatenate(need_stage)
    tb = np.where(kind == KIND_Q, block // h.n_q_blocks, block // h.n_kv_blocks)
    src = pl.owner[tb]
    dpn = pl.devices_per_node
    inter = (src // dpn) != (dst // dpn)
    phase = np.ones(kind.size, dtype=np.int64)
    if inter.any():
        idx = np.nonzero(inter)[0]
        # group by (kind, block, destination node); gateway = earliest stage, then lowest device id
        key_node = dst[idx] // dpn
        order = np.lexsort((dst[idx], stage[idx], key_node, block[idx], kind[idx]))
        idx = idx[order]
        k_, b_, n_ = kind[idx], block[idx], dst[idx] // dpn
        first = np.ones(idx.size, dtype=bool)
        first[1:] = (k_[1:] != k_[:-1]) | (b_[1:] != b_[:-1]) | (n_[1:] != n_[:-1])
        group = np.cumsum(first) - 1
        gate_pos = np.nonzero(first)[0]
        gateway = dst[idx[gate_pos]][group]
        gate_stage = stage[idx[gate_pos]][group]
        follower = ~first
        fi = idx[follower]
        src[fi] = gateway[follower]  # forwarded from the gateway inside the node
        same = stage[fi] == gate_stage[follower]
        # A follower that needs the block in the gateway's own stage: when that stage is 2 or later, the
        # gateway receives the block one stage early, so the forward is an ordinary transfer launched
        # before the previous stage computes (overlapped), not a relay behind that compute. Only stage-1
        # relays remain second-phase transfers (nothing computes before stage 0 to hide them behind).
        early = np.zeros(idx.size, dtype=bool)
        early_groups = np.unique(group[follower][same & (gate_stage[follower] >= 2)])
        early[np.isin(group, early_groups) & first] = True
        stage[idx[early]] -= 1
        phase[fi] = np.where(same & (gate_stage[follower] < 2), 2, 1)
    return Transfers(kind, block, src, dst, stage, phase)


def _outputs(bs: BlockSet, pl: Placement, comp_stage, qid, kvid, kv_outputs: bool) -> Transfers:
    """Partial q-side results (out/lse or dq) and kv-side results (dk/dv) that must reach the owner."""
    h = bs.heads
    dev = pl.comp_device
    parts = []
    sides = ((KIND_Q, qid, h.n_q_blocks), (KIND_KV, kvid, h.n_kv_blocks)) if kv_outputs else ((KIND_Q, qid, h.n_q_blocks),)
    for kind, ids, per in sides:
        owner = pl.owner[ids // per]
        rem = owner != dev
        if not rem.any():
            continue
        key_dev, key_blk, st = dev[rem], ids[rem], comp_stage[rem]
        order = np.lexsort((key_blk, key_dev))
        key_dev, key_blk, st = key_dev[order], key_blk[order], st[order]
        first = np.ones(key_dev.size, dtype=bool)
        first[1:] = (key_dev[1:] != key_dev[:-1]) | (key_blk[1:] != key_blk[:-1])
        starts = np.nonzero(first)[0]
        last_stage = np.maximum.reduceat(st, starts)
        d, b = key_dev[starts], key_blk[starts]
        parts.append(Transfers(np.full(d.size, kind), b, d, pl.owner[b // per], last_stage,
                               np.ones(d.size, dtype=np.int64)))
    return Transfers.concat(parts)
