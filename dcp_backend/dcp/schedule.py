"""Stage scheduling: split each device's computation into a local stage and ``num_stages`` stages whose
inputs are received while the previous stage computes.

* Stage 0 holds the computation blocks whose inputs are all on their device (no communication).
* Stages 1..S: each device receives its remote inputs in per-stage budgets of about 1/S of its total
  receive cost (a byte across nodes costs ``inter_node_cost``); a greedy picks, at every step, the
  pending computation that unlocks the most compute per byte still missing. The last stage takes the
  rest, so every computation is scheduled. A stage whose device is behind on compute (by the end of
  stage s, less than s/S of its remote computation ready) receives past its budget, up to
  ``FRONT_LOAD_LIMIT`` budgets: pairs of two remote blocks unlock compute only once both arrived, so
  equal bytes per stage would leave most of such a device's compute to its last stages, where its
  node-mates' partials and the pass's end wait for it (not under a slot budget, which bounds bytes).
* Under a slot budget a device holds one side of its remote-query x remote-key pairs and streams the
  other; when the held side does not fit ``REFETCH_GROUP_BUDGETS`` slot budgets it is held in groups, one
  after another, and a streamed block is received again for every group that reads it (a block can then
  have several *receipts* on a device in one pass: :func:`receipt_of` says which one each reader, forward
  and result send uses, and each receipt returns its own partial result). Memory for bytes.
* An input needed by several devices of one node crosses the network once: it goes to the device of
  that node that needs it first (the *gateway*; of several, the one receiving the fewest inter-node
  bytes in that stage), which forwards it inside the node as an ordinary transfer of the stage that
  needs it, launched before the previous stage computes. When a node-mate needs the block in the
  gateway's own stage s >= 2, the gateway receives it in stage s - 1 so that the forward still overlaps
  compute; only stage-1 forwards go as a second phase right after the first arrives (nothing computes
  before stage 0 to hide them behind).
* A crossing leaves its source node from the device with the fewest inter-node bytes to send in that
  stage among the owner, node-mates that already hold the block, and (stage >= 2) any node-mate as a
  relay that receives it from the owner a stage before; so a node's traffic uses all its devices' NICs.
* Partial results (forward out/lse; backward dq, dk/dv) go back to the owner after the last stage that
  touches them on the computing device. Partials of one block computed on several devices of a node
  other than the owner's are first reduced inside that node (on the contributor that finishes last),
  so one partial per (block, node) crosses the network; a reducer sends one stage after the others'
  partials arrived (key ``out{S+1}`` when that is past the last stage).

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
    outputs: Transfers  # partial results to owners or in-node reducers (sent after stage `stage`, 0..S+1)
    num_stages: int  # S (stages are 0..S)


def comp_inputs(bs: BlockSet):
    """(q-side id, kv id) of every computation block."""
    h = bs.heads
    comp = np.arange(bs.n_comp, dtype=np.int64)
    pair, k = comp // h.n_q_blocks, comp % h.n_q_blocks
    return bs.pair_q[pair] * h.n_q_blocks + k, bs.pair_kv[pair] * h.n_kv_blocks + h.kv_of_q(k)


def receipt_of(inputs: Transfers, dev, kind, block, stage) -> np.ndarray:
    """The receipt (index into ``inputs``) through which ``dev`` uses received ``(kind, block)`` at
    ``stage``: of the transfers of that block into the device, the latest whose stage is at most
    ``stage``, else the earliest; -1 where it receives no such block. A block received once per pass has
    one receipt, which every use maps to; one received again (re-fetch under a slot budget) has one per
    residency. The compiler (slots, rows), the scheduler (a partial result per receipt) and the memory
    count all map uses by this one rule, so they agree even where a use outlives a residency (its slot
    then stays busy that long)."""
    dev, kind, block, stage = (np.asarray(a, dtype=np.int64) for a in (dev, kind, block, stage))
    n = len(inputs)
    if n == 0:
        return np.full(dev.shape, -1, dtype=np.int64)
    m = int(max(int(inputs.block.max()), int(block.max(initial=0)))) + 1
    big = int(max(int(inputs.stage.max()), int(stage.max(initial=0)))) + 2
    code_in = (inputs.dst * 2 + inputs.kind) * m + inputs.block
    order = np.lexsort((inputs.stage, code_in))
    sc = code_in[order]
    comb = sc * big + inputs.stage[order]
    q = (dev * 2 + kind) * m + block
    lo = np.searchsorted(sc, q, "left")
    hi = np.searchsorted(sc, q, "right")
    pos = np.searchsorted(comb, q * big + np.clip(stage, 0, big - 1), "right") - 1
    pos = np.where(pos >= lo, pos, lo)
    return np.where(hi > lo, order[np.minimum(pos, n - 1)], -1)


def receipt_busy(bs: BlockSet, pl: Placement, sched: "PassSchedule", backward: bool, hold: int):
    """Per input transfer (a *receipt*), the stages its rows are busy on its receiver, as five arrays:

    * ``launch``, ``input_end``: its input rows (q, and backward out/dout/lse; or k/v) from the stage its
      receiver launches it (``stage - 1``) to its last reader and the forwards launched from it;
    * ``result_start``, ``result_end``: its result rows (forward out/lse; backward dq, dk/dv), on a side with
      results, from the first stage that computes into them or reduces a received partial into them (the
      stage after that partial's key) to its last reader, those reductions and its result sends (readers and
      sends plus ``hold``: a partial sent in place is read until its wait); ``result_start`` is -1 where the
      receipt has no result rows;
    * ``first_read``: the first stage that computes with it (a large number where none does).

    Each use is mapped to its receipt by :func:`receipt_of`. Cached on the schedule (the compiler asks once per
    device)."""
    cache = sched.__dict__.setdefault("_busy", {})
    if (backward, hold) in cache:
        return cache[(backward, hold)]
    inputs, outputs = sched.inputs, sched.outputs
    n = len(inputs)
    launch = inputs.stage - 1
    end = launch.copy()
    r_start = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    r_end = np.full(n, -1, dtype=np.int64)
    first_read = r_start.copy()
    if n:
        qid, kvid = comp_inputs(bs)
        dev, st = pl.comp_device, sched.comp_stage
        has_results = {KIND_Q: True, KIND_KV: backward}
        for kind, ids in ((KIND_Q, qid), (KIND_KV, kvid)):
            r = receipt_of(inputs, dev, np.full(dev.size, kind), ids, st)
            ok = r >= 0
            np.maximum.at(end, r[ok], st[ok])
            np.minimum.at(first_read, r[ok], st[ok])
            if has_results[kind]:
                np.minimum.at(r_start, r[ok], st[ok])
                np.maximum.at(r_end, r[ok], st[ok] + hold)
        r = receipt_of(inputs, inputs.src, inputs.kind, inputs.block, inputs.stage - 1)  # forwards
        ok = r >= 0
        np.maximum.at(end, r[ok], inputs.stage[ok] - 1)
        if len(outputs):
            r = receipt_of(inputs, outputs.src, outputs.kind, outputs.block, outputs.stage)  # result sends
            ok = r >= 0
            np.maximum.at(r_end, r[ok], outputs.stage[ok] + hold)
            r = receipt_of(inputs, outputs.dst, outputs.kind, outputs.block, outputs.stage)  # reduced into
            ok = r >= 0
            np.minimum.at(r_start, r[ok], outputs.stage[ok] + 1)
            np.maximum.at(r_end, r[ok], outputs.stage[ok] + 1)
    r_start = np.where(r_end >= 0, r_start, -1)
    cache[(backward, hold)] = (launch, end, r_start, r_end, first_read)
    return cache[(backward, hold)]


def repeated_receipts(inputs: Transfers) -> np.ndarray:
    """Per input transfer: whether its receiver receives the same block more than once in the pass."""
    if not len(inputs):
        return np.zeros(0, dtype=bool)
    code = (inputs.dst * 2 + inputs.kind) * (int(inputs.block.max()) + 1) + inputs.block
    _, inv, counts = np.unique(code, return_inverse=True, return_counts=True)
    return counts[inv] > 1


def schedule_pass(bs: BlockSet, pl: Placement, comp_cost: np.ndarray, q_bytes: np.ndarray, kv_bytes: np.ndarray,
                  num_stages: int, inter_node_cost: float, kv_outputs: bool, out_bytes: dict | None = None,
                  hierarchical: bool = True) -> PassSchedule:
    """Schedule one pass with ``num_stages`` communication stages on every device (see
    :class:`PassScheduler` for the arguments)."""
    return PassScheduler(bs, pl, comp_cost, q_bytes, kv_bytes, inter_node_cost, kv_outputs, out_bytes,
                         hierarchical).schedule(np.full(pl.num_devices, num_stages))


class PassScheduler:
    """Schedules one pass; a device's stage assignment depends only on its own stage count, so
    :meth:`schedule` with new counts for some devices reuses the others' (the memory limit raises the
    counts of the devices over it, :func:`dcp_backend.dcp.plan.plan_from_placement`).

    ``q_bytes``/``kv_bytes``: bytes of each q-side / kv input block in this pass; ``kv_outputs``: whether
    kv-side partial results return to owners (backward dk/dv); ``out_bytes``: {kind: bytes of each block's
    partial result} (balances the reducers' sends); ``hierarchical``: spread crossings over the node's
    devices and reduce partial results inside a node (else every crossing leaves from the owner and every
    partial goes straight to the owner); ``slot_bytes``: {kind: bytes of the slot a received block of that
    kind occupies} (what a device's slot budget counts, :meth:`schedule`); ``result_hold``: stages a slot
    stays busy after the stage that sends its partial result (:func:`dcp_backend.dcp.compile.result_send_hold`)."""

    def __init__(self, bs: BlockSet, pl: Placement, comp_cost: np.ndarray, q_bytes: np.ndarray,
                 kv_bytes: np.ndarray, inter_node_cost: float, kv_outputs: bool, out_bytes: dict | None = None,
                 hierarchical: bool = True, slot_bytes: dict | None = None, result_hold: int = 1):
        self.bs, self.pl, self.comp_cost = bs, pl, comp_cost
        self.result_hold = result_hold
        self.slot_bytes = slot_bytes or {KIND_Q: 0.0, KIND_KV: 0.0}
        self.in_bytes = {KIND_Q: q_bytes, KIND_KV: kv_bytes}
        self.out_bytes = out_bytes if out_bytes is not None else dict(self.in_bytes)
        self.inter_node_cost, self.kv_outputs, self.hierarchical = inter_node_cost, kv_outputs, hierarchical
        h = bs.heads
        self.qid, self.kvid = comp_inputs(bs)
        dev = pl.comp_device
        self.q_remote = pl.owner[self.qid // h.n_q_blocks] != dev
        self.kv_remote = pl.owner[self.kvid // h.n_kv_blocks] != dev
        order = np.argsort(dev, kind="stable")
        bounds = np.searchsorted(dev[order], np.arange(pl.num_devices + 1))
        self.mine = [order[bounds[p]:bounds[p + 1]] for p in range(pl.num_devices)]
        self._cache: dict = {}  # (device, stages) -> (remote comps, their stages, need kinds, blocks, stages)

    def schedule(self, device_stages: np.ndarray, arrival_cap: np.ndarray | None = None,
                 slot_budget: np.ndarray | None = None, refetch: bool = False) -> PassSchedule:
        """Stages ``1..device_stages[p]`` for device ``p`` (its last one takes the rest); the pass has as many
        stages as its busiest device. ``arrival_cap``: per device, the most rows of partial results it
        receives under one key (later ones are sent a key later; None: no cap). ``slot_budget``: per device,
        the most slot bytes (``slot_bytes``) busy at once when a stage's inputs launch (the stage before):
        blocks pending computations still read, blocks read last in that stage or whose partial result's
        send is still in flight, and the stage's new blocks (inf: no budget); a device
        whose budget is finite takes as many stages as its budget needs (at least ``device_stages[p]``).
        ``refetch``: such a device may hold the held side in groups and receive streamed blocks again."""
        bs, pl = self.bs, self.pl
        if slot_budget is None:
            slot_budget = np.full(pl.num_devices, np.inf)
        comp_stage = np.zeros(bs.n_comp, dtype=np.int64)
        need_kind, need_block, need_dev, need_stage = [], [], [], []
        S = int(np.max(device_stages))
        for p in range(pl.num_devices):  # loop over devices; the work inside is vectorised
            limited = bool(np.isfinite(slot_budget[p]))
            key = (p, int(device_stages[p]), float(slot_budget[p]), refetch and limited)
            if key not in self._cache:
                self._cache[key] = self._device(p, int(device_stages[p]), float(slot_budget[p]), refetch)
            got = self._cache[key]
            if got is None:
                continue
            remote, stage_of, kinds, blocks, first = got
            S = max(S, int(stage_of.max()))
            comp_stage[remote] = stage_of
            need_kind.append(kinds)
            need_block.append(blocks)
            need_dev.append(np.full(kinds.size, p))
            need_stage.append(first)
        brief = np.isfinite(slot_budget)
        inputs = _route(pl, bs.heads, need_kind, need_block, need_dev, need_stage, self.in_bytes, S,
                        self.hierarchical, brief)
        outputs = _outputs(bs, pl, comp_stage, self.qid, self.kvid, self.kv_outputs, self.out_bytes, S,
                           self.hierarchical, inputs, brief=brief)
        if arrival_cap is not None:
            outputs = _spread_arrivals(bs, pl, outputs, arrival_cap, brief)
        return PassSchedule(comp_stage, inputs, outputs, S)

    def _device(self, p: int, S: int, slot_budget: float = np.inf, refetch: bool = False):
        """Stages of device ``p``'s computations with remote inputs, in ``S`` stages: each stage receives
        about 1/S of its receive cost (more while its ready compute is behind s/S of the total, up to
        ``FRONT_LOAD_LIMIT`` times that); a greedy picks the pending computation that unlocks the most
        compute per byte still missing. With a finite ``slot_budget`` a stage receives only while the slots
        busy at its launch stay within it (past it only for its first computation, and only when no slot is
        draining; else it receives nothing and the next stage has more room), stages continue past ``S`` until every
        computation is scheduled, and the pick (:func:`_fewest_held_pick`) holds one side of the device's
        remote-query x remote-key pairs whole and streams the other (the side whose whole bytes plus two
        blocks of the other side peak lower; holding a block of that side costs the pick
        ``LIGHT_SIDE_WEIGHT`` of its bytes). With ``refetch``, a held side larger than
        ``REFETCH_GROUP_BUDGETS`` budgets (less two streamed blocks) is held in groups, one after another (a
        group's inputs come from the stage after the previous group's last computation), and every group
        receives the streamed blocks it reads again; an input that also pairs with a local block is received
        for those pairs alone."""
        h, pl = self.bs.heads, self.pl
        dpn = pl.devices_per_node
        qid, kvid, q_remote, kv_remote = self.qid, self.kvid, self.q_remote, self.kv_remote
        mine = self.mine[p]
        remote = mine[q_remote[mine] | kv_remote[mine]]
        if remote.size == 0:
            return None
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
        inc = self.inter_node_cost
        cost = np.concatenate([self.in_bytes[KIND_Q][uq] * np.where(inter_q, inc, 1.0),
                               self.in_bytes[KIND_KV][uk] * np.where(inter_k, inc, 1.0)])
        slot = np.concatenate([np.full(nq, float(self.slot_bytes[KIND_Q])),
                               np.full(uk.size, float(self.slot_bytes[KIND_KV]))])
        limited = np.isfinite(slot_budget)
        pick_slot = slot
        base = np.arange(cost.size)  # local input -> the input it receives again (itself unless a re-fetch)
        group = np.full(remote.size, -1, dtype=np.int64)  # held-side group of a remote x remote pair
        if limited:  # hold one side of the remote x remote pairs whole and stream the other, whichever peaks lower
            both = (q_loc >= 0) & (k_loc >= 0)
            bq, bk = np.unique(q_loc[both]), np.unique(k_loc[both])
            if bq.size and bk.size:
                q_first = slot[bq].sum() + 2 * slot[bk].max() < slot[bk].sum() + 2 * slot[bq].max()
                light = (np.arange(cost.size) < nq) == q_first
                pick_slot = np.where(light, slot * LIGHT_SIDE_WEIGHT, slot)
                held_loc, stream_loc = (q_loc, k_loc) if q_first else (k_loc, q_loc)
                held_side = bq if q_first else bk
                room = REFETCH_GROUP_BUDGETS * slot_budget - 2 * float(slot[bk if q_first else bq].max())
                gid = _groups_within(slot[held_side], room)
                if refetch and gid[-1] > 0:  # the held side does not fit: groups, and the streamed side once per group
                    of = np.zeros(cost.size, dtype=np.int64)
                    of[held_side] = gid
                    idx = np.nonzero(both)[0]
                    group[idx] = g = of[held_loc[idx]]
                    span = int(gid[-1]) + 1
                    for loc in (held_loc, stream_loc):
                        # an input that pairs with a local block too is received for those pairs alone
                        # (they finish as it arrives); a group's pairs read a copy received for that
                        # group (the first group reading a block that pairs only remotely reads the block)
                        first_g = np.full(cost.size, np.iinfo(np.int64).max)
                        np.minimum.at(first_g, loc[idx], g)
                        first_g[loc[~both & (loc >= 0)]] = -1
                        late = g > first_g[loc[idx]]
                        pairs, copy = np.unique(loc[idx[late]] * span + g[late], return_inverse=True)
                        loc[idx[late]] = base.size + copy
                        base = np.concatenate([base, pairs // span])
                    cost, slot, pick_slot = cost[base], slot[base], pick_slot[base]
        n_in = cost.size
        ready_at = np.full(n_in, -1, dtype=np.int64)  # stage an input arrives (-1: not scheduled)
        # stages a slot stays busy after its last reader: its partial result's send is read until its wait
        hold_of = np.where(base < nq, self.result_hold, self.result_hold if self.kv_outputs else 0)
        last = np.full(n_in, -1, dtype=np.int64)  # per input: the stage of its latest scheduled reader
        work = self.comp_cost[remote]
        per_work = np.maximum(work, 1e-30)
        stage_of = np.full(remote.size, -1, dtype=np.int64)
        budget = cost.sum() / S
        total_work, ready_work = work.sum(), 0.0
        current = 0  # the held-side group being computed (groups go one after another)
        last_group = int(group.max())
        grouped = last_group >= 0
        # Kept up to date as inputs arrive (the same values a recomputation from ready_at would give):
        # per computation, whether it is pending and which inputs it still misses; per input, its readers.
        pend = np.ones(remote.size, dtype=bool)
        n_pend = remote.size
        miss_q, miss_k = q_loc >= 0, k_loc >= 0
        order, offsets = _readers(q_loc, k_loc, n_in)
        arrived: list[int] = []  # inputs received since the last readiness check

        def current_pend(c=slice(None)):
            return pend[c] & (group[c] <= current) if grouped else pend[c]

        def amortised(c=slice(None)):
            """A computation's missing bytes, each input's shared by the pending computations that read it
            (a remote query block fetched once serves all its key blocks), per unit of its compute."""
            amort = (np.where(miss_q[c], share[np.maximum(q_loc[c], 0)], 0.0)
                     + np.where(miss_k[c], share[np.maximum(k_loc[c], 0)], 0.0))
            return np.where(current_pend(c), amort / per_work[c], np.inf)

        def refresh():  # readers per missing input change only with the current group
            nonlocal share, score
            pr = current_pend()
            users = np.bincount(np.concatenate([q_loc[pr & miss_q], k_loc[pr & miss_k]]),
                                minlength=n_in).astype(np.float64)
            share = cost / np.maximum(users, 1.0)
            score = amortised()

        def to_fetch(per_input, i):  # a computation's missing inputs, summed over per_input
            return (per_input[q_loc[i]] if miss_q[i] else 0.0) + (per_input[k_loc[i]] if miss_k[i] else 0.0)

        share = score = None
        refresh()
        s = 0
        while n_pend:
            s += 1
            spent = held = draining = 0.0
            if limited:  # the slots busy at s - 1, when this stage's inputs launch: blocks that pending
                # computations still read, and those read last at s - 1 or whose result send is in flight then
                users = np.concatenate([q_loc[pend], k_loc[pend]])
                open_ = np.zeros(n_in, dtype=bool)
                open_[users[users >= 0]] = True
                draining = float(slot[~open_ & (ready_at >= 0) & (last + hold_of >= s - 1)].sum())
                held = float(slot[open_ & (ready_at >= 0)].sum()) + draining
            while n_pend:
                if arrived:  # computations whose last missing input just arrived run in this stage
                    touched = order[offsets[arrived[0]]:offsets[arrived[0] + 1]]
                    if len(arrived) > 1:
                        touched = np.union1d(touched, order[offsets[arrived[1]]:offsets[arrived[1] + 1]])
                    arrived = []
                    score[touched] = amortised(touched)
                    now = touched[pend[touched] & ~miss_q[touched] & ~miss_k[touched]]
                    if now.size:
                        ready = np.zeros(remote.size, dtype=bool)
                        ready[now] = True
                        stage_of[ready] = s
                        for loc in (q_loc[ready], k_loc[ready]):
                            last[loc[loc >= 0]] = s  # stages only grow: the latest reader so far
                        ready_work += work[ready].sum()
                        pend[ready] = False
                        n_pend -= now.size
                        score[ready] = np.inf
                        if current < last_group and not (pend & (group == current)).any():
                            while current < last_group and not (pend & (group == current)).any():
                                current += 1
                            refresh()
                            break  # the next group's inputs come from the next stage on
                        continue
                if grouped and not current_pend().any():
                    current = int(group[pend].min())
                    refresh()
                if s < S or limited:
                    if limited:
                        i = _fewest_held_pick(current_pend(), q_loc, k_loc, miss_q, miss_k, pick_slot, score)
                    else:
                        i = int(np.argmin(score))
                    missing, new_slots = to_fetch(cost, i), to_fetch(slot, i)
                    over_bytes = s < S and spent + missing > budget
                    if over_bytes and not limited and spent + missing <= FRONT_LOAD_LIMIT * budget:
                        # a stage behind on compute (pairs of two remote blocks unlock compute only once
                        # both arrived) receives more now
                        over_bytes = ready_work >= s / S * total_work
                    # a stage receives past the budget only for its first computation, and only when no
                    # slot is draining (else it receives nothing: the next stage has more room)
                    if (spent > 0 or draining > 0) and (over_bytes or held + new_slots > slot_budget):
                        break
                    held += new_slots
                else:
                    i = int(np.argmax(current_pend()))
                    missing = to_fetch(cost, i)
                if not (miss_q[i] or miss_k[i]):  # it would have run already: stop rather than loop forever
                    raise RuntimeError(f"dcp scheduler: device {p} picked computation {int(remote[i])}, which "
                                       "misses no input (readiness bookkeeping out of step; please report)")
                spent += missing
                for x, miss in ((q_loc[i], miss_q), (k_loc[i], miss_k)):
                    if miss[i]:
                        ready_at[x] = s
                        miss[order[offsets[x]:offsets[x + 1]]] = False
                        arrived.append(int(x))
        # first stage each input is needed (the stage it was scheduled for)
        used = np.concatenate([q_loc[q_loc >= 0], k_loc[k_loc >= 0]])
        used_stage = np.concatenate([stage_of[q_loc >= 0], stage_of[k_loc >= 0]])
        first = np.full(cost.size, s + 1, dtype=np.int64)
        np.minimum.at(first, used, used_stage)
        kinds = np.concatenate([np.full(nq, KIND_Q), np.full(uk.size, KIND_KV)])[base]
        blocks = np.concatenate([uq, uk])[base]
        need = first <= s  # every input is read (a re-fetched block's first copy too: it goes to its first group)
        return remote, stage_of, kinds[need], blocks[need], first[need]


def _readers(q_loc: np.ndarray, k_loc: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """The computations reading each input ``x`` (their ``q_loc`` or ``k_loc`` names it; -1: none) as
    ``order[offsets[x]:offsets[x + 1]]``, in index order (an input is on one side only)."""
    loc = np.concatenate([q_loc, k_loc])
    valid = np.nonzero(loc >= 0)[0]
    order = valid[np.argsort(loc[valid], kind="stable")]
    return order % q_loc.size, np.searchsorted(loc[order], np.arange(n_in + 1))


def _groups_within(nbytes: np.ndarray, room: float) -> np.ndarray:
    """Consecutive groups of blocks whose bytes add up to at most ``room`` (at least one block each):
    the group of every block, 0, 1, ..."""
    gid = np.zeros(nbytes.size, dtype=np.int64)
    g, acc = 0, 0.0
    for i, b in enumerate(nbytes.tolist()):
        if acc > 0 and acc + b > room:
            g, acc = g + 1, 0.0
        gid[i] = g
        acc += b
    return gid


def _fewest_held_pick(pend, q_loc, k_loc, miss_q, miss_k, slot, score) -> int:
    """The pending computation to fetch inputs for next under a slot budget: the one leaving the fewest
    slot bytes held afterwards (inputs it brings that other pending computations still read with another
    missing input, minus held inputs whose pending computations all wait for an input it brings), then
    the lowest ``score``. So a device finishes with a received block before it opens the next."""
    n_in = slot.size
    idx = np.nonzero(pend)[0]  # only pending computations count (and ties go to the first, as before)
    q_loc, k_loc, miss_q, miss_k, score = q_loc[idx], k_loc[idx], miss_q[idx], miss_k[idx], score[idx]

    def single_partner(of, partner):
        """Per input: its partner if every pair (input, partner) names the same one, else -1; and whether
        it has a pair at all (a zero variance of the partners: sums of small integers, exact in float64)."""
        count = np.bincount(of, minlength=n_in).astype(np.float64)
        s1 = np.bincount(of, weights=partner, minlength=n_in)
        s2 = np.bincount(of, weights=partner.astype(np.float64) ** 2, minlength=n_in)
        has = count > 0
        same = has & (s2 * count == s1 * s1)
        return np.where(same, (s1 / np.maximum(count, 1.0)).astype(np.int64), -1), has

    # held inputs (arrived, remote) whose pending computations wait for one other input each
    one_q = miss_k & ~miss_q & (q_loc >= 0)
    one_k = miss_q & ~miss_k & (k_loc >= 0)
    closer, _ = single_partner(np.concatenate([q_loc[one_q], k_loc[one_k]]),
                               np.concatenate([k_loc[one_q], q_loc[one_k]]))
    c = closer >= 0
    gain = np.bincount(closer[c], weights=slot[c], minlength=n_in)
    # missing inputs read by pending computations with another missing input (they stay held once fetched,
    # unless that other input is the one fetched with them)
    two = miss_q & miss_k
    partner, lingers = single_partner(np.concatenate([q_loc[two], k_loc[two]]),
                                      np.concatenate([k_loc[two], q_loc[two]]))
    mq, mk = np.maximum(q_loc, 0), np.maximum(k_loc, 0)
    other_q = np.where(miss_k, k_loc, -1)  # for a missing q input, the kv input fetched with it
    other_k = np.where(miss_q, q_loc, -1)
    # (a partner of -1 means several different ones: the input lingers whatever is fetched with it)
    opened = (np.where(miss_q & lingers[mq] & ((partner[mq] < 0) | (partner[mq] != other_q)), slot[mq], 0.0)
              + np.where(miss_k & lingers[mk] & ((partner[mk] < 0) | (partner[mk] != other_k)), slot[mk], 0.0))
    net = opened - np.where(miss_q, gain[mq], 0.0) - np.where(miss_k, gain[mk], 0.0)
    best = np.nonzero(net <= net.min() + 1e-9 * max(abs(float(net.min())), 1.0))[0]
    return int(idx[best[np.argmin(score[best])]])


class _Loads:
    """Inter-node bytes each device sends and receives per stage (the routing choices balance them)."""

    def __init__(self, num_devices: int, num_stages: int):
        self.egress = np.zeros((num_devices, num_stages + 2))
        self.ingress = np.zeros((num_devices, num_stages + 2))


LIGHT_SIDE_WEIGHT = 0.1  # under a slot budget, what holding a block of the side held whole costs the pick
REFETCH_GROUP_BUDGETS = 2.0  # under a slot budget, a held-side group's slot bytes (plus two streamed blocks)
FRONT_LOAD_LIMIT = 3.0  # without a slot budget, a stage behind on compute receives up to this many byte budgets
BRIEF_HOLD_STAGES = 2  # a device under a slot budget forwards a received block at most this many stages on


def _route(pl: Placement, h, need_kind, need_block, need_dev, need_stage, in_bytes: dict, S: int,
           hierarchical: bool = True, brief: np.ndarray | None = None) -> Transfers:
    """Turn (input, device, stage) needs into transfers: one inter-node crossing per (input, node).

    Inside the destination node the crossing lands on a *gateway* (a device that needs the input first;
    hierarchical: of those, the one receiving the fewest inter-node bytes in that stage), which forwards
    it to its node-mates. On the source side the crossing leaves from the owner, or (hierarchical) from
    the node-mate with the fewest inter-node bytes to send in that stage among the owner, the node-mates
    that already hold the input (they need it earlier) and, for crossings of stage 2 or later, any
    node-mate as a *relay* that receives it from the owner one stage before; so a node's traffic is
    spread over its devices (and their NICs) rather than carried by the few owners.
    """
    if not need_kind:
        return Transfers.empty()
    kind = np.concatenate(need_kind)
    block = np.concatenate(need_block)
    dst = np.concatenate(need_dev)
    stage = np.concatenate(need_stage)
    tb = np.where(kind == KIND_Q, block // h.n_q_blocks, block // h.n_kv_blocks)
    src = pl.owner[tb].copy()
    dpn = pl.devices_per_node
    inter = (src // dpn) != (dst // dpn)
    phase = np.ones(kind.size, dtype=np.int64)
    extra: list[tuple] = []  # relay receipts (kind, block, src, dst, stage)
    if inter.any():
        nbytes = np.where(kind == KIND_Q, in_bytes[KIND_Q][np.where(kind == KIND_Q, block, 0)],
                          in_bytes[KIND_KV][np.where(kind == KIND_KV, block, 0)])
        loads = _Loads(pl.num_devices, S)
        # holders in the owner's node: (kind, block) -> {device: index of its intra-node need}
        holders: dict = {}
        for i in np.nonzero(~inter)[0].tolist():
            holders.setdefault((int(kind[i]), int(block[i])), {})[int(dst[i])] = i
        idx = np.nonzero(inter)[0]
        node = dst[idx] // dpn
        order = np.lexsort((dst[idx], stage[idx], node, block[idx], kind[idx]))
        idx, node = idx[order], node[order]
        k_, b_ = kind[idx], block[idx]
        first = np.ones(idx.size, dtype=bool)
        first[1:] = (k_[1:] != k_[:-1]) | (b_[1:] != b_[:-1]) | (node[1:] != node[:-1])
        if brief is not None and brief.any():
            first = _split_brief_groups(first, stage[idx], dst[idx], brief)
            first = _split_repeated(first, dst[idx])
        starts = np.nonzero(first)[0]
        ends = np.append(starts[1:], idx.size)
        s0 = stage[idx[starts]]
        # A follower that needs the block in the gateway's own stage: when that stage is 2 or later, the
        # gateway receives the block one stage early, so the forward is an ordinary transfer launched
        # before the previous stage computes (overlapped), not a relay behind that compute. Only stage-1
        # forwards remain second-phase transfers (nothing computes before stage 0 to hide them behind).
        same = np.zeros(starts.size, dtype=bool)
        multi = ends - starts > 1
        same[multi] = stage[idx[starts[multi] + 1]] == s0[multi]
        crossing = np.where(same & (s0 >= 2), s0 - 1, s0)
        # groups in crossing order (then larger first), so that a relay chosen for an earlier crossing is
        # a holder for later ones
        for g in np.lexsort((-nbytes[idx[starts]], crossing)).tolist():
            members = idx[starts[g]:ends[g]]
            c, g_stage, nb = int(crossing[g]), int(s0[g]), float(nbytes[members[0]])
            cand = members[stage[members] == g_stage]
            gate = int(cand[np.argmin(loads.ingress[dst[cand], c])]) if hierarchical else int(cand[0])
            gateway = int(dst[gate])
            key = (int(kind[gate]), int(block[gate]))
            owner = int(src[gate])
            sender = owner
            if hierarchical:
                sender = _pick_sender(key, owner, c, nb, dpn, loads, holders, stage, brief, extra)
                if sender != owner:
                    held = holders.setdefault(key, {})
                    i = held.get(sender)
                    if i is None:  # a relay: receives the block from the owner one stage before it sends
                        extra.append((key[0], key[1], owner, sender, c - 1))
                        held[sender] = -len(extra)
                    elif i >= 0 and stage[i] > c - 1:  # a node-mate needing it later receives it earlier
                        stage[i] = c - 1
            src[gate] = sender
            stage[gate] = c
            loads.egress[sender, c] += nb
            loads.ingress[gateway, c] += nb
            fol = members[members != gate]
            src[fol] = gateway  # forwarded from the gateway inside the node
            phase[fol] = np.where((stage[fol] == g_stage) & (g_stage < 2), 2, 1)
    tr = Transfers(kind, block, src, dst, stage, phase)
    if extra:
        e = np.array(extra, dtype=np.int64)
        tr = Transfers.concat([tr, Transfers(e[:, 0], e[:, 1], e[:, 2], e[:, 3], e[:, 4],
                                             np.ones(len(extra), dtype=np.int64))])
    return tr


def _split_brief_groups(first: np.ndarray, stage: np.ndarray, dst: np.ndarray, brief: np.ndarray) -> np.ndarray:
    """Cut crossing groups (sorted by stage inside a group) whose first needer is under a slot budget into
    windows of at most ``BRIEF_HOLD_STAGES`` stages: each window crosses the network on its own, so a
    budgeted gateway does not hold a block for a node-mate that needs it much later."""
    first = first.copy()
    s0, lead_brief = 0, False
    for j in range(first.size):
        if not first[j] and lead_brief and stage[j] > s0 + BRIEF_HOLD_STAGES:
            first[j] = True
        if first[j]:
            s0, lead_brief = int(stage[j]), bool(brief[dst[j]])
        elif stage[j] == s0:
            lead_brief = lead_brief or bool(brief[dst[j]])
    return first


def _split_repeated(first: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Cut crossing groups where a device needs the block again (a re-fetch): each receipt of a device
    comes over the network in its own group (a gateway never forwards a block to itself)."""
    first = first.copy()
    seen: set = set()
    for j, d in enumerate(dst.tolist()):
        if first[j] or d in seen:
            first[j] = True
            seen = set()
        seen.add(d)
    return first


def _pick_sender(key, owner: int, c: int, nb: float, dpn: int, loads: _Loads, holders: dict, stage,
                 brief: np.ndarray | None = None, relays: list | None = None) -> int:
    """The device of the owner's node that sends a crossing of stage ``c``: the owner, a node-mate that
    holds the block by then, or (c >= 2) a relay; the least loaded in that stage, the owner on ties, and
    a relay only when it is lighter by more than half the block. A node-mate under a slot budget
    (``brief``) is a holder only if it needs the block, or received it as a relay (``relays``: the relay
    receipts so far), within ``BRIEF_HOLD_STAGES`` of the send (it would hold the block that much longer
    or receive it that much earlier), and never a relay."""
    base = (owner // dpn) * dpn
    held = holders.get(key, {})
    best, best_load = owner, loads.egress[owner, c]
    for d in range(base, base + dpn):
        if d == owner:
            continue
        i = held.get(d)  # an intra-node need, or (negative) an earlier relay receipt, at stage <= c - 1
        if i is None and brief is not None and brief[d]:
            continue  # a device under a slot budget is no relay (the block would take one of its slots)
        if i is not None and brief is not None and brief[d]:
            got = int(stage[i]) if i >= 0 else int(relays[-i - 1][4])
            if abs(got - (c - 1)) > BRIEF_HOLD_STAGES:
                continue
        ready = i is not None and (i < 0 or stage[i] <= c - 1)
        if not ready and c < 2:
            continue
        load = loads.egress[d, c] + (0.0 if ready else 0.5 * nb)
        if load < best_load:
            best, best_load = d, load
    return best


def _outputs(bs: BlockSet, pl: Placement, comp_stage, qid, kvid, kv_outputs: bool, out_bytes: dict,
             S: int, hierarchical: bool = True, inputs: Transfers | None = None,
             brief: np.ndarray | None = None) -> Transfers:
    """Partial q-side results (out/lse or dq) and kv-side results (dk/dv) that must reach the owner.

    A device sends its partial of a block after the last stage that touches it. Hierarchical: the
    partials of one block computed on several devices of a node other than the owner's are first
    reduced inside that node, on the contributor that finishes last (the least loaded of those), so
    one partial per (block, node) crosses the network; the reducer sends after its own last stage and
    one stage after the others' (key ``out{S+1}`` when that is past the last stage). ``brief``: devices
    that hold received blocks as briefly as they can (under a slot budget); a group whose reducer would be
    one of them and would hold the block more than one stage past its own last use is not reduced.
    """
    h = bs.heads
    dev = pl.comp_device
    dpn = pl.devices_per_node
    parts = []
    sides = ((KIND_Q, qid, h.n_q_blocks), (KIND_KV, kvid, h.n_kv_blocks)) if kv_outputs else ((KIND_Q, qid, h.n_q_blocks),)
    loads = _Loads(pl.num_devices, S)
    arrival: dict = {}  # (device, kind, block) -> stage its input arrives for
    if hierarchical and inputs is not None and len(inputs):
        for d_, k_, b_, s_ in zip(inputs.dst.tolist(), inputs.kind.tolist(), inputs.block.tolist(),
                                  inputs.stage.tolist()):
            key = (d_, k_, b_)
            arrival[key] = min(arrival.get(key, s_), s_)
    again = repeated_receipts(inputs) if inputs is not None else np.zeros(0, dtype=bool)
    for kind, ids, per in sides:
        owner = pl.owner[ids // per]
        rem = owner != dev
        if not rem.any():
            continue
        key_dev, key_blk, st = dev[rem], ids[rem], comp_stage[rem]
        # one partial per receipt: a block received again returns a partial from every residency
        rc = (receipt_of(inputs, key_dev, np.full(key_dev.size, kind), key_blk, st) if again.any()
              else np.zeros(key_dev.size, dtype=np.int64))
        order = np.lexsort((rc, key_blk, key_dev))
        key_dev, key_blk, st, rc = key_dev[order], key_blk[order], st[order], rc[order]
        first = np.ones(key_dev.size, dtype=bool)
        first[1:] = (key_dev[1:] != key_dev[:-1]) | (key_blk[1:] != key_blk[:-1]) | (rc[1:] != rc[:-1])
        starts = np.nonzero(first)[0]
        last_stage = np.maximum.reduceat(st, starts)
        d, b = key_dev[starts], key_blk[starts]
        o = pl.owner[b // per]
        dst = o.copy()
        stage = last_stage.copy()
        if hierarchical:  # arrival: every contributor received the block (it is remote to it)
            # (a device receiving the block again sends each residency's partial straight to the owner)
            remote = ((d // dpn) != (o // dpn)) & ~(again[rc[starts]] if again.any() else False)
            ri = np.nonzero(remote)[0]
            if ri.size:
                node = d[ri] // dpn
                order = np.lexsort((d[ri], -last_stage[ri], node, b[ri]))
                ri, node = ri[order], node[order]
                gfirst = np.ones(ri.size, dtype=bool)
                gfirst[1:] = (b[ri][1:] != b[ri][:-1]) | (node[1:] != node[:-1])
                gs = np.nonzero(gfirst)[0]
                ge = np.append(gs[1:], ri.size)
                for g in np.nonzero(ge - gs > 1)[0].tolist():
                    members = ri[gs[g]:ge[g]]
                    # the reducer: the contributor that holds the block first (so every other partial, sent
                    # after its own receipt, finds the reducer's rows ready), then the one finishing last,
                    # then the least loaded
                    arr = np.array([arrival[(int(d[i]), kind, int(b[i]))] for i in members])
                    top = members[arr == arr.min()]
                    top = top[last_stage[top] == last_stage[top].max()]
                    t_guess = min(int(last_stage[members].max()) + 1, S + 1)
                    red = int(top[np.argmin(loads.egress[d[top], t_guess])])
                    others = members[members != red]
                    t = max(int(last_stage[red]), int(last_stage[others].max()) + 1)
                    if brief is not None and brief[d[red]] and t > last_stage[red] + 1:
                        continue  # the reducer would hold the block for long: every partial goes to the owner
                    dst[others] = d[red]
                    stage[red] = t
                    loads.egress[d[red], t] += float(out_bytes[kind][b[red]])
        parts.append(Transfers(np.full(d.size, kind), b, d, dst, stage, np.ones(d.size, dtype=np.int64)))
    return Transfers.concat(parts)


def _spread_arrivals(bs: BlockSet, pl: Placement, outputs: Transfers, cap: np.ndarray,
                     brief: np.ndarray | None = None) -> Transfers:
    """Send partial results later so that no device receives more than ``cap[device]`` rows under one
    key (a received partial is held in temp rows until the wait of its key). The earliest senders keep
    their key; a deferred partial to an in-node reducer delays the reducer's own send as well. A sender
    under a slot budget (``brief``) is never deferred: it would hold the whole received block (inputs and
    result) a stage longer to save the receiver only the result's temp rows."""
    if not len(outputs):
        return outputs
    h = bs.heads
    per = np.where(outputs.kind == KIND_Q, h.n_q_blocks, h.n_kv_blocks)
    rows = bs.tb_tokens[outputs.block // per].astype(np.float64)
    stage = outputs.stage.copy()
    to_reducer = outputs.dst != pl.owner[outputs.block // per]
    # the reducer's own send of each partial sent to a reducer: same (kind, block), from that reducer
    code = lambda kind, block, dev: (dev * 2 + kind) * (bs.n_tb * max(h.n_q_blocks, h.n_kv_blocks)) + block  # noqa: E731
    send_code = code(outputs.kind, outputs.block, outputs.src)
    order = np.argsort(send_code, kind="stable")
    red_send = np.full(len(outputs), -1, dtype=np.int64)
    j = np.nonzero(to_reducer)[0]
    pos = np.searchsorted(send_code[order], code(outputs.kind[j], outputs.block[j], outputs.dst[j]))
    red_send[j] = order[pos]
    fixed = np.zeros(pl.num_devices, dtype=bool) if brief is None else brief
    s = int(stage.min())
    while s <= int(stage.max()):
        at = np.nonzero(stage == s)[0]
        if at.size:
            o = at[np.lexsort((outputs.src[at], outputs.block[at], ~fixed[outputs.src[at]], outputs.dst[at]))]
            d = outputs.dst[o]
            first = np.ones(o.size, dtype=bool)
            first[1:] = d[1:] != d[:-1]
            start = np.maximum.accumulate(np.where(first, np.arange(o.size), 0))
            csum = np.cumsum(rows[o])
            before = csum - rows[o] - (csum[start] - rows[o[start]])  # rows of this device's earlier partials
            late = o[(before > 0) & (before + rows[o] > cap[d]) & ~fixed[outputs.src[o]]]
            if late.size:
                stage[late] += 1
                r = red_send[late]
                r = r[r >= 0]
                stage[r] = np.maximum(stage[r], stage[late[red_send[late] >= 0]] + 1)
        s += 1
    return Transfers(outputs.kind, outputs.block, outputs.src, outputs.dst, stage, outputs.phase)
