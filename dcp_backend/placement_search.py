"""DCP's ``placement="auto"``: of the plans of several placement strategies (the hypergraph placement at the
options' compute tolerance and at twice it, and the structured ones, planned by
:func:`dcp_backend.dcp.planner.make_plan`), keep the one the simulator finds fastest. It sits above the
simulator (which replays DCP plans) and plans nothing itself.

Every candidate is compiled for every device and simulated (``dcp_backend.sim``) with the options' cost
model (``cost_model``; the analytic roofline when None) and that table's network preset (H100 table:
``h100-p5``; CPU table: ``cpu-loopback``; analytic: ``h100-p5``); the plan with the smallest simulated
forward + backward time is returned (ties go to the hypergraph plan; under a ``memory_limit``, a plan within it
before any plan over it), its ``candidates`` recording every
candidate's times.
"""
from __future__ import annotations

import time

from dcp_backend.cost_model import load_cost_model
from dcp_backend.dcp.plan import DCPPlan, over_memory_limit
from dcp_backend.dtypes import dtype_name
from dcp_backend.sim.simulator import simulate_plan


def simulated_seconds(plan: DCPPlan, cost_model, element_size: int) -> tuple[float, float]:
    """(forward, backward) simulated seconds of a DCP plan on its topology."""
    cm = load_cost_model(cost_model)
    rep = simulate_plan(plan, cm, cm.network or "h100-p5", dtype_name(element_size), with_stats=False)
    return rep.fwd.time, rep.bwd.time


def pick_fastest(plans: dict[str, DCPPlan], cost_model, element_size: int, started: float) -> DCPPlan:
    """The plan with the smallest simulated forward + backward time (ties: the hypergraph plan; plans within the
    memory limit first), with every
    candidate's times in ``plan.candidates`` and the selection's own time in its planning phases."""
    times = {}
    for name, p in plans.items():
        f, b = simulated_seconds(p, cost_model, element_size)
        times[name] = {"fwd_s": f, "bwd_s": b}
        times[name]["over_memory_limit"] = over_memory_limit(p, element_size)
    best = min(times, key=lambda k: (times[k]["over_memory_limit"], times[k]["fwd_s"] + times[k]["bwd_s"],
                                     k != "hypergraph"))
    plan = plans[best]
    plan.candidates = {"chosen": best, **times}
    planned = sum(sum(p.phase_seconds.values()) for p in plans.values())
    plan.phase_seconds["select"] = time.perf_counter() - started - planned
    for name, p in plans.items():
        if p is not plan:
            plan.phase_seconds[f"candidate_{name}"] = p.planning_seconds
    return plan
