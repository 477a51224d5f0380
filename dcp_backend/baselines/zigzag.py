"""`zigzag`: every document split into 2N chunks, rank r keeps chunks r and 2N-1-r; single K/V ring.

The head/tail pairing balances causal work across ranks; fully masked chunk pairs are skipped.
"""
from __future__ import annotations

from dcp_backend.baselines.layout import zigzag_layout
from dcp_backend.baselines.ring_family import RingFamilyBackend, RingFamilyPlan


class ZigzagBackend(RingFamilyBackend):
    name = "zigzag"

    def _make_plan(self, batch, spec, world_size):
        return RingFamilyPlan(batch, spec, world_size, self.options, layout=zigzag_layout(batch, world_size),
                              window=world_size, head_parallel=1, backend=self.name)
