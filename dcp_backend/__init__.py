"""dcp_backend: context-parallel attention behind one contract (see docs/ARCHITECTURE.md).

    import dcp_backend as cp
    spec = cp.AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128, mask="causal")
    backend = cp.get_backend("dcp", group=None, devices_per_node=8)
    plan = backend.plan(seqlens, spec)          # deterministic, CPU only, no process group needed
    idx = plan.local_indices(rank)              # global packed-token indices this rank holds
    out = backend.attention(q, k, v, plan)      # differentiable w.r.t. q, k, v
"""
from dcp_backend.backend import BackendOptions, CPBackend, Plan, PlanStats
from dcp_backend.masks import available_masks, register_mask
from dcp_backend.registry import available_backends, get_backend, make_options, register_backend
from dcp_backend.errors import BackendUnavailableError, CommunicationError, CPError
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

__all__ = [
    "AttentionSpec", "BackendOptions", "BackendUnavailableError", "CPBackend", "CPError", "CommunicationError",
    "Plan", "PlanStats", "available_backends", "available_masks", "get_backend", "make_options",
    "register_backend", "register_mask", "Topology",
]
