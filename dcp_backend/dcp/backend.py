"""The ``dcp`` backend: the contract of DESIGN.md over the DCP planner and executor."""
from __future__ import annotations

import torch

from dcp_backend.backend import CPBackend
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.executor import DCPAttentionFn, ProgramRunner
from dcp_backend.dcp.planner import DCPPlan, make_plan, resolve_topology
from dcp_backend.dcp.blocks import HeadBlocks
from dcp_backend.kernels import get_kernel


class DCPBackend(CPBackend):
    name = "dcp"
    Options = DCPOptions
    PlanType = DCPPlan


    def check_spec(self, spec) -> None:
        HeadBlocks.make(spec, self.options.head_block_size)
        resolve_topology(self.world_size, self.options.devices_per_node)

    def _make_plan(self, batch, spec, world_size):
        return make_plan(batch, spec, world_size, self.options)

    def runners(self, plan: DCPPlan, rank: int, device: torch.device, dtype: torch.dtype):
        """Forward/backward runners of ``rank`` (cached on the plan: once per plan, all layers)."""
        key = (rank, str(device), dtype)
        if key not in plan._executors:
            fwd, bwd = plan.prepared_programs(rank)
            plan._executors[key] = (ProgramRunner(fwd, device, dtype), ProgramRunner(bwd, device, dtype))
        return plan._executors[key]

    def _attention(self, q, k, v, plan: DCPPlan):
        fwd, bwd = self.runners(plan, self.rank, q.device, q.dtype)
        kernel = get_kernel(self.options.kernel, q.device)
        return DCPAttentionFn.apply(q, k, v, fwd, bwd, kernel, plan.spec.scale, self.group, self.counters)
