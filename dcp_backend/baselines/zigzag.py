"""`zigzag`: every document split into 2N chunks, rank r keeps chunks r and 2N-1-r; single K/V ring.

The head/tail pairing balances causal work across ranks; fully masked chunk pairs are skipped.
"""
from __future__ import annotations

from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.ring_family import RingFamilyExecutor, RingFamilyPlan, RingFamilyPlanner
from dcp_backend.contract import CPBackend


class ZigzagPlanner(RingFamilyPlanner):
    name = "zigzag"

    def _make_plan(self, batch, spec, topology):
        n = topology.world_size
        return RingFamilyPlan(self.name, batch, spec, topology, self.options, layout=zigzag_layout(batch, n),
                              window=n, head_parallel=1)


class ZigzagExecutor(RingFamilyExecutor):
    name = "zigzag"


class ZigzagBackend(CPBackend):
    name = "zigzag"
    Planner = ZigzagPlanner
    Executor = ZigzagExecutor
