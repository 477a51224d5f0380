"""Every backend on one batch, side by side, as the published microbenchmark compares them.

``compare_batch`` plans the batch with each requested backend and simulates it on one topology, network
and cost model. Like the published benchmark it keeps each backend's best configuration: LoongTrain's
best double-ring window (powers of two up to its ring size), DCP's best block size. DCP's result is
the better of its hypergraph plans (one per block size) and its static zigzag candidate
(:mod:`dcp_backend.dcp.candidates`), i.e. what ``placement="auto"`` does, taken over block sizes;
``dcp-hypergraph`` is reported alongside so the fallback's contribution is visible.

Labels: ``ring``, ``zigzag``, ``loongtrain``, ``te`` (p2p), ``te-a2a`` (a2a+p2p, head degree
gcd(world, KV heads) as in the published baseline), ``dcp``.
"""
from __future__ import annotations

import dataclasses
import math
import time

import dcp_backend as cp
from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.ring_family import RingFamilyOptions, RingFamilyPlan
from dcp_backend.baselines.te import TEBackend
from dcp_backend.batch import PackedBatch
from dcp_backend.cost import CostModel, dtype_name, load_cost_model
from dcp_backend.dcp.candidates import zigzag_plan
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.planner import make_plan
from dcp_backend.sim.network import Topology
from dcp_backend.sim.simulate import simulate_plan

ALL_BACKENDS = ("ring", "zigzag", "loongtrain", "te", "te-a2a", "dcp")
BASELINES = ("ring", "zigzag", "loongtrain", "te", "te-a2a")


@dataclasses.dataclass
class Entry:
    label: str
    fwd_ms: float
    bwd_ms: float
    config: str
    report: object
    sim_seconds: float

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


def _lt_plans(batch, spec, topo: Topology, windows):
    n, dpn = topo.world_size, topo.devices_per_node
    hp = math.gcd(n, spec.num_kv_heads)
    C = n // hp
    layout = zigzag_layout(batch, C)  # shared: kernel costs are computed once for every window
    opts = RingFamilyOptions(devices_per_node=dpn)
    ws = windows or [w for w in (2 ** i for i in range(int(math.log2(C)) + 1)) if C % w == 0]
    for w in ws:
        if C % w == 0:
            yield w, RingFamilyPlan(batch, spec, n, opts, layout=layout, window=w, head_parallel=hp, backend="loongtrain")


def compare_batch(seqlens, spec: cp.AttentionSpec, topo: Topology, cost_model: CostModel | str, network,
                  dtype="bf16", backends=ALL_BACKENDS, dcp_block_sizes=(1024, 2048, 4096), dcp_options=None,
                  lt_windows=None, dcp_candidates=("hypergraph", "zigzag"), log=None) -> dict:
    """Simulated forward / backward ms of each backend's best configuration: {label: Entry}."""
    cm = load_cost_model(cost_model) if not isinstance(cost_model, CostModel) else cost_model
    batch = PackedBatch.from_seqlens(seqlens)
    n, dpn = topo.world_size, topo.devices_per_node
    esize = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype_name(dtype)]
    cache: dict = {}
    out: dict = {}

    def sim(label, plan, config):
        t0 = time.perf_counter()
        rep = simulate_plan(plan, cm, network, dtype, label=label, cache=cache)
        e = Entry(label, rep.fwd_ms, rep.bwd_ms, config, rep, time.perf_counter() - t0)
        if log:
            log(f"  {label:16s} {config:28s} fwd {e.fwd_ms:8.3f} ms  bwd {e.bwd_ms:8.3f} ms  ({e.sim_seconds:.1f} s)")
        return e

    def keep(label, e):
        if label not in out or e.total_ms < out[label].total_ms:
            out[label] = e

    for name in backends:
        if name in ("ring", "zigzag"):
            be = cp.get_backend(name, world_size=n, devices_per_node=dpn)
            keep(name, sim(name, be.plan(list(seqlens), spec), "single ring"))
        elif name == "loongtrain":
            for w, plan in _lt_plans(batch, spec, topo, lt_windows):
                keep(name, sim(name, plan, f"hp={plan.head_parallel} window={w}"))
        elif name in ("te", "te-a2a"):
            ct = "p2p" if name == "te" else "a2a+p2p"
            be = TEBackend.for_planning(world_size=n, devices_per_node=dpn, cp_comm_type=ct)
            plan = be.plan(list(seqlens), spec)
            keep(name, sim(name, plan, f"{ct} A={plan.head_parallel}"))
        elif name == "dcp":
            base = dcp_options or DCPOptions(world_size=n, devices_per_node=dpn, cost_model=cm.spec)
            base = dataclasses.replace(base, world_size=n, devices_per_node=dpn, placement="hypergraph")
            if "hypergraph" in dcp_candidates:
                for bsz in dcp_block_sizes:
                    o = dataclasses.replace(base, block_size=bsz)
                    t0 = time.perf_counter()
                    plan = make_plan(batch, spec, n, o, esize, compile_all=True)
                    e = sim("dcp", plan, f"hypergraph block={bsz} (plan {time.perf_counter() - t0:.1f}s)")
                    keep("dcp-hypergraph", e)
                    keep("dcp", e)
            if "zigzag" in dcp_candidates and n > 1:
                plan = zigzag_plan(batch, spec, n, base, esize, compile_all=True)
                keep("dcp", sim("dcp", plan, f"zigzag block={plan.block_size}"))
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {ALL_BACKENDS}")
    return out


def best_baseline(entries: dict, which: str) -> tuple[str, float]:
    """(label, ms) of the fastest baseline for ``which`` in ("fwd", "bwd")."""
    cands = [(e.fwd_ms if which == "fwd" else e.bwd_ms, k) for k, e in entries.items() if k in BASELINES]
    ms, k = min(cands)
    return k, ms
