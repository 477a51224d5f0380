"""Every backend on one batch, side by side, as the published microbenchmark compares them.

``candidate_plans`` plans the batch with each requested backend in every configuration the published
benchmark tries: LoongTrain at every double-ring window (powers of two up to its ring size), DCP at every
block size (hypergraph placement, at 1x and 2x a device's token share as hybrid is run) plus its static candidates (zigzag, 2D zigzag;
:mod:`dcp_backend.dcp.candidates`). ``simulate_candidates`` simulates them under one or more simulator
settings (network, copy accounting) and keeps each backend's best configuration; for DCP that is what
``placement="auto"`` does, taken over block sizes, and ``dcp-hypergraph`` (the hypergraph plans only) is
reported alongside so the static candidates' contribution is visible.

Labels: ``ring``, ``zigzag``, ``loongtrain``, ``te`` (p2p), ``te-a2a`` (a2a+p2p, head degree
gcd(world, KV heads) as in the published baseline), ``hybrid`` (Megatron-Core's hybrid CP: megatron-core's
scheduler, per-sample TE p2p rings, at ``max_seqlen_per_rank`` = 1x and 2x the per-rank share of the
batch, :data:`HYBRID_SEQLEN_FACTORS`), ``dcp``, ``dcp-hypergraph``. TE's context
parallelism takes only causal and full masks; for other masks the TE plans model the published forked TE
(range masks inside the same p2p / a2a+p2p schedules).
"""
from __future__ import annotations

import dataclasses
import math
import time

import dcp_backend as cp
from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.loongtrain import LoongTrainOptions
from dcp_backend.baselines.ring_family import RingFamilyPlan
from dcp_backend.baselines.te import TE_MASKS, TEPlan
from dcp_backend.batch import PackedBatch
from dcp_backend.cost_model import CostModel, load_cost_model
from dcp_backend.dtypes import element_size
from dcp_backend.dcp.candidates import head_parallel_degree
from dcp_backend.dcp.compile import token_bytes
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.plan import DCPPlan, over_memory_limit
from dcp_backend.dcp.planner import AUTO_LOOSE_COMPUTE, make_plan
from dcp_backend.registry import get_planner
from dcp_backend.sim.simulator import simulate_plan
from dcp_backend.topology import Topology

ALL_BACKENDS = ("ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp")
BASELINES = ("ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid")
# Megatron-Core hybrid CP: max_seqlen_per_rank as multiples of the per-rank share ceil(tokens / CP size)
# (1: megatron's suggested starting point, the memory every other backend uses; 2: twice the activation
# memory per micro-batch for smaller CP groups)
HYBRID_SEQLEN_FACTORS = (1, 2)
# DCP's hypergraph plans at the same shares: a device holds at most (1 + memory_imbalance) x the mean tokens, so
# 1x is the default memory_imbalance (0.2) and 2x allows twice the mean, what hybrid's 2x share allows a rank
DCP_SHARE_FACTORS = (1, 2)
# ... and at two compute tolerances (compute_imbalance): the default, and the looser one placement="auto" also
# plans, which may cut fewer bytes across nodes (which wins varies by batch, so both are planned, the faster kept)
DCP_COMPUTE_TOLERANCES = (DCPOptions().compute_imbalance, AUTO_LOOSE_COMPUTE * DCPOptions().compute_imbalance)


@dataclasses.dataclass
class Candidate:
    label: str  # backend label (several candidates per label)
    config: str
    plan: object
    plan_seconds: float


@dataclasses.dataclass
class Entry:
    label: str
    fwd_ms: float
    bwd_ms: float
    config: str
    report: object
    sim_seconds: float
    over_memory_limit: bool = False  # a DCP plan over its (best-effort) memory_limit, or over the comparison's cap
    memory_bytes: float = 0.0  # the largest device's attention memory (stores and buffers) in either pass

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


def _lt_plans(batch, spec, topo: Topology, windows):
    n = topo.world_size
    hp = math.gcd(n, spec.num_kv_heads)
    C = n // hp
    layout = zigzag_layout(batch, C)  # shared: kernel costs are computed once for every window
    ws = windows or [2 ** i for i in range(int(math.log2(C)) + 1)]
    for w in ws:
        if C % w == 0:
            yield w, RingFamilyPlan("loongtrain", batch, spec, topo, LoongTrainOptions(window=w), layout=layout,
                                    window=w, head_parallel=hp)


def _te_plan(seqlens, spec, topo: Topology, comm_type):
    planner = get_planner("te", cp_comm_type=comm_type)
    if spec.mask in TE_MASKS[comm_type]:
        return planner.plan(list(seqlens), spec, topo), ""
    # the published forked TE: range masks in the same schedules (our TE backend refuses these masks)
    batch = PackedBatch.from_seqlens(seqlens)
    hp = planner.resolve_head_parallel(dataclasses.replace(spec, mask="causal", mask_args={}), topo.world_size)
    return TEPlan(batch, spec, topo, planner.options, head_parallel=hp), " (range masks, as the published fork)"


def candidate_plans(seqlens, spec: cp.AttentionSpec, topo: Topology, backends=ALL_BACKENDS,
                    dcp_block_sizes=(1024, 2048, 4096), dcp_options: DCPOptions | None = None, lt_windows=None,
                    dcp_candidates=("hypergraph", "zigzag", "zigzag2d", "ring"), element_size: int = 2, log=None,
                    dcp_shares=DCP_SHARE_FACTORS, dcp_compute_tolerances=DCP_COMPUTE_TOLERANCES):
    """Every configuration of every requested backend, planned (DCP plans compiled for all devices).
    ``dcp_shares``: the memory shares DCP's hypergraph plans are made at (:data:`DCP_SHARE_FACTORS`; a share
    f > 1 raises ``memory_imbalance`` to at least f - 1), as hybrid is planned at 1x and 2x its share;
    ``dcp_compute_tolerances``: the ``compute_imbalance`` values they are made at (:data:`DCP_COMPUTE_TOLERANCES`)."""
    batch = PackedBatch.from_seqlens(seqlens)
    n = topo.world_size
    out: list[Candidate] = []

    def add(label, config, fn):
        t0 = time.perf_counter()
        plan = fn()
        dt = time.perf_counter() - t0
        out.append(Candidate(label, config if isinstance(config, str) else config(plan), plan, dt))
        if log:
            log(f"  planned {label:10s} {out[-1].config:34s} {dt:6.2f} s")

    for name in backends:
        if name in ("ring", "zigzag"):
            add(name, "single ring", lambda: get_planner(name).plan(seqlens, spec, topo))
        elif name == "loongtrain":
            for w, plan in _lt_plans(batch, spec, topo, lt_windows):
                add(name, f"hp={plan.head_parallel} window={w}", lambda plan=plan: plan)
        elif name == "hybrid":
            if n & (n - 1):
                if log:
                    log(f"  skipped hybrid: megatron-core's hybrid CP needs a power-of-two CP size, not {n}")
                continue
            share = -(-int(sum(seqlens)) // n)
            for f in HYBRID_SEQLEN_FACTORS:
                m = max(share * f, -(-max(seqlens) // n))
                add(name, f"max_seqlen_per_rank={m} ({f}x share)",
                    lambda m=m: get_planner("hybrid", max_seqlen_per_rank=m).plan(seqlens, spec, topo))
        elif name in ("te", "te-a2a"):
            ct = "p2p" if name == "te" else "a2a+p2p"
            plan, note = _te_plan(seqlens, spec, topo, ct)
            add(name, f"{ct} A={plan.head_parallel}{note}", lambda plan=plan: plan)
        elif name == "dcp":
            base = dataclasses.replace(dcp_options or DCPOptions(), placement="hypergraph")
            if "hypergraph" in dcp_candidates:
                for tol in dcp_compute_tolerances:
                    for f in dcp_shares:
                        shared = dataclasses.replace(base, compute_imbalance=float(tol), memory_imbalance=(
                            base.memory_imbalance if f == 1 else max(base.memory_imbalance, float(f) - 1.0)))
                        notes = ([] if f == 1 else [f"{f}x share"]) + (
                            [] if float(tol) == base.compute_imbalance else [f"compute {tol:g}"])
                        for bsz in dcp_block_sizes:
                            o = dataclasses.replace(shared, block_size=bsz)
                            add("dcp", f"hypergraph block={bsz}" + (f" ({', '.join(notes)})" if notes else ""),
                                lambda o=o: make_plan(batch, spec, topo, o, element_size, compile_all=True))
            if n > 1 and "zigzag" in dcp_candidates:
                add("dcp", lambda p: f"zigzag block={p.block_size}",
                    lambda: make_plan(batch, spec, topo, base, element_size, compile_all=True, strategy="zigzag"))
            hp = head_parallel_degree(spec, base, topo)
            if n > 1 and hp > 1 and "zigzag2d" in dcp_candidates:
                add("dcp", lambda p: f"zigzag2d hp={hp} block={p.block_size}",
                    lambda: make_plan(batch, spec, topo, base, element_size, compile_all=True, strategy="zigzag2d"))
            if n > 1 and "ring" in dcp_candidates and base.schedule != "ring":  # the ring schedule's plans
                ring = dataclasses.replace(base, schedule="ring")
                for bsz in dcp_block_sizes:
                    o = dataclasses.replace(ring, block_size=bsz)
                    add("dcp", f"hypergraph block={bsz} ring",
                        lambda o=o: make_plan(batch, spec, topo, o, element_size, compile_all=True))
                if hp > 1:
                    add("dcp", lambda p: f"zigzag2d hp={hp} block={p.block_size} ring",
                        lambda: make_plan(batch, spec, topo, ring, element_size, compile_all=True, strategy="zigzag2d"))
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {ALL_BACKENDS}")
    return out


def simulate_candidates(cands: list[Candidate], cost_model, network, dtype="bf16", fused_copies: bool = False,
                        log=None, cache: dict | None = None, kernel: str = "auto",
                        dcp_memory_cap: float | None = None) -> dict:
    """Simulate every candidate; keep each label's best (forward + backward): {label: Entry}. ``cache``
    (kernel costs of the ring-family plans, keyed by the kernel costs too) may be shared by calls.
    ``kernel``: the kernel routing of :func:`~dcp_backend.sim.simulator.simulate_plan` (the same for every
    backend: each runs full and causal segments on flash-attn under ``"auto"``/``"flash"``).
    ``dcp_memory_cap``: bytes; a DCP plan whose largest device needs more counts as over its memory limit (kept
    only when no DCP plan fits)."""
    cm = load_cost_model(cost_model) if not isinstance(cost_model, CostModel) else cost_model
    cache = {} if cache is None else cache
    out: dict = {}

    def rank(e):  # DCP plans within their memory limit before those over it (best-effort limits), then time
        return (e.over_memory_limit, e.total_ms)

    def keep(label, e):
        if label not in out or rank(e) < rank(out[label]):
            out[label] = e

    for c in cands:
        t0 = time.perf_counter()
        rep = simulate_plan(c.plan, cm, network, dtype, label=c.label, cache=cache, fused_copies=fused_copies,
                            kernel=kernel)
        memory = float(max(rep.stats.memory_bytes)) if rep.stats is not None else 0.0
        over = isinstance(c.plan, DCPPlan) and (over_memory_limit(c.plan, element_size(dtype), rep.stats)
                                                 or (dcp_memory_cap is not None and memory > dcp_memory_cap))
        e = Entry(c.label, rep.fwd_ms, rep.bwd_ms, c.config, rep, time.perf_counter() - t0, over, memory)
        if log:
            log(f"  {c.label:10s} {c.config:34s} fwd {e.fwd_ms:8.3f} ms  bwd {e.bwd_ms:8.3f} ms  "
                f"mem {memory / 1e6:7.1f} MB{' (over the memory limit)' if over else ''}  "
                f"(sim {e.sim_seconds:.1f} s)")
        keep(c.label, e)
        if c.label == "dcp" and c.config.startswith("hypergraph"):
            keep("dcp-hypergraph", dataclasses.replace(e, label="dcp-hypergraph"))
    return out


def compare_batch(seqlens, spec: cp.AttentionSpec, topo: Topology, cost_model: CostModel | str, network,
                  dtype="bf16", backends=ALL_BACKENDS, dcp_block_sizes=(1024, 2048, 4096), dcp_options=None,
                  lt_windows=None, dcp_candidates=("hypergraph", "zigzag", "zigzag2d", "ring"), log=None,
                  fused_copies: bool = False, kernel: str = "auto", dcp_shares=DCP_SHARE_FACTORS,
                  dcp_compute_tolerances=DCP_COMPUTE_TOLERANCES, dcp_memory_vs_zigzag: float | None = None) -> dict:
    """Plan and simulate: each backend's best configuration, {label: Entry}. ``dcp_memory_vs_zigzag``: DCP plans
    for (``memory_limit``, as that multiple of the mean device's own rows, unless the options set a limit)
    and keeps the fastest of its plans whose largest device needs at most this times zigzag's largest device
    (the fastest over it only when none fits, marked ``over_memory_limit``)."""
    cm = load_cost_model(cost_model) if not isinstance(cost_model, CostModel) else cost_model
    if dcp_options is None:
        dcp_options = DCPOptions(cost_model=cm.spec)
    esize = element_size(dtype)
    cap = None
    if dcp_memory_vs_zigzag is not None:
        zigzag = get_planner("zigzag").plan(seqlens, spec, topo)
        cap = dcp_memory_vs_zigzag * float(max(zigzag.stats(esize).memory_bytes))
        factor = math.floor(cap / (sum(seqlens) * token_bytes(spec, True, esize) / topo.world_size) * 1e4) / 1e4
        if dcp_options.memory_limit == "none" and factor > 1:
            dcp_options = dataclasses.replace(dcp_options, memory_limit=f"{factor:g}x")
        if log:
            log(f"  DCP memory cap: {dcp_memory_vs_zigzag:g} x zigzag's {cap / dcp_memory_vs_zigzag / 1e6:.1f} MB "
                f"= {cap / 1e6:.1f} MB per device (DCP plans with memory_limit={dcp_options.memory_limit})")
    cands = candidate_plans(seqlens, spec, topo, backends, dcp_block_sizes, dcp_options, lt_windows, dcp_candidates,
                            esize, log, dcp_shares, dcp_compute_tolerances)
    return simulate_candidates(cands, cm, network, dtype, fused_copies, log, kernel=kernel, dcp_memory_cap=cap)


def best_baseline(entries: dict, which: str) -> tuple[str, float]:
    """(label, ms) of the fastest baseline for ``which`` in ("fwd", "bwd")."""
    cands = [(e.fwd_ms if which == "fwd" else e.bwd_ms, k) for k, e in entries.items() if k in BASELINES]
    ms, k = min(cands)
    return k, ms
