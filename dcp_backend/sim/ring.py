"""Ring, zigzag, LoongTrain and Transformer Engine schedules as simulator programs.

All four run the double-ring engine of :mod:`dcp_backend.baselines.ring_core` (a single ring is the
window = ring size case), op for op:

* forward, per outer step: post the outer-ring K/V transfer (overlapped with the whole inner sweep); per
  inner step: post the next inner K/V transfer, compute the local queries against the held block, merge,
  wait for the transfer;
* backward: K/V travel the same way, and each block's dK/dV partial travels with it: every step computes
  into a fresh partial, adds the accumulator that arrived from the previous position and sends the sum
  on (sent after the step's compute, received at the next step; the window's total returns to the
  block's holder after the sweep, then crosses to the next window on the outer ring);
* LoongTrain (``head_parallel > 1``): head all-to-alls inside each head group before (q, k, v) and after
  (out) the ring, each posted and waited at once (exposed), and the reverse ones in backward.

Transformer Engine (:func:`te_programs`): ``p2p`` is the zigzag (DualChunkSwap) ring over all ranks and
``a2a+p2p`` the head all-to-all of degree ``A`` plus a zigzag ring over ``world / A`` ranks (the union of
a head group's DualChunkSwap chunks is exactly a zigzag chunk pair of the smaller ring). Both send the
K/V of every document padded to a multiple of ``2 * world`` tokens, and dK/dV in the input dtype; q, k,
v travel in one all-to-all. Attention work is taken from our zigzag layout of the real tokens (TE's
kernels skip the padding).
"""
from __future__ import annotations

import numpy as np

from dcp_backend.baselines.layout import PairWorkBuilder, zigzag_layout
from dcp_backend.baselines.ring_family import RingFamilyOptions, RingFamilyPlan
from dcp_backend.sim.op_costs import Costs
from dcp_backend.sim.engine import Compute, Launch, Wait


class RingCosts:
    """Per (ring position, source position) forward/backward kernel seconds, computed once per plan."""

    def __init__(self, plan, c: Costs):
        self.plan = plan
        hp = plan.head_parallel
        self.heads = plan.spec.num_heads // hp
        b = PairWorkBuilder(plan.layout, plan.spec.mask, plan.spec.mask_args)
        C = plan.num_positions
        self.fwd = np.zeros((C, C))
        self.bwd = np.zeros((C, C))
        self.rows = np.zeros((C, C), dtype=np.int64)
        self.kv_rows = np.zeros((C, C), dtype=np.int64)
        for dst in range(C):
            for src in range(C):
                pw = b.build(dst, src)
                if pw.empty:
                    continue
                for rnd in pw.rounds:  # one kernel call per round (query chunk x key chunk segments)
                    self.fwd[dst, src] += c.attention(rnd.work, self.heads, False)
                    self.bwd[dst, src] += c.attention(rnd.work, self.heads, True)
                    self.rows[dst, src] += rnd.q_rows.size
                    self.kv_rows[dst, src] += rnd.kv_rows.size


def _kv_heads(plan) -> int:
    return max(plan.spec.num_kv_heads // plan.head_parallel, 1)


class _RingPrograms:
    """Builds one rank's ops for either pass, in the executor's order (dcp_backend.baselines.ring_core):
    every batch posts both sides of its exchanges, the dK/dV accumulator of step t travels in step t+1's
    batch and the last one in a closing batch with the receive of the total."""

    def __init__(self, plan, c: Costs, rc: RingCosts, tokens, dkv_size, fused_a2a: bool, tag: str, a2a_tokens):
        self.plan, self.c, self.rc, self.tag = plan, c, rc, tag
        self.fused_a2a, self.a2a_tokens = fused_a2a, a2a_tokens
        self.tokens = plan.layout.tokens_per_position if tokens is None else np.asarray(tokens)
        self.d, self.hp = plan.spec.head_dim, plan.head_parallel
        self.heads = plan.spec.num_heads // self.hp
        self.kvh = _kv_heads(plan)
        self.acc = c.acc_size if dkv_size is None else dkv_size

    def kv_bytes(self, pos: int) -> float:
        return 2.0 * self.tokens[pos] * self.kvh * self.d * self.c.element_size

    def dkv_bytes(self, pos: int) -> float:
        return 2.0 * self.tokens[pos] * self.kvh * self.d * self.acc

    def rank(self, r: int, backward: bool) -> list:
        c, plan = self.c, self.plan
        held = int(plan.layout.tokens_per_position[plan.geometry(r).position])
        a2a = _a2a(plan, r, c, self.fused_a2a, self.tag, self.a2a_tokens) if self.hp > 1 else None
        ops: list = list(a2a["bwd_out" if backward else "fwd_in"]) if a2a else []
        ops.append(Compute(c.copy(c.rows_bytes(held, self.kvh) * 2 + c.rows_bytes(held, self.heads, acc=True), 3),
                           "prologue"))
        ops += self.backward(r) if backward else self.forward(r)
        if backward:
            ops.append(Compute(c.copy(c.rows_bytes(held, self.heads) + c.rows_bytes(held, self.kvh) * 2, 3), "epilogue"))
        else:
            ops.append(Compute(c.copy(c.rows_bytes(held, self.heads, acc=True), 1), "epilogue"))
        if a2a:
            ops += a2a["bwd_in" if backward else "fwd_out"]
        return ops

    def forward(self, r: int) -> list:
        geo, tag, ops = self.plan.geometry(r), self.tag, []
        w, nw = geo.window, geo.num_windows
        for o in range(nw):
            if o < nw - 1:
                ops.append(Launch(("fo", o), [((tag, "kvo", o, r, geo.outer_next), geo.outer_next,
                                               self.kv_bytes(geo.source(o, 0)))],
                                  [((tag, "kvo", o, geo.outer_prev, r), geo.outer_prev)]))
            for t in range(w):
                if t < w - 1:
                    ops.append(Launch(("fi", o, t), [((tag, "kvi", o, t, r, geo.inner_next), geo.inner_next,
                                                      self.kv_bytes(geo.source(o, t)))],
                                      [((tag, "kvi", o, t, geo.inner_prev, r), geo.inner_prev)]))
                ops += _step(self.rc, self.c, geo.position, geo.source(o, t), self.heads, self.kvh, backward=False)
                if t < w - 1:
                    ops.append(Wait(("fi", o, t), f"wait kv o{o} t{t}"))
            if o < nw - 1:
                ops.append(Wait(("fo", o), f"wait outer kv o{o}"))
        return ops

    def backward(self, r: int) -> list:
        geo, tag, c, ops = self.plan.geometry(r), self.tag, self.c, []
        w, nw = geo.window, geo.num_windows
        rows_acc = lambda pos, n: c.copy(c.rows_bytes(self.tokens[pos], self.kvh, acc=True) * n, 1)  # noqa: E731
        for o in range(nw):
            sends, recvs = [], []
            if o > 0:  # the previous window's total goes on; this block's accumulator comes in
                sends.append(((tag, "dkvo", o, r, geo.outer_next), geo.outer_next, self.dkv_bytes(geo.source(o - 1, 0))))
                recvs.append(((tag, "dkvo", o, geo.outer_prev, r), geo.outer_prev))
            if o < nw - 1:
                sends.append(((tag, "kvob", o, r, geo.outer_next), geo.outer_next, self.kv_bytes(geo.source(o, 0))))
                recvs.append(((tag, "kvob", o, geo.outer_prev, r), geo.outer_prev))
            ops.append(Launch(("bs", o), sends, recvs))
            for t in range(w):
                sends, recvs = [], []
                if t > 0:  # the previous step's accumulator goes on; this step's comes in
                    sends.append(((tag, "dkvi", o, t, r, geo.inner_next), geo.inner_next,
                                  self.dkv_bytes(geo.source(o, t - 1))))
                    recvs.append(((tag, "dkvi", o, t, geo.inner_prev, r), geo.inner_prev))
                if t < w - 1:
                    sends.append(((tag, "kvib", o, t, r, geo.inner_next), geo.inner_next, self.kv_bytes(geo.source(o, t))))
                    recvs.append(((tag, "kvib", o, t, geo.inner_prev, r), geo.inner_prev))
                ops.append(Launch(("bi", o, t), sends, recvs))
                src = geo.source(o, t)
                ops.append(Compute(rows_acc(src, 2), "zero partial"))
                ops += _step(self.rc, c, geo.position, src, self.heads, self.kvh, backward=True)
                ops.append(Wait(("bi", o, t), f"wait kv/dkv o{o} t{t}"))
                if t > 0:
                    ops.append(Compute(rows_acc(src, 6), "add dkv"))
            if w > 1:
                ops.append(Launch(("bfin", o), [((tag, "dkvi", o, w, r, geo.inner_next), geo.inner_next,
                                                 self.dkv_bytes(geo.source(o, w - 1)))],
                                  [((tag, "dkvi", o, w, geo.inner_prev, r), geo.inner_prev)]))
                ops.append(Wait(("bfin", o), f"wait window dkv o{o}"))
            ops.append(Wait(("bs", o), f"wait outer o{o}"))
            if o > 0:
                ops.append(Compute(rows_acc(geo.source(o, 0), 6), "add outer dkv"))
        if nw > 1:
            ops.append(Launch(("bofin",), [((tag, "dkvo", nw, r, geo.outer_next), geo.outer_next,
                                            self.dkv_bytes(geo.source(nw - 1, 0)))],
                              [((tag, "dkvo", nw, geo.outer_prev, r), geo.outer_prev)]))
            ops.append(Wait(("bofin",), "wait own dkv"))
        return ops


def ring_programs(plan, backward: bool, c: Costs, rc: RingCosts | None = None, *, tokens=None,
                  dkv_size: int | None = None, fused_a2a: bool = False, tag: str = "", a2a_tokens=None) -> list[list]:
    """Programs of a :class:`~dcp_backend.baselines.ring_family.RingFamilyPlan` (or a TE plan mapped onto
    one: ``tokens`` per position for message sizes, ``dkv_size`` bytes per dK/dV element, ``fused_a2a``)."""
    builder = _RingPrograms(plan, c, rc or RingCosts(plan, c), tokens, dkv_size, fused_a2a, tag, a2a_tokens)
    return [builder.rank(r, backward) for r in range(plan.world_size)]


def _step(rc: RingCosts, c: Costs, dst: int, src: int, H: int, kvh: int, backward: bool) -> list:
    rows, kv_rows = int(rc.rows[dst, src]), int(rc.kv_rows[dst, src])
    if rows == 0:
        return []
    if backward:
        gather = c.rows_bytes(rows, H) * 3 + c.rows_bytes(rows, H, acc=True, with_dim=False) + 2 * c.rows_bytes(kv_rows, kvh)
        after = c.rows_bytes(rows, H, acc=True) + 2 * c.rows_bytes(kv_rows, kvh, acc=True)
        return [Compute(c.copy(gather, 6), "gather"), Compute(float(rc.bwd[dst, src]), f"attention bwd src{src}"),
                Compute(c.copy(after, 3), "accumulate")]
    gather = c.rows_bytes(rows, H) + 2 * c.rows_bytes(kv_rows, kvh)
    return [Compute(c.copy(gather, 3), "gather"), Compute(float(rc.fwd[dst, src]), f"attention src{src}"),
            Compute(c.copy(5 * c.rows_bytes(rows, H, acc=True), 10), "merge")]


def _a2a(plan, r: int, c: Costs, fused: bool, tag: str, tokens_per_rank=None) -> dict:
    """Head all-to-all exchanges of rank ``r`` (LoongTrain's _SeqToHeads / _HeadsToSeq, or TE's with
    ``tokens_per_rank`` padded rows on every rank)."""
    hp = plan.head_parallel
    pos, slot = divmod(r, hp)
    counts = [int(x) for x in plan.slot_tokens(pos)] if tokens_per_rank is None else [int(tokens_per_rank)] * hp
    ranks = [plan.rank_of_position(pos, s) for s in range(hp)]
    H, Hkv, d, e = plan.spec.num_heads, plan.spec.num_kv_heads, plan.spec.head_dim, c.element_size
    qh = H // hp
    kvh = Hkv // hp if Hkv >= hp else 1
    mine = counts[slot]

    def exchange(name, send_rows_heads, recv_from, label):
        """send_rows_heads(p) -> elements sent to slot p."""
        sends = [((tag, name, r, ranks[p]), ranks[p], float(send_rows_heads(p)) * d * e) for p in range(hp) if p != slot]
        recvs = [((tag, name, ranks[p], r), ranks[p]) for p in range(hp) if p != slot]
        nbytes = sum(s[2] for s in sends)
        return [Compute(c.copy(nbytes, hp), f"a2a pack {name}"), Launch((name,), sends, recvs),
                Wait((name,), f"wait {label}"), Compute(c.copy(nbytes, hp), f"a2a unpack {name}")]

    # seq -> heads: I send my tokens x the peer's heads; heads -> seq: the peer's tokens x my heads
    s2h = {"q": lambda p: mine * qh, "k": lambda p: mine * kvh, "v": lambda p: mine * kvh}
    h2s_o = lambda p: counts[p] * qh  # noqa: E731
    res = {"fwd_in": [], "fwd_out": [], "bwd_out": [], "bwd_in": []}
    if fused:
        res["fwd_in"] = exchange("a2a_qkv", lambda p: mine * (qh + 2 * kvh), None, "a2a q/k/v")
        res["bwd_in"] = exchange("a2a_dqkv", lambda p: counts[p] * (qh + 2 * kvh), None, "a2a dq/dk/dv")
    else:
        for t in ("q", "k", "v"):
            res["fwd_in"] += exchange(f"a2a_{t}", s2h[t], None, f"a2a {t}")
        for t in ("v", "k", "q"):  # backward of seq->heads: peer's tokens x my heads back
            per = qh if t == "q" else kvh
            res["bwd_in"] += exchange(f"a2a_d{t}", (lambda per: (lambda p: counts[p] * per))(per), None, f"a2a d{t}")
    res["fwd_out"] = exchange("a2a_o", h2s_o, None, "a2a out")
    res["bwd_out"] = exchange("a2a_do", lambda p: mine * qh, None, "a2a dout")
    return res


def te_programs(te_plan, backward: bool, c: Costs, rc_cache: dict | None = None) -> list[list]:
    """Transformer Engine's p2p / a2a+p2p schedule (see the module docstring)."""
    n, A = te_plan.world_size, te_plan.head_parallel
    P = n // A
    ring = RingFamilyPlan("te", te_plan.batch, te_plan.spec, te_plan.topology, RingFamilyOptions(),
                          layout=zigzag_layout(te_plan.batch, P), window=P, head_parallel=A)
    key = ("te", te_plan.layout, A, c.kernel_key)
    rc = (rc_cache or {}).get(key)
    if rc is None:
        rc = RingCosts(ring, c)
        if rc_cache is not None:
            rc_cache[key] = rc
    # message sizes: TE's padded buffers (a position = A ranks' DualChunkSwap chunks)
    padded = te_plan.layout.local_tokens
    tokens = np.full(P, padded * A, dtype=np.float64)
    return ring_programs(ring, backward, c, rc, tokens=tokens, dkv_size=c.element_size, fused_a2a=True, tag="te",
                         a2a_tokens=padded)
