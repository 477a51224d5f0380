"""Verifier: checks a compiled DCP plan without running it (no process group, no kernels).

It executes every device's forward and backward program *symbolically*, all devices in lockstep over
the shared sequence of communication keys. Rows carry identities instead of numbers: a q-side row is a
(token, query head block), a kv-side row a (token, KV head block), and result rows accumulate a
count and a checksum of what was computed into them. It checks that

* every device issues the same sequence of communication keys, every launch is waited exactly once,
  and every receive has a matching send (same peer, key, dtype classes and sizes, and the same
  segments: the executor's point-to-point ops), and vice versa;
* no instruction reads a row before it was written, or while a transfer into it is in flight, and no
  row sent straight from its store is written before the send's wait;
* every attention segment pairs a query head block with its own KV head block;
* forward: every owner's output rows end with exactly the keys the mask allows (count and sum of key
  token indices per (token, head block)), so every required (query, key, head) pair was computed
  exactly once and every partial result reached its owner (an attention's ``fresh`` rows are
  overwritten, so one written over earlier results loses them and fails here);
* backward: the same for dq, and for dk/dv every key accumulated exactly the queries that see it.

Violations raise :class:`PlanVerificationError` with the device, instruction and what is wrong.
"""
from __future__ import annotations

import numpy as np

from dcp_backend.dcp.instructions import (Attention, Comm, DeviceProgram, Fill, Reduce, Wait, message_segments,
                                          segment_in_place, segment_members, segment_row_elements,
                                          segment_wire_class)

Q_SIDE = ("q", "o", "do", "lse", "dq", "ro", "rlse", "rdq")


class PlanVerificationError(AssertionError):
    pass


def expected_totals(plan):
    """Per (token, q head block): key count and key-index sum; per (token, kv head block): query count
    and query-index sum (backward, all query heads of the block counted once per head block)."""
    bs = plan.blocks
    h = bs.heads
    batch = bs.batch
    r = bs.ranges
    start = batch.cu_seqlens[batch.doc_ids][:, None]
    s, e = r[..., 0] + start, r[..., 1] + start
    n = e - s
    count = n.sum(1).astype(np.float64)
    ksum = ((s + e - 1) * n / 2.0).sum(1)
    t = batch.total_tokens
    diff_c = np.zeros(t + 1)
    diff_s = np.zeros(t + 1)
    tok = np.repeat(np.arange(t, dtype=np.float64)[:, None], r.shape[1], 1)
    live = n > 0
    np.add.at(diff_c, s[live], 1.0)
    np.add.at(diff_c, e[live], -1.0)
    np.add.at(diff_s, s[live], tok[live])
    np.add.at(diff_s, e[live], -tok[live])
    key_count = np.cumsum(diff_c)[:t] * h.q_per_kv
    key_qsum = np.cumsum(diff_s)[:t] * h.q_per_kv
    return count, ksum, key_count, key_qsum


class _Device:
    def __init__(self, plan, prog: DeviceProgram, backward: bool):
        bs = plan.blocks
        h = bs.heads
        self.prog = prog
        self.h = h
        self.head_dim = plan.spec.head_dim
        self.backward = backward
        tokens = plan.layouts[prog.device].global_indices()
        n = tokens.size
        self.ident = {}
        self.valid = {}
        for name, spec in prog.stores.items():
            per = h.n_q_blocks if name in Q_SIDE else h.n_kv_blocks
            ident = np.full(spec.rows, -1, dtype=np.int64)
            # own rows head block by head block: row k * n + t is (token t, head block k)
            local = (tokens[None, :] * per + np.arange(per)[:, None]).reshape(-1) if n else np.zeros(0, np.int64)
            is_input = name in ("q", "k", "v") or (backward and name in ("o", "do", "lse"))
            is_result = name in (("dq", "dk", "dv") if backward else ("o", "lse"))
            if is_input or is_result:
                ident[:local.size] = local
            self.ident[name] = ident
            self.valid[name] = ident >= 0
        self.sending = {name: np.zeros(spec.rows, dtype=np.int64) for name, spec in prog.stores.items()}
        # result accumulators: count and checksum per row
        res = ("dq", "dk", "dv", "rdq", "rdk", "rdv") if backward else ("o", "ro")
        self.acc = {k: (np.zeros(prog.stores[k].rows), np.zeros(prog.stores[k].rows)) for k in res
                    if k in prog.stores}
        self.inflight: dict[str, list] = {}


def _fail(dev, i, what):
    raise PlanVerificationError(f"device {dev.prog.device}, instruction {i}: {what}")


def _segments(dev, op):
    """The executor's ops for one peer's parts: [(store or group, rows, wire class, elements, in place)]."""
    st = dev.prog.stores
    return [(name, rows, segment_wire_class(st, name), rows.size * segment_row_elements(st, name, dev.head_dim),
             segment_in_place(st, name, rows)) for name, rows in message_segments(st, op.parts)]


def _write(dev, i, name, rows, what):
    if rows.size and (dev.sending[name][rows] > 0).any():
        _fail(dev, i, f"{what}: writes rows of {name!r} that an unfinished transfer sends straight from the store")


def _split_at_comms(prog: DeviceProgram):
    segs, cur = [], []
    for i, ins in enumerate(prog.instructions):
        cur.append((i, ins))
        if isinstance(ins, Comm):
            segs.append(cur)
            cur = []
    segs.append(cur)
    return segs


def _read(dev, i, store, rows, what):
    if rows.size == 0:
        return
    if (rows < 0).any() or (rows >= dev.ident[store].size).any():
        _fail(dev, i, f"{what}: rows out of range of store {store!r}")
    if not dev.valid[store][rows].all():
        _fail(dev, i, f"{what}: reads rows of {store!r} that were never written or are still in flight")


def verify_pass(plan, backward: bool) -> None:
    progs = plan.bwd_programs if backward else plan.fwd_programs
    devs = [_Device(plan, p, backward) for p in progs]
    keys = [p.comm_keys() for p in progs]
    if any(k != keys[0] for k in keys):
        raise PlanVerificationError("devices issue different sequences of communication keys")
    h = plan.blocks.heads
    segs = [_split_at_comms(p) for p in progs]
    outbox: dict = {}  # (key, src, dst) -> list of (class, parts [(store, rows)], snapshot)
    for si in range(len(segs[0])):
        for dev, dev_segs in zip(devs, segs):
            for i, ins in dev_segs[si]:
                if isinstance(ins, Comm):
                    if ins.key in dev.inflight:
                        _fail(dev, i, f"key {ins.key!r} launched twice")
                    sent = []
                    for op in ins.sends:
                        op_segs = _segments(dev, op)
                        for name, rows, _, _, in_place in op_segs:
                            if in_place:
                                for m in segment_members(dev.prog.stores, name):
                                    dev.sending[m][rows] += 1
                                    sent.append((m, rows))
                        snap = []
                        for name, rows in op.parts:
                            _read(dev, i, name, rows, f"send {ins.key} to {op.peer}")
                            accs = dev.acc.get(name)
                            snap.append((name, rows.size, dev.ident[name][rows].copy(),
                                         None if accs is None else (accs[0][rows].copy(), accs[1][rows].copy())))
                        outbox[(ins.key, dev.prog.device, op.peer)] = (snap, [s[2:4] for s in op_segs])
                    for op in ins.recvs:
                        for name, rows in op.parts:
                            _write(dev, i, name, rows, f"receive {ins.key} from {op.peer}")
                            dev.valid[name][rows] = False
                    dev.inflight[ins.key] = (ins.recvs, sent)
                elif isinstance(ins, Wait):
                    if ins.key not in dev.inflight:
                        _fail(dev, i, f"wait for {ins.key!r} which was not launched")
                    recvs, sent = dev.inflight.pop(ins.key)
                    for m, rows in sent:
                        dev.sending[m][rows] -= 1
                    for op in recvs:
                        got = outbox.pop((ins.key, op.peer, dev.prog.device), None)
                        if got is None:
                            _fail(dev, i, f"receive from {op.peer} under {ins.key!r} has no matching send")
                        snap, sent_segs = got
                        if sent_segs != [s[2:4] for s in _segments(dev, op)]:
                            _fail(dev, i, f"{ins.key!r} from {op.peer}: the sender's segments (ops, their dtypes and "
                                          f"sizes) differ from the receiver's")
                        if len(snap) != len(op.parts):
                            _fail(dev, i, f"{ins.key!r} from {op.peer}: {len(snap)} parts sent, {len(op.parts)} expected")
                        for (name, rows), (sname, n, ident, accs) in zip(op.parts, snap):
                            if n != rows.size or progs[op.peer].stores[sname].wire_class != dev.prog.stores[name].wire_class:
                                _fail(dev, i, f"{ins.key!r} from {op.peer}: part {sname}->{name} size or dtype differs")
                            dev.ident[name][rows] = ident
                            dev.valid[name][rows] = True
                            if name in dev.acc:
                                if accs is None:
                                    _fail(dev, i, f"{ins.key!r}: result part {name} sent from a non-result store")
                                dev.acc[name][0][rows] = accs[0]
                                dev.acc[name][1][rows] = accs[1]
                elif isinstance(ins, Fill):
                    for name in ins.stores:
                        _write(dev, i, name, ins.rows, "fill")
                        if name in dev.acc:
                            dev.acc[name][0][ins.rows] = 0
                            dev.acc[name][1][ins.rows] = 0
                        # a result row takes the identity of the input block whose rows it names (which must
                        # have arrived)
                        src = "q" if name in Q_SIDE else "k"
                        _read(dev, i, src, ins.of_rows, f"fill of {name}")
                        if ins.of_rows.size != ins.rows.size:
                            _fail(dev, i, f"fill of {name}: result and input row lists differ in length")
                        dev.ident[name][ins.rows] = dev.ident[src][ins.of_rows]
                        dev.valid[name][ins.rows] = True
                elif isinstance(ins, Attention):
                    _attention(dev, i, ins, h, backward)
                elif isinstance(ins, Reduce):
                    for s_name, d_name in zip(ins.src, ins.dst):
                        _read(dev, i, s_name, ins.src_rows, "reduce source")
                        _read(dev, i, d_name, ins.dst_rows, "reduce destination")
                        _write(dev, i, d_name, ins.dst_rows, "reduce destination")
                        if not np.array_equal(dev.ident[s_name][ins.src_rows], dev.ident[d_name][ins.dst_rows]):
                            _fail(dev, i, f"reduce {s_name}->{d_name} combines rows of different blocks")
                        if ins.op == "merge" and np.unique(ins.dst_rows).size != ins.dst_rows.size:
                            _fail(dev, i, "a merge instruction repeats a destination row")
                        if d_name in dev.acc:
                            for j in (0, 1):
                                np.add.at(dev.acc[d_name][j], ins.dst_rows, dev.acc[s_name][j][ins.src_rows])
    for dev in devs:
        if dev.inflight:
            raise PlanVerificationError(f"device {dev.prog.device}: transfers never waited: {sorted(dev.inflight)}")
    if outbox:
        k = next(iter(outbox))
        raise PlanVerificationError(f"send {k[0]!r} from {k[1]} to {k[2]} has no matching receive")
    _check_totals(plan, devs, backward)


def _attention(dev, i, ins: Attention, h, backward):
    w = ins.work
    _read(dev, i, "q", ins.q_rows, "attention query rows")
    _read(dev, i, "k", ins.kv_rows, "attention key rows")
    _read(dev, i, "v", ins.kv_rows, "attention value rows")
    if backward:
        for name in ("o", "do", "lse"):
            _read(dev, i, name, ins.q_rows, f"attention backward {name} rows")
    if ins.q_rows.size != w.total_q or ins.kv_rows.size != w.total_k:
        _fail(dev, i, "row lists and work sizes differ")
    if np.unique(ins.q_rows).size != ins.q_rows.size:
        _fail(dev, i, "a query row appears in two segments of one attention call")
    qid = dev.ident["q"][ins.q_rows]
    kid = dev.ident["k"][ins.kv_rows]
    if not np.array_equal(kid, dev.ident["v"][ins.kv_rows]):
        _fail(dev, i, "k and v rows hold different blocks")
    q_tok, q_head = qid // h.n_q_blocks, qid % h.n_q_blocks
    k_tok, k_head = kid // h.n_kv_blocks, kid % h.n_kv_blocks
    seg = w.seg_ids()
    kv_seg = np.repeat(np.arange(w.num_segments), w.k_lens)
    # every key of a segment must belong to the KV head block of the segment's query head block
    seg_head = np.full(w.num_segments, -1)
    seg_head[seg] = q_head
    if (h.kv_of_q(seg_head[kv_seg]) != k_head).any():
        _fail(dev, i, "a segment pairs a query head block with another KV head block")
    base = w.cu_k[seg][:, None]
    s = w.ranges[..., 0] + base
    e = w.ranges[..., 1] + base
    pk = np.concatenate([[0.0], np.cumsum(k_tok.astype(np.float64))])
    count = (e - s).sum(1).astype(np.float64)
    ksum = (pk[e] - pk[s]).sum(1)
    if ins.q_out_rows.size != ins.q_rows.size or ins.kv_out_rows.size != ins.kv_rows.size:
        _fail(dev, i, "result and input row lists of an attention differ in length")
    if np.unique(ins.q_out_rows).size != ins.q_out_rows.size:
        _fail(dev, i, "a result row appears in two segments of one attention call")
    if not backward:
        rows = ins.q_out_rows
        _write(dev, i, "o", rows, "attention output")
        _write(dev, i, "lse", rows, "attention output")
        if not np.array_equal(dev.ident["o"][rows], qid):
            _fail(dev, i, "output rows do not belong to the query block")
        fresh = np.zeros(rows.size, dtype=bool)
        fresh[ins.fresh] = True  # written, not merged: what the rows held before is lost
        for j, v in ((0, count), (1, ksum)):
            dev.acc["o"][j][rows[fresh]] = v[fresh]
            dev.acc["o"][j][rows[~fresh]] += v[~fresh]
    else:
        if ins.fresh.size:
            _fail(dev, i, "a backward attention writes rows instead of accumulating")
        rows = ins.q_out_rows
        _write(dev, i, "dq", rows, "attention dq")
        for name in ("dq",):
            if not np.array_equal(dev.ident[name][rows], qid):
                _fail(dev, i, "dq rows do not belong to the query block")
        dev.acc["dq"][0][rows] += count
        dev.acc["dq"][1][rows] += ksum
        # keys: difference arrays over the gathered key positions
        nk = w.total_k
        dc = np.zeros(nk + 1)
        dsum = np.zeros(nk + 1)
        live = e > s
        tq = np.repeat(q_tok[:, None].astype(np.float64), s.shape[1], 1)
        np.add.at(dc, s[live], 1.0)
        np.add.at(dc, e[live], -1.0)
        np.add.at(dsum, s[live], tq[live])
        np.add.at(dsum, e[live], -tq[live])
        c_k = np.cumsum(dc)[:nk]
        s_k = np.cumsum(dsum)[:nk]
        for name in ("dk", "dv"):
            out = ins.kv_out_rows
            _write(dev, i, name, out, f"attention {name}")
            if not np.array_equal(dev.ident[name][out], kid):
                _fail(dev, i, f"{name} rows do not belong to the key block")
            np.add.at(dev.acc[name][0], out, c_k)
            np.add.at(dev.acc[name][1], out, s_k)


def _check_totals(plan, devs, backward):
    count, ksum, key_count, key_qsum = expected_totals(plan)
    h = plan.blocks.heads
    for dev in devs:
        toks = plan.layouts[dev.prog.device].global_indices()
        n = toks.size
        checks = [("dq" if backward else "o", h.n_q_blocks, count, ksum)]
        if backward:
            checks += [("dk", h.n_kv_blocks, key_count, key_qsum), ("dv", h.n_kv_blocks, key_count, key_qsum)]
        for name, per, exp_c, exp_s in checks:
            got_c = dev.acc[name][0][: n * per].reshape(per, n).T
            got_s = dev.acc[name][1][: n * per].reshape(per, n).T
            want_c = np.repeat(exp_c[toks][:, None], per, 1)
            want_s = np.repeat(exp_s[toks][:, None], per, 1)
            bad = ~(np.isclose(got_c, want_c) & np.isclose(got_s, want_s, rtol=1e-12, atol=1e-6))
            if bad.any():
                t, hb = np.argwhere(bad)[0]
                raise PlanVerificationError(
                    f"{'backward' if backward else 'forward'}: device {dev.prog.device} {name} of token "
                    f"{int(toks[t])} head block {int(hb)} accumulated {got_c[t, hb]:.0f} pairs "
                    f"(checksum {got_s[t, hb]:.0f}), the mask requires {want_c[t, hb]:.0f} ({want_s[t, hb]:.0f})"
                )


def verify_plan(plan) -> None:
    """Raise :class:`PlanVerificationError` unless the plan is correct (see the module docstring)."""
    toks = np.concatenate([plan.layouts[d].global_indices() for d in range(plan.world_size)])
    if not np.array_equal(np.sort(toks), np.arange(plan.batch.total_tokens)):
        raise PlanVerificationError("local_indices of the devices do not partition the tokens")
    verify_pass(plan, backward=False)
    verify_pass(plan, backward=True)
