"""`ring`: every document split contiguously into N parts, K/V passed around a single ring.

Causal steps that are fully masked are skipped, so later ranks do more work (the published baseline's
imbalance); every mask and any lengths are accepted.
"""
from __future__ import annotations

from dcp_backend.baselines.layout import contiguous_layout
from dcp_backend.baselines.ring_family import RingFamilyExecutor, RingFamilyPlan, RingFamilyPlanner
from dcp_backend.contract import CPBackend


class RingPlanner(RingFamilyPlanner):
    name = "ring"

    def _make_plan(self, batch, spec, topology):
        n = topology.world_size
        return RingFamilyPlan(self.name, batch, spec, topology, self.options, layout=contiguous_layout(batch, n),
                              window=n, head_parallel=1)


class RingExecutor(RingFamilyExecutor):
    name = "ring"


class RingBackend(CPBackend):
    name = "ring"
    Planner = RingPlanner
    Executor = RingExecutor
