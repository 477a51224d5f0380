"""Compilation of a placement and its stage schedules into per-device programs (forward and backward).

For every device and pass: assign rows to received blocks (``block_size``-row slots, reused once the
previous occupant's last reader, forward and result send are done), build one :class:`Attention` per
stage with every computation block of that stage as segments (a segment is one query block against
the concatenation of its key blocks in that stage, with per-row key ranges mapped into it), and emit
the communication, attention and reduction instructions in the global key order shared by all ranks:

    in1  attn0  wait(in1) in1p2 wait(in1p2) out0
    in2  attn1  wait(in2) in2p2 wait(in2p2) wait(out0) out1  ...  attnS  wait(out S-1) outS wait(outS)
    reduce
"""
from __future__ import annotations

import heapq
import time

import numpy as np

from dcp_backend.dtypes import acc_element_size
from dcp_backend.dcp.blocks import BlockSet, block_bytes
from dcp_backend.dcp.instructions import (ACC, MODEL, Attention, Comm, CommOp, DeviceProgram, Fill, Reduce,
                                          StoreSpec, Wait)
from dcp_backend.dcp.partition import Placement
from dcp_backend.dcp.schedule import KIND_KV, KIND_Q, PassSchedule, Transfers, comp_inputs, receipt_busy
from dcp_backend.kernels.work import AttnWork

# The stores of a pass: (name, dtype class, rows are [heads, head_dim]) per side, forward / backward
STORES = {
    False: {KIND_Q: (("q", MODEL, True), ("o", ACC, True), ("lse", ACC, False)),
            KIND_KV: (("k", MODEL, True), ("v", MODEL, True))},
    True: {KIND_Q: (("q", MODEL, True), ("o", MODEL, True), ("do", MODEL, True), ("lse", ACC, False),
                    ("dq", ACC, True)),
           KIND_KV: (("k", MODEL, True), ("v", MODEL, True), ("dk", ACC, True), ("dv", ACC, True))},
}
# (store parts moved for an input block, parts of a result, receiving temp stores) per pass
FWD_INPUT = {KIND_Q: ("q",), KIND_KV: ("k", "v")}
BWD_INPUT = {KIND_Q: ("q", "o", "do", "lse"), KIND_KV: ("k", "v")}
FWD_RESULT = {KIND_Q: (("o", "lse"), ("ro", "rlse"))}
BWD_RESULT = {KIND_Q: (("dq",), ("rdq",)), KIND_KV: (("dk", "dv"), ("rdk", "rdv"))}


class DeviceLayout:
    """Where a device keeps its own tokens: owned token blocks back to back, in block order."""

    def __init__(self, bs: BlockSet, pl: Placement, device: int):
        self.bs = bs
        self.blocks = np.nonzero(pl.owner == device)[0]
        tok = bs.tb_tokens[self.blocks]
        self.num_tokens = int(tok.sum())
        self.tb_offset = np.full(bs.n_tb, -1, dtype=np.int64)
        self.tb_offset[self.blocks] = np.concatenate([[0], np.cumsum(tok)[:-1]]) if tok.size else []

    def global_indices(self) -> np.ndarray:
        return self.bs.tb_global_indices(self.blocks)


class _Rows:
    """Row numbers of blocks inside one device's stores for one pass. A received block's rows are its
    receipt's slots: one in the input stores and, on a side with results, one in the result stores (each
    store kind has its own slots, busy for its own span); the receipt a use at some stage reads is
    :func:`~dcp_backend.dcp.schedule.receipt_of`'s."""

    def __init__(self, bs: BlockSet, layout: DeviceLayout, slots: dict, result_slots: dict, receipts: dict):
        self.bs, self.layout = bs, layout
        self.slots = {False: slots, True: result_slots}  # result? -> {receipt (input transfer): slot index}
        self.receipts = receipts  # (kind, block) -> [(stage, receipt)] sorted
        self._cache: dict = {}
        heads = bs.heads
        self.q_base = layout.num_tokens * heads.n_q_blocks
        self.kv_base = layout.num_tokens * heads.n_kv_blocks

    def receipt(self, kind: int, block: int, stage: int) -> int:
        """receipt_of's rule for one use: the latest receipt not after ``stage``, else the earliest."""
        got = self.receipts[(kind, int(block))]
        pick = got[0][1]
        for st, r in got:
            if st > stage:
                break
            pick = r
        return pick

    def rows(self, kind: int, block: int, stage: int, result: bool = False) -> np.ndarray:
        """Rows of ``block`` as a use at ``stage`` sees them (own rows, or its receipt's slot) in the input
        stores, or the result stores (``result``)."""
        bs = self.bs
        per = bs.heads.n_q_blocks if kind == KIND_Q else bs.heads.n_kv_blocks
        tb, head = divmod(int(block), per)
        tokens = int(bs.tb_tokens[tb])
        offset = self.layout.tb_offset[tb]
        if offset >= 0:  # own rows: head block by head block, so a block is a run
            return head * self.layout.num_tokens + offset + np.arange(tokens, dtype=np.int64)
        return self.slot_rows(kind, self.receipt(kind, block, stage), tokens, result)

    def slot_rows(self, kind: int, receipt: int, tokens: int, result: bool = False) -> np.ndarray:
        base = self.q_base if kind == KIND_Q else self.kv_base
        return base + self.slots[result][receipt] * self.bs.block_size + np.arange(tokens, dtype=np.int64)

    def many(self, kind: int, blocks: np.ndarray, stage: int, result: bool = False) -> np.ndarray:
        """``rows`` of several blocks at one stage, concatenated (each block's rows computed once)."""
        if len(blocks) == 0:
            return np.zeros(0, np.int64)
        cache = self._cache
        out = []
        for b in np.asarray(blocks).tolist():
            r = cache.get((kind, b, stage, result))
            if r is None:
                r = cache[(kind, b, stage, result)] = self.rows(kind, b, stage, result)
            out.append(r)
        return out[0] if len(out) == 1 else np.concatenate(out)


def _assign_slots(entries: list[tuple[int, int, int, int, int]]) -> tuple[dict, dict]:
    """entries: (kind, block, receipt, busy_start, busy_end). Interval colouring per kind: a slot can take
    a new block whose busy span starts strictly after its previous occupant's busy_end. Returns slots (by
    receipt) and counts."""
    slots, counts = {}, {KIND_Q: 0, KIND_KV: 0}
    for kind in (KIND_Q, KIND_KV):
        mine = sorted((entry for entry in entries if entry[0] == kind), key=lambda entry: (entry[3], entry[1], entry[2]))
        busy: list[tuple[int, int]] = []  # heap of (busy_end, slot)
        free: list[int] = []
        for _, block, receipt, launch, end in mine:
            while busy and busy[0][0] < launch:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                slot = heapq.heappop(free)
            else:
                slot = counts[kind]
                counts[kind] += 1
            slots[receipt] = slot
            heapq.heappush(busy, (end, slot))
    return slots, counts


def _segments(bs: BlockSet, comps: np.ndarray, rows: _Rows, stage: int, backward: bool):
    """One segment per (document, query head block) among ``comps``: returns (q_rows, kv_rows, AttnWork,
    q_out_rows, kv_out_rows), the last two the same blocks' rows in the result stores (kv_out_rows is None
    in the forward, which has no key-side results).

    A segment holds the stage's query blocks of one document and head block back to back and its key
    blocks once each (not once per query block: a key block read by several query blocks is gathered, and
    its gradient accumulated, once), both in document order. A query block's key ranges are its
    document-local ranges clipped to each *run* of its partner key blocks that are adjacent in the document
    (and so in the concatenation), then shifted (rows x runs x ranges pieces, generated sorted) and merged;
    key blocks of the segment that are not its partners in this stage stay outside its ranges."""
    heads = bs.heads
    qid, kvid = comp_inputs(bs)
    cq, ck = qid[comps], kvid[comps]
    q_tb, kv_tb = cq // heads.n_q_blocks, ck // heads.n_kv_blocks
    group_key = bs.tb_doc[q_tb] * heads.n_q_blocks + cq % heads.n_q_blocks  # (document, head block)
    order = np.lexsort((kv_tb, q_tb, group_key))
    cq, ck, q_tb, kv_tb, group_key = cq[order], ck[order], q_tb[order], kv_tb[order], group_key[order]
    new_group = np.ones(cq.size, dtype=bool)
    new_group[1:] = group_key[1:] != group_key[:-1]
    group = np.cumsum(new_group) - 1
    n_groups = int(group[-1]) + 1 if group.size else 0
    # the query blocks of every group (each once, in document order) and their row offsets
    new_q = np.ones(cq.size, dtype=bool)
    new_q[1:] = cq[1:] != cq[:-1]
    qseg = np.cumsum(new_q) - 1  # index of the comp's query block among all query blocks of the call
    seg_q, seg_q_group = cq[new_q], group[new_q]
    q_len = bs.tb_tokens[seg_q // heads.n_q_blocks]
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]])  # work row of each query block's first row
    cu_q = np.concatenate([[0], np.cumsum(np.bincount(seg_q_group, weights=q_len, minlength=n_groups))]).astype(np.int64)
    # the key blocks of every group, each once, in document order, and their offsets in the concatenation
    ukey = np.unique(group * (bs.n_tb * heads.n_kv_blocks) + ck)
    u_group, u_kv = ukey // (bs.n_tb * heads.n_kv_blocks), ukey % (bs.n_tb * heads.n_kv_blocks)
    u_len = bs.tb_tokens[u_kv // heads.n_kv_blocks]
    cu_k = np.concatenate([[0], np.cumsum(np.bincount(u_group, weights=u_len, minlength=n_groups))]).astype(np.int64)
    u_off = np.cumsum(u_len) - u_len - cu_k[u_group]
    kv_off = u_off[np.searchsorted(ukey, group * (bs.n_tb * heads.n_kv_blocks) + ck)]
    q_rows = rows.many(KIND_Q, seg_q, stage)
    kv_rows = rows.many(KIND_KV, u_kv, stage)
    # runs of a query block's partner key blocks that are adjacent in the document
    run_first = new_q.copy()
    run_first[1:] |= kv_tb[1:] != kv_tb[:-1] + 1
    starts_idx = np.nonzero(run_first)[0]
    ends_idx = np.append(starts_idx[1:], ck.size) - 1
    run_qseg = qseg[starts_idx]
    rs, re = bs.tb_start[kv_tb[starts_idx]], bs.tb_end[kv_tb[ends_idx]]
    shift = kv_off[starts_idx] - rs
    n_runs = np.bincount(run_qseg, minlength=seg_q.size)
    first_run = np.concatenate([[0], np.cumsum(n_runs)[:-1]])
    # (row, run) pairs per query block, rows in order and each row's runs in order
    pairs = q_len * n_runs
    p_q = np.repeat(np.arange(seg_q.size), pairs)
    p_local = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    p_row = p_local // n_runs[p_q]
    p_run = first_run[p_q] + p_local % n_runs[p_q]
    doc_ranges = bs.ranges[bs.tb_global_start[seg_q // heads.n_q_blocks][p_q] + p_row]  # [pairs, R, 2]
    lo = np.maximum(doc_ranges[..., 0], rs[p_run][:, None])
    hi = np.minimum(doc_ranges[..., 1], re[p_run][:, None])
    live = hi > lo
    work_row = np.broadcast_to((q_start[p_q] + p_row)[:, None], lo.shape)[live]
    sh = shift[p_run][:, None]
    ranges = _merge_runs(work_row, (lo + sh)[live], (hi + sh)[live], int(cu_q[-1]), presorted=True)
    q_out = rows.many(KIND_Q, seg_q, stage, True)
    kv_out = rows.many(KIND_KV, u_kv, stage, True) if backward else None
    return q_rows, kv_rows, AttnWork(cu_q, cu_k, ranges), q_out, kv_out


def _merge_runs(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, num_rows: int, presorted: bool = False) -> np.ndarray:
    """Per row, sort pieces ``[lo, hi)`` (unless ``presorted``: by row, then lo, disjoint), merge touching
    ones, and pack into canonical [rows, R, 2] ranges."""
    if row.size == 0:
        return np.zeros((num_rows, 1, 2), dtype=np.int64)
    if not presorted:
        order = np.lexsort((lo, row))
        row, lo, hi = row[order], lo[order], hi[order]
    new = np.ones(row.size, dtype=bool)
    new[1:] = (row[1:] != row[:-1]) | (lo[1:] > hi[:-1])
    run_first = np.nonzero(new)[0]
    run_row, run_lo = row[run_first], lo[run_first]
    run_hi = np.maximum.reduceat(hi, run_first)
    first_run = np.ones(run_row.size, dtype=bool)
    first_run[1:] = run_row[1:] != run_row[:-1]
    idx_in_row = np.arange(run_row.size) - np.maximum.accumulate(np.where(first_run, np.arange(run_row.size), 0))
    width = int(idx_in_row.max()) + 1
    out = np.zeros((num_rows, width, 2), dtype=np.int64)
    out[run_row, idx_in_row, 0] = run_lo
    out[run_row, idx_in_row, 1] = run_hi
    return out


class _PassCompiler:
    """Compiles one pass (forward or backward) of one device; the phases are its methods, in order."""

    def __init__(self, bs: BlockSet, pl: Placement, sched: PassSchedule, device: int, layout: DeviceLayout,
                 backward: bool, partial_wire: str = ACC):
        self.bs, self.pl, self.sched, self.device, self.layout, self.backward = bs, pl, sched, device, layout, backward
        self.partial_wire = partial_wire
        self.heads = bs.heads
        self.inputs, self.outputs = sched.inputs, sched.outputs
        self.qid, self.kvid = comp_inputs(bs)
        self.my_comps = np.nonzero(pl.comp_device == device)[0]
        if backward:
            self.results, self.in_parts = BWD_RESULT, BWD_INPUT
        else:
            self.results, self.in_parts = FWD_RESULT, FWD_INPUT

    # ------------------------------------------------------------------ rows
    def assign_slots(self) -> tuple[dict, dict]:
        """Slots for the blocks this device receives, one per receipt in the input stores (busy from its
        launch until its last reader and forward are done) and one in the result stores (busy from its first
        computation or reduction until its result send is done), :func:`~dcp_backend.dcp.schedule.receipt_busy`;
        returns the slot counts per kind of both and sets ``self.rows`` and ``self.result_start``."""
        inputs = self.inputs
        recv = np.nonzero(inputs.dst == self.device)[0]
        launch, end, r_start, r_end, first_read = receipt_busy(self.bs, self.pl, self.sched, self.backward,
                                                               result_send_hold(self.partial_wire))
        kinds, blocks, stages = inputs.kind[recv].tolist(), inputs.block[recv].tolist(), inputs.stage[recv].tolist()
        slots, counts = _assign_slots(list(zip(kinds, blocks, recv.tolist(), launch[recv].tolist(),
                                               end[recv].tolist())))
        has = r_start[recv] >= 0
        result_slots, result_counts = _assign_slots(list(zip(
            inputs.kind[recv][has].tolist(), inputs.block[recv][has].tolist(), recv[has].tolist(),
            r_start[recv][has].tolist(), r_end[recv][has].tolist())))
        # the receipts whose result rows are reset in a stage: before its attention where that reads them first,
        # else (their span starts with a partial reduced into them) before its reductions
        self.result_start = {}  # (stage, before its attention?) -> receipts
        for r in recv[has].tolist():
            t = int(r_start[r])
            self.result_start.setdefault((t, bool(first_read[r] == t)), []).append(r)
        receipts: dict = {}
        for kind, block, st, r in sorted(zip(kinds, blocks, stages, recv.tolist())):
            receipts.setdefault((kind, block), []).append((st, r))
        self.rows = _Rows(self.bs, self.layout, slots, result_slots, receipts)
        return counts, result_counts

    def declare_stores(self, prog: DeviceProgram, counts: tuple[dict, dict]) -> None:
        """The pass's stores (own rows, then block-sized slots: input stores and result stores each with
        their own) and the temp stores for received results."""
        heads, block = self.heads, self.bs.block_size
        n = self.layout.num_tokens
        stores = prog.stores
        result_names = {name for names, _ in self.results.values() for name in names}
        for kind, per, hb in ((KIND_Q, heads.n_q_blocks, heads.hb), (KIND_KV, heads.n_kv_blocks, heads.khb)):
            for name, dtype, with_dim in STORES[self.backward][kind]:
                rows = n * per + counts[name in result_names][kind] * block
                stores[name] = StoreSpec(name, rows, hb, with_dim, dtype)
        self.q_store_rows = stores["o" if not self.backward else "dq"].rows
        # results received by this device: temp rows per key (reused by every key, reduced after its wait),
        # in (kind, block, source) order inside a key
        outputs = self.outputs
        incoming = np.nonzero(outputs.dst == self.device)[0]
        self.incoming = incoming[np.lexsort((outputs.src[incoming], outputs.block[incoming], outputs.kind[incoming],
                                             outputs.stage[incoming]))]
        temp_rows = {KIND_Q: 0, KIND_KV: 0}
        used: dict = {}  # (key stage, kind) -> rows used so far
        self.recv_rows = {}  # transfer index -> temp rows
        for i in self.incoming:
            kind, st = int(outputs.kind[i]), int(outputs.stage[i])
            per = heads.n_q_blocks if kind == KIND_Q else heads.n_kv_blocks
            tokens = int(self.bs.tb_tokens[int(outputs.block[i]) // per])
            off = used.get((st, kind), 0)
            self.recv_rows[int(i)] = off + np.arange(tokens, dtype=np.int64)
            used[(st, kind)] = off + tokens
            temp_rows[kind] = max(temp_rows[kind], off + tokens)
        for kind, (src_names, tmp_names) in self.results.items():
            for name, tmp in zip(src_names, tmp_names):
                spec = stores[name]
                wire = ACC if name == "lse" else self.partial_wire  # lse always travels in fp32
                stores[name] = StoreSpec(name, spec.rows, spec.heads, spec.with_dim, spec.dtype,
                                         None if wire == spec.dtype else wire)
                stores[tmp] = StoreSpec(tmp, temp_rows[kind], spec.heads, spec.with_dim, wire)

    # ------------------------------------------------------------------ instruction builders
    def comm(self, key: str, sends_idx, recvs_idx, tr: Transfers, send_parts, recv_parts) -> Comm:
        """One op per peer; a peer's transfers in (kind, block) order on both sides, one block's parts after
        another (each block of a store group is one segment, :func:`~dcp_backend.dcp.instructions.message_segments`)."""
        ops = {}
        for idx, peer_arr, parts_of, side in ((sends_idx, tr.dst, send_parts, "send"),
                                              (recvs_idx, tr.src, recv_parts, "recv")):
            idx = np.asarray(idx, dtype=np.int64)
            idx = idx[np.lexsort((tr.block[idx], tr.kind[idx], peer_arr[idx]))]
            out = []
            for peer in np.unique(peer_arr[idx]).tolist():
                mine = idx[peer_arr[idx] == peer]
                parts = []
                for kind in (KIND_Q, KIND_KV):
                    for i in mine[tr.kind[mine] == kind].tolist():
                        parts.extend(parts_of(kind, i))
                out.append(CommOp(peer, parts))
            ops[side] = out
        return Comm(key, ops["send"], ops["recv"])

    def input_parts(self, kind: int, i: int):
        """A received block goes into its receipt's slot; a forwarded one leaves from the receipt in use
        when its send is launched (the stage before the one that needs it)."""
        inputs = self.inputs
        block = int(inputs.block[i])
        if int(inputs.dst[i]) == self.device:
            rows = self.rows.slot_rows(kind, i, int(self.bs.tb_tokens[block // self._per(kind)]))
        else:
            rows = self.rows.rows(kind, block, int(inputs.stage[i]) - 1)
        return [(name, rows) for name in self.in_parts[kind]]

    def _per(self, kind: int) -> int:
        return self.heads.n_q_blocks if kind == KIND_Q else self.heads.n_kv_blocks

    def result_parts(self, kind: int, i: int):
        rows = self.rows.rows(kind, int(self.outputs.block[i]), int(self.outputs.stage[i]), result=True)
        return [(name, rows) for name in self.results[kind][0]]

    def result_recv(self, kind: int, i: int):
        rows = self.recv_rows[int(i)]
        return [(name, rows) for name in self.results[kind][1]]

    def fills(self, ins: list, stage: int, before_attention: bool) -> None:
        """Reset the result rows of the received blocks whose result span starts at ``stage`` (result slots are
        reused): before its attention (``before_attention``) those it computes into, else those a received
        partial is reduced into first (before its reductions, after their inputs arrived)."""
        received = np.asarray(self.result_start.get((stage, before_attention), []), dtype=np.int64)
        for kind, (names, _) in self.results.items():
            sel = received[self.inputs.kind[received] == kind]
            if sel.size:
                per = self._per(kind)
                tokens = [int(self.bs.tb_tokens[int(self.inputs.block[i]) // per]) for i in sel.tolist()]
                rows, of_rows = (np.concatenate([self.rows.slot_rows(kind, int(i), t, result)
                                                 for i, t in zip(sel.tolist(), tokens)]) for result in (True, False))
                ins.append(Fill(names, rows, of_rows))
                if kind == KIND_Q and not self.backward:
                    self.written[rows] = False

    # ------------------------------------------------------------------ the program
    def stages(self, ins: list) -> None:
        """Communication and attention of every stage, in the key order shared by all devices."""
        inputs, outputs, sched, device = self.inputs, self.outputs, self.sched, self.device
        num_stages = sched.num_stages
        # forward: output rows written since their reset (the pass start, or a received block's Fill)
        self.written = np.zeros(self.q_store_rows, dtype=bool)
        for stage in range(num_stages + 1):
            if stage < num_stages:
                sel = inputs.stage == stage + 1
                first = sel & (inputs.phase == 1)
                recv1 = np.nonzero(first & (inputs.dst == device))[0]
                ins.append(self.comm(f"in{stage + 1}", np.nonzero(first & (inputs.src == device))[0], recv1, inputs,
                                     self.input_parts, self.input_parts))
            self.fills(ins, stage, True)
            comps = self.my_comps[sched.comp_stage[self.my_comps] == stage]
            if comps.size:
                q_rows, kv_rows, work, q_out, kv_out = _segments(self.bs, comps, self.rows, stage, self.backward)
                fresh = np.zeros(0, dtype=np.int64)
                if not self.backward:
                    fresh = np.nonzero(~self.written[q_out])[0]
                    self.written[q_out] = True
                ins.append(Attention(stage, q_rows, kv_rows, work, np.sort(comps), self.backward, fresh, q_out,
                                     kv_out))
            if stage < num_stages:
                ins.append(Wait(f"in{stage + 1}"))
                second = sel & (inputs.phase == 2)
                recv2 = np.nonzero(second & (inputs.dst == device))[0]
                ins.append(self.comm(f"in{stage + 1}p2", np.nonzero(second & (inputs.src == device))[0], recv2,
                                     inputs, self.input_parts, self.input_parts))
                ins.append(Wait(f"in{stage + 1}p2"))
            if stage > 0:
                ins.append(Wait(f"out{stage - 1}"))
                self.fills(ins, stage, False)
                self.reductions(ins, stage - 1)
            osel = outputs.stage == stage
            ins.append(self.comm(f"out{stage}", np.nonzero(osel & (outputs.src == device))[0],
                                 np.nonzero(osel & (outputs.dst == device))[0], outputs, self.result_parts,
                                 self.result_recv))
        # the last stage's partials, then what in-node reducers send on after them (and partials sent late
        # so that a device does not receive too many under one key)
        last = max(num_stages + 1, int(outputs.stage.max(initial=0)))
        for key in range(num_stages + 1, last + 1):
            ins.append(Wait(f"out{key - 1}"))
            self.fills(ins, key, False)
            self.reductions(ins, key - 1)
            osel = outputs.stage == key
            ins.append(self.comm(f"out{key}", np.nonzero(osel & (outputs.src == device))[0],
                                 np.nonzero(osel & (outputs.dst == device))[0], outputs, self.result_parts,
                                 self.result_recv))
        ins.append(Wait(f"out{last}"))
        self.fills(ins, last + 1, False)
        self.reductions(ins, last)

    def reductions(self, ins: list, stage: int) -> None:
        """Merge (forward, log-sum-exp) or sum (backward) the partial results received under key
        ``out{stage}`` into this device's rows of their blocks (owned rows, or a reducer's slot rows)."""
        outputs = self.outputs
        for kind, (dst_names, tmp_names) in self.results.items():
            sel = [i for i in self.incoming if int(outputs.kind[i]) == kind and int(outputs.stage[i]) == stage]
            if not sel:
                continue
            dst_rows = [self.rows.rows(kind, int(outputs.block[i]), stage, result=True) for i in sel]
            src_rows = [self.recv_rows[int(i)] for i in sel]
            if not self.backward:  # one merge instruction per round so destination rows are unique
                occurrence = {}
                rounds: dict[int, list] = {}
                for i, sr, dr in zip(sel, src_rows, dst_rows):
                    block = int(outputs.block[i])
                    rnd = occurrence.get(block, 0)
                    occurrence[block] = rnd + 1
                    rounds.setdefault(rnd, []).append((sr, dr))
                for rnd in sorted(rounds):
                    srs, drs = zip(*rounds[rnd])
                    ins.append(Reduce("merge", tmp_names, dst_names, np.concatenate(srs), np.concatenate(drs)))
                    self.written[ins[-1].dst_rows] = True
            else:
                ins.append(Reduce("sum", tmp_names, dst_names, np.concatenate(src_rows), np.concatenate(dst_rows)))

    def compile(self) -> DeviceProgram:
        prog = DeviceProgram(self.device, self.layout.num_tokens)
        self.declare_stores(prog, self.assign_slots())
        self.stages(prog.instructions)
        return prog


def _pass_program(bs: BlockSet, pl: Placement, sched: PassSchedule, device: int, layout: DeviceLayout,
                  backward: bool, partial_wire: str = ACC) -> DeviceProgram:
    return _PassCompiler(bs, pl, sched, device, layout, backward, partial_wire).compile()


class Programs:
    """Per-device programs of one pass, compiled on first access (a rank needs only its own; statistics,
    the verifier and serialisation compile the rest). Indexable like a list; entries may be preset."""

    def __init__(self, bs: BlockSet, pl: Placement, sched: PassSchedule, layouts, backward: bool,
                 partial_wire: str = ACC):
        self._args = (bs, pl, sched, layouts, backward, partial_wire)
        self._progs: list = [None] * pl.num_devices
        self.compile_seconds = 0.0
        self.device_seconds = [0.0] * pl.num_devices  # compile time of each device's program

    def __len__(self) -> int:
        return len(self._progs)

    def __getitem__(self, d: int) -> DeviceProgram:
        if self._progs[d] is None:
            t0 = time.perf_counter()
            bs, pl, sched, layouts, backward, wire = self._args
            self._progs[d] = _pass_program(bs, pl, sched, d, layouts[d], backward, wire)
            self.device_seconds[d] = time.perf_counter() - t0
            self.compile_seconds += self.device_seconds[d]
        return self._progs[d]

    def __setitem__(self, d: int, prog: DeviceProgram) -> None:
        self._progs[d] = prog

    def __iter__(self):
        return (self[d] for d in range(len(self)))

    def compiled(self) -> list[int]:
        return [d for d, p in enumerate(self._progs) if p is not None]


def compile_programs(bs: BlockSet, pl: Placement, fwd: PassSchedule, bwd: PassSchedule, eager: bool = True,
                     partial_wire: str = ACC):
    """Programs of every device (compiled now if ``eager``, else on first access): returns (layouts,
    forward programs, backward programs). ``partial_wire``: the class partial results travel in (ACC:
    fp32; MODEL: the model dtype, accumulated in fp32 where they are reduced)."""
    layouts = [DeviceLayout(bs, pl, d) for d in range(pl.num_devices)]
    fwd_progs = Programs(bs, pl, fwd, layouts, False, partial_wire)
    bwd_progs = Programs(bs, pl, bwd, layouts, True, partial_wire)
    if eager:
        for d in range(pl.num_devices):
            fwd_progs[d], bwd_progs[d]
    return layouts, fwd_progs, bwd_progs


def result_send_hold(partial_wire: str) -> int:
    """Stages a received block's slot stays busy after the stage whose end launches its result's send: a
    partial converted to the model dtype is copied into a buffer at the launch, so the slot is free for a
    block received from the next stage on (0); one sent in place (fp32) is read until that send's wait,
    in the next stage (1)."""
    return 0 if partial_wire == MODEL else 1


def _store_row_bytes(heads: dict, head_dim: int, backward: bool, element_size: int, part: str = "all") -> dict:
    """Bytes of one row of a pass's stores, per kind, with ``heads[kind]`` heads per row: all stores, or only
    the ``"input"`` or ``"result"`` ones (which have slots of their own)."""
    size = {MODEL: element_size, ACC: acc_element_size(element_size)}
    results = {name for names, _ in (BWD_RESULT if backward else FWD_RESULT).values() for name in names}
    keep = {"all": lambda name: True, "input": lambda name: name not in results,
            "result": lambda name: name in results}[part]
    return {kind: sum(heads[kind] * (head_dim if wd else 1) * size[c]
                      for name, c, wd in STORES[backward][kind] if keep(name)) for kind in (KIND_Q, KIND_KV)}


def row_bytes(bs: BlockSet, backward: bool, element_size: int, part: str = "all") -> dict:
    """Bytes of one row (a token of one head block) of the stores of a side together, per kind: all of them,
    or only its ``"input"`` or ``"result"`` stores."""
    return _store_row_bytes({KIND_Q: bs.heads.hb, KIND_KV: bs.heads.khb}, bs.spec.head_dim, backward,
                            element_size, part)


def token_bytes(spec, backward: bool, element_size: int = 2) -> int:
    """Bytes of one token in every store of a pass, all heads: what a device pays per token it owns."""
    return sum(_store_row_bytes({KIND_Q: spec.num_heads, KIND_KV: spec.num_kv_heads}, spec.head_dim, backward,
                                element_size).values())


def own_memory_bytes(bs: BlockSet, pl: Placement, backward: bool, element_size: int = 2) -> np.ndarray:
    """Bytes of every device's own rows (its tokens in every store) in one pass."""
    tokens = np.bincount(pl.owner, weights=bs.tb_tokens, minlength=pl.num_devices)
    return tokens * token_bytes(bs.spec, backward, element_size)


def pass_memory_bytes(bs: BlockSet, pl: Placement, sched: PassSchedule, backward: bool, element_size: int = 2,
                      partial_wire: str = ACC) -> np.ndarray:
    """Bytes of every device's stores for one pass, from the schedule alone (equal to the compiled
    programs' stores, :func:`dcp_backend.dcp.stats.program_memory_bytes`): own rows, received blocks'
    slots in the input stores and in the result stores (as many of each as are busy at once, the spans of
    :func:`~dcp_backend.dcp.schedule.receipt_busy`, as :meth:`_PassCompiler.assign_slots` colours them) and
    the temp rows of the largest key of received partial results."""
    h = bs.heads
    n = pl.num_devices
    size = {MODEL: element_size, ACC: acc_element_size(element_size)}
    d_ = bs.spec.head_dim
    per = {KIND_Q: h.hb, KIND_KV: h.khb}
    results = BWD_RESULT if backward else FWD_RESULT
    temp_row = {kind: sum(per[kind] * (d_ if name != "lse" else 1) * size[ACC if name == "lse" else partial_wire]
                          for name in names) for kind, (names, _) in results.items()}
    total = own_memory_bytes(bs, pl, backward, element_size)
    # slots: busy intervals [start, end] of every receipt, the most busy at once per (device, kind), for the
    # input stores and the result stores
    inputs, outputs = sched.inputs, sched.outputs
    launch, end, r_start, r_end, _ = receipt_busy(bs, pl, sched, backward, result_send_hold(partial_wire))
    for part, start, stop in (("input", launch, end), ("result", r_start, r_end)):
        row = row_bytes(bs, backward, element_size, part)
        has = r_end >= 0 if part == "result" else np.ones(len(inputs), dtype=bool)
        t0 = -1
        width = int(max(stop.max(initial=0), start.max(initial=0))) - t0 + 2
        diff = np.zeros((n * 2, width), dtype=np.int64)
        row_id = (inputs.dst * 2 + inputs.kind)[has]
        np.add.at(diff, (row_id, start[has] - t0), 1)
        np.add.at(diff, (row_id, stop[has] + 1 - t0), -1)
        slots = np.cumsum(diff, axis=1).max(axis=1).reshape(n, 2)
        total = total + bs.block_size * (slots[:, KIND_Q] * row[KIND_Q] + slots[:, KIND_KV] * row[KIND_KV])
    # temp rows of received partials: the largest key
    if len(outputs):
        tok = bs.tb_tokens[np.where(outputs.kind == KIND_Q, outputs.block // h.n_q_blocks,
                                    outputs.block // h.n_kv_blocks)]
        s_max = int(outputs.stage.max()) + 1
        grid = np.zeros((n, 2, s_max))
        np.add.at(grid, (outputs.dst, outputs.kind, outputs.stage), tok)
        temp = grid.max(axis=2)
        for kind, b in temp_row.items():
            total = total + temp[:, kind] * b
    return total


def pass_buffer_bytes(bs: BlockSet, pl: Placement, sched: PassSchedule, backward: bool, element_size: int = 2,
                      partial_dtype: str = "fp32") -> np.ndarray:
    """Peak bytes of every device's transfer buffers in one pass, from the schedule alone (equal to the compiled
    programs', :func:`dcp_backend.dcp.stats.program_buffer_bytes`). Inputs travel straight from and into the
    stores (:func:`~dcp_backend.dcp.instructions.segment_in_place`); only partial results held in fp32 and sent
    in the model dtype (``partial_dtype="model"``) are converted into a send buffer, alive from the launch of
    their key ``out{s}`` to its wait (the program keeps one such key open at a time)."""
    n = pl.num_devices
    outputs = sched.outputs
    if partial_dtype != "model" or not len(outputs):
        return np.zeros(n)
    b = block_bytes(bs, element_size, partial_dtype)
    out_b = {KIND_Q: b["dq"] if backward else b["out_fwd"], KIND_KV: b["dkv"]}
    kind, block = outputs.kind, outputs.block
    nb = np.where(kind == KIND_Q, out_b[KIND_Q][np.where(kind == KIND_Q, block, 0)],
                  out_b[KIND_KV][np.where(kind == KIND_KV, block, 0)])
    grid = np.zeros((n, int(outputs.stage.max()) + 1))
    np.add.at(grid, (outputs.src, outputs.stage), nb)
    return grid.max(axis=1)
