"""`ring`: every document split contiguously into N parts, K/V passed around a single ring.

Causal steps that are fully masked are skipped, so later ranks do more work (the published baseline's
imbalance); every mask and any lengths are accepted.
"""
from __future__ import annotations

from dcp_backend.baselines.layout import contiguous_layout
from dcp_backend.baselines.ring_family import RingFamilyBackend, RingFamilyPlan


class RingBackend(RingFamilyBackend):
    name = "ring"

    def _make_plan(self, batch, spec, world_size):
        return RingFamilyPlan(batch, spec, world_size, self.options, layout=contiguous_layout(batch, world_size),
                              window=world_size, head_parallel=1, backend=self.name)
