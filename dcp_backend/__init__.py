"""dcp_backend: context-parallel attention behind one contract (see docs/ARCHITECTURE.md).

    import dcp_backend as cp
    spec = cp.AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128, mask="causal")
    backend = cp.get_backend("dcp", group=None, devices_per_node=8)
    plan = backend.plan(seqlens, spec)          # deterministic, CPU only
    idx = plan.local_indices(rank)              # global packed-token indices this rank holds
    out = backend.attention(q, k, v, plan)      # differentiable w.r.t. q, k, v

Planning apart from running (data-loader workers, dry runs, the simulator):

    plan = cp.get_planner("dcp", block_size=1024).plan(seqlens, spec, cp.Topology(32, devices_per_node=8))
"""
from dcp_backend.contract import BackendOptions, CPBackend, Executor, Plan, Planner, PlanStats
from dcp_backend.masks import available_masks, register_mask
from dcp_backend.registry import available_backends, get_backend, get_planner, make_options, register_backend
from dcp_backend.errors import BackendUnavailableError, CommunicationError, CPError
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

__all__ = [
    "AttentionSpec", "BackendOptions", "BackendUnavailableError", "CPBackend", "CPError", "CommunicationError",
    "Executor", "Plan", "Planner", "PlanStats", "Topology", "available_backends", "available_masks", "get_backend",
    "get_planner", "make_options", "register_backend", "register_mask",
]
