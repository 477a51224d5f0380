"""Plan statistics of the ring family: compute balance as the layouts promise, token and pair totals,
and communication bytes equal to what the executor's counters record in a real gloo run (fp32 and
bf16)."""
import numpy as np
import torch

import dcp_backend as cp
from tests.distributed import run_ranks

CAUSAL = cp.AttentionSpec(4, 2, 8, mask="causal")


def _pairs(lens, spec):
    from dcp_backend.dense_reference import dense_visibility

    return int(dense_visibility(lens, spec).sum())


def test_compute_balance_and_totals():
    lens = [300, 41, 160, 7, 1]
    ring = cp.get_backend("ring", world_size=4).plan(lens, CAUSAL).stats()
    zig = cp.get_backend("zigzag", world_size=4).plan(lens, CAUSAL).stats()
    lt = cp.get_backend("loongtrain", world_size=4, head_parallel=2).plan(lens, CAUSAL).stats()
    assert zig.compute_imbalance < 1.05 < 1.3 < ring.compute_imbalance
    total = _pairs(lens, CAUSAL) * CAUSAL.num_heads
    for st in (ring, zig, lt):
        assert sum(st.compute_pair_heads) == total  # loongtrain: each slot does its heads of the position
        assert sum(st.tokens) == sum(lens) and st.world_size == 4
        assert min(st.memory_bytes) > 0
    assert lt.compute_pair_heads[0] == lt.compute_pair_heads[1]  # one head group shares its position's work
    # With every query seeing every key, the contiguous split is balanced too.
    full = cp.AttentionSpec(4, 2, 8, mask="full")
    assert cp.get_backend("ring", world_size=4).plan([400], full).stats().compute_imbalance == 1.0
    # A sparse mask: the sliding window leaves the contiguous ring balanced except at document starts.
    sw = cp.AttentionSpec(4, 2, 8, mask="sliding_window", mask_args={"window": 16})
    assert cp.get_backend("ring", world_size=4).plan([4000], sw).stats().compute_imbalance < 1.02
    # Single-node topology: nothing crosses nodes; two nodes: the ring hops between them.
    assert zig.fwd_inter_node_bytes == 0 and zig.bwd_inter_node_bytes == 0
    zig2 = cp.get_backend("zigzag", world_size=4, devices_per_node=2).plan(lens, CAUSAL).stats()
    assert zig2.fwd_inter_node_bytes > 0
    assert zig2.fwd_inter_node_bytes + zig2.fwd_intra_node_bytes == zig.fwd_intra_node_bytes
    d = zig2.as_dict()
    assert d["nodes"] == 2 and d["max_device_memory_bytes"] == max(zig2.memory_bytes)


CASES = [
    ("ring", {"devices_per_node": 2}, "causal", {}),
    ("zigzag", {"devices_per_node": 2}, "lambda", {"sink": 2, "window": 9}),
    ("loongtrain", {"head_parallel": 2, "devices_per_node": 2}, "causal", {}),
    ("loongtrain", {"head_parallel": 1, "window": 2, "devices_per_node": 2}, "shared_question", {}),
    ("loongtrain", {"head_parallel": 4, "devices_per_node": 4}, "full", {}),
]
LENS = [37, 1, 90, 5, 22]


DTYPES = (torch.float32, torch.bfloat16)  # bf16: K/V at 2 bytes, the travelling dK/dV accumulators at 4


def _count_worker(rank, world_size):
    results = []
    for name, opts, mask, args in CASES:
        spec = cp.AttentionSpec(8, 2, 4, mask=mask, mask_args=args)
        be = cp.get_backend(name, **opts)
        plan = be.plan(LENS, spec)
        n = plan.num_local_tokens(rank)
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(rank)
            q = torch.randn(n, 8, 4, generator=g).to(dtype).requires_grad_(True)
            k = torch.randn(n, 2, 4, generator=g).to(dtype).requires_grad_(True)
            v = torch.randn(n, 2, 4, generator=g).to(dtype).requires_grad_(True)
            be.counters.reset()
            out = be.attention(q, k, v, plan)
            dpn = opts["devices_per_node"]
            fwd = be.counters.split(rank, dpn)
            be.counters.reset()
            out.backward(torch.ones_like(out))
            bwd = be.counters.split(rank, dpn)
            results.append((fwd, bwd))
    return results


def test_stats_bytes_equal_counted_bytes():
    per_rank = run_ranks(_count_worker, 4)
    for ci, (case, dtype) in enumerate((c, d) for c in CASES for d in DTYPES):
        name, opts, mask, args = case
        spec = cp.AttentionSpec(8, 2, 4, mask=mask, mask_args=args)
        st = cp.get_backend(name, world_size=4, **opts).plan(LENS, spec).stats(
            element_size=torch.empty(0, dtype=dtype).element_size())
        fwd = np.array([per_rank[r][ci][0] for r in range(4)])  # [rank, (intra, inter)]
        bwd = np.array([per_rank[r][ci][1] for r in range(4)])
        label = f"{name}{opts} {mask} {dtype}"
        assert st.extra["fwd_bytes_per_rank"] == fwd.sum(1).tolist(), label
        assert st.extra["bwd_bytes_per_rank"] == bwd.sum(1).tolist(), label
        assert (st.fwd_intra_node_bytes, st.fwd_inter_node_bytes) == tuple(fwd.sum(0)), label
        assert (st.bwd_intra_node_bytes, st.bwd_inter_node_bytes) == tuple(bwd.sum(0)), label
        assert fwd.sum() > 0
