"""Simulate one plan of any backend on a cluster: forward and backward attention time, per rank and max.

``simulate_plan(plan, cost_model, network, dtype)`` turns the plan into per-rank programs (DCP: its
compiled instructions, :mod:`dcp_backend.sim.dcp`; ring / zigzag / LoongTrain / TE: their step schedules,
:mod:`dcp_backend.sim.ring`; Megatron-Core hybrid CP: its rounds of per-sample TE rings,
:mod:`dcp_backend.sim.hybrid`), runs the forward and the backward pass through the event engine
(:mod:`dcp_backend.sim.engine`) on the plan's topology, and returns a
:class:`SimReport` that also carries the plan's :class:`~dcp_backend.contract.PlanStats` (the statistics
dry runs print), so simulated times and counted bytes come from one object.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dcp_backend.baselines.hybrid import HybridPlan
from dcp_backend.baselines.ring_family import RingFamilyPlan
from dcp_backend.baselines.te import TEPlan
from dcp_backend.cost_model import CostModel, load_cost_model
from dcp_backend.dcp.plan import DCPPlan
from dcp_backend.sim import dcp as sim_dcp
from dcp_backend.sim import hybrid as sim_hybrid
from dcp_backend.sim import ring as sim_ring
from dcp_backend.sim.op_costs import Costs
from dcp_backend.sim.engine import Result, run
from dcp_backend.sim.network import Links, NetworkModel, get_network


@dataclass
class SimReport:
    backend_name: str
    label: str
    fwd: Result
    bwd: Result
    stats: object | None = None

    @property
    def fwd_ms(self) -> float:
        return self.fwd.time * 1e3

    @property
    def bwd_ms(self) -> float:
        return self.bwd.time * 1e3

    def summary(self) -> dict:
        out = {"backend": self.backend_name, "label": self.label, "fwd_ms": self.fwd_ms, "bwd_ms": self.bwd_ms}
        for name, res in (("fwd", self.fwd), ("bwd", self.bwd)):
            cp = res.critical_summary()
            out[f"{name}_critical_compute_ms"] = cp["compute"] * 1e3
            out[f"{name}_critical_comm_ms"] = cp["communication"] * 1e3
            out[f"{name}_max_compute_ms"] = float(res.compute.max()) * 1e3
            out[f"{name}_max_wait_ms"] = float(res.waited.max()) * 1e3
        return out


@functools.singledispatch
def plan_programs(plan, backward: bool, costs: Costs, cache: dict | None = None) -> list[list]:
    """Per-rank simulator programs of ``plan`` for one pass (one registered function per plan type)."""
    raise TypeError(f"cannot simulate a plan of type {type(plan).__name__}")


@plan_programs.register
def _(plan: DCPPlan, backward: bool, costs: Costs, cache: dict | None = None) -> list[list]:
    return sim_dcp.programs(plan, backward, costs)


@plan_programs.register
def _(plan: TEPlan, backward: bool, costs: Costs, cache: dict | None = None) -> list[list]:
    return sim_ring.te_programs(plan, backward, costs, {} if cache is None else cache)


@plan_programs.register
def _(plan: HybridPlan, backward: bool, costs: Costs, cache: dict | None = None) -> list[list]:
    return sim_hybrid.hybrid_programs(plan, backward, costs, {} if cache is None else cache)


@plan_programs.register
def _(plan: RingFamilyPlan, backward: bool, costs: Costs, cache: dict | None = None) -> list[list]:
    cache = {} if cache is None else cache
    # the layout object itself: plans of LoongTrain windows share it
    key = ("ring", plan.layout, plan.head_parallel, costs.kernel_key)
    rc = cache.get(key)
    if rc is None:
        rc = cache[key] = sim_ring.RingCosts(plan, costs)
    return sim_ring.ring_programs(plan, backward, costs, rc, tag=plan.backend_name)


def simulate_plan(plan, cost_model: CostModel | str | None = "h100", network: NetworkModel | str = "h100-p5",
                  dtype="bf16", label: str | None = None, with_stats: bool = True, cache: dict | None = None,
                  bandwidth_scale: float = 1.0, fused_copies: bool = False, kernel: str = "auto") -> SimReport:
    """``kernel``: which block kernel's costs (:mod:`dcp_backend.sim.op_costs`): ``"auto"`` = flash-attn for
    full and causal segments where the cost table has a flash companion (every backend at its best GPU
    kernel), ``"flash"``, or ``"table"`` (the table's own kernel for every segment)."""
    cm = load_cost_model(cost_model) if not isinstance(cost_model, CostModel) else cost_model
    net = get_network(network)
    if bandwidth_scale != 1.0:
        net = net.scaled(bandwidth=bandwidth_scale)
    costs = Costs.make(cm, dtype, plan.spec.head_dim, fused_copies, kernel)
    links = Links(plan.topology, net)
    cache = {} if cache is None else cache
    res = {}
    for backward in (False, True):
        res[backward] = run(plan_programs(plan, backward, costs, cache), links, cores=net.cores,
                            background=net.background, speed=net.speed)
    stats = None
    if with_stats:
        try:
            stats = plan.stats(element_size=costs.element_size)
        except NotImplementedError:  # pragma: no cover
            stats = None
    return SimReport(plan.backend_name, label or plan.backend_name, res[False], res[True], stats)


def compute_only_seconds(plan, cost_model, dtype, backward: bool, kernel: str = "auto") -> np.ndarray:
    """Per-rank compute seconds of a plan (no communication): the simulator's compute for each rank."""
    cm = load_cost_model(cost_model) if not isinstance(cost_model, CostModel) else cost_model
    costs = Costs.make(cm, dtype, plan.spec.head_dim, kernel=kernel)
    progs = plan_programs(plan, backward, costs)
    from dcp_backend.sim.engine import Compute

    return np.array([sum(op.seconds for op in p if isinstance(op, Compute)) for p in progs])
