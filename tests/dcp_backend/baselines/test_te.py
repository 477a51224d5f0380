"""Transformer Engine backend: the THD layout (padding, cu_seqlens, DualChunkSwap, index mapping), the
contract's partition, plan statistics, option/mask errors and the unavailable error, all on CPU; and a
1-rank TE run against the dense reference where CUDA and TE exist."""
import datetime
import importlib.util
import os

import numpy as np
import pytest
import torch

import dcp_backend as cp
from dcp_backend.baselines.te import TEBackend, TEExecutor, TEOptions
from dcp_backend.baselines.te_layout import TELayout, padded_lengths
from dcp_backend.batch import PackedBatch
from dcp_backend.dense_reference import dense_attention

SPEC = cp.AttentionSpec(4, 2, 8, mask="causal")


class te_planner:
    """TE plans without Transformer Engine or a process group: the planner layer on a topology."""

    def __init__(self, world_size: int, devices_per_node: int | None = None, **options):
        self.planner = cp.get_planner("te", **options)
        self.topology = cp.Topology(world_size, devices_per_node)

    def plan(self, seqlens, spec):
        return self.planner.plan(seqlens, spec, self.topology)


def brute_layout(seqlens, cp_size, rank):
    """Per-token, loop-based DualChunkSwap: (global index, padded-buffer row) of rank's real tokens."""
    glob, rows = [], []
    start = buf = 0
    for L in seqlens:
        P = L + (-L) % (2 * cp_size)
        c = P // (2 * cp_size)
        for j, chunk in enumerate((rank, 2 * cp_size - 1 - rank)):
            for t in range(c):
                pos = chunk * c + t
                if pos < L:
                    glob.append(start + pos)
                    rows.append(buf + j * c + t)
        start += L
        buf += P // cp_size
    return glob, rows


LENGTH_CASES = [[1], [7], [1, 1, 1], [5, 1, 13, 8, 2], [16], [3, 64, 1, 9], [2]]


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 8])
def test_layout_matches_brute_force(cp_size):
    for seqlens in LENGTH_CASES:
        lay = TELayout(PackedBatch.from_seqlens(seqlens), cp_size)
        P = padded_lengths(np.array(seqlens), cp_size)
        assert np.all(P % (2 * cp_size) == 0) and np.all(P >= seqlens) and np.all(P - seqlens < 2 * cp_size)
        assert lay.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(seqlens)]).tolist()
        assert lay.cu_seqlens_padded.tolist() == np.concatenate([[0], np.cumsum(P)]).tolist()
        assert lay.max_seqlen == P.max()
        assert lay.local_tokens * cp_size == P.sum()
        seen = []
        for r in range(cp_size):
            glob, rows = brute_layout(seqlens, cp_size, r)
            assert lay.local_indices(r).tolist() == glob, (seqlens, cp_size, r)
            assert lay.buffer_positions(r).tolist() == rows, (seqlens, cp_size, r)
            assert lay.local_real_seqlens(r).sum() == len(glob)
            assert len(set(rows)) == len(rows) and all(0 <= x < lay.local_tokens for x in rows)
            seen += glob
        assert sorted(seen) == list(range(sum(seqlens))), "ranks must partition the real tokens"


def test_more_ranks_than_tokens_and_round_trip():
    lay = TELayout(PackedBatch.from_seqlens([1, 2]), 4)  # 3 tokens, 4 ranks, each doc padded to 8
    assert lay.real_tokens().tolist() == [2, 1, 0, 0]  # chunk size 1: rank 0 keeps doc positions 0, rank 1 pos 1
    assert lay.local_indices(3).size == 0
    x = torch.arange(2 * 3, dtype=torch.float32).view(2, 3)
    buf = lay.to_buffer(x, 0)
    assert buf.shape == (lay.local_tokens, 3) and torch.equal(lay.from_buffer(buf, 0), x)
    assert buf.abs().sum() == x.abs().sum()  # padding rows are zero
    nb = lay.to_buffer(x.numpy(), 0)
    assert np.array_equal(lay.from_buffer(nb, 0), x.numpy())
    with pytest.raises(cp.CPError, match="real tokens"):
        lay.to_buffer(x[:1], 0)
    with pytest.raises(cp.CPError, match="rank must be"):
        lay.local_indices(4)


def test_length_groups_cover_the_buffer():
    lay = TELayout(PackedBatch.from_seqlens([5, 1, 13, 8, 2, 7]), 2)
    rows = np.concatenate([g[2] for g in lay.length_groups])
    assert sorted(rows.tolist()) == list(range(lay.local_tokens))
    for plen, docs, grow in lay.length_groups:
        assert np.all(lay.padded_seqlens[docs] == plen) and grow.size == docs.size * plen // 2


def test_te_unavailable_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_engine" else real(name, *a))
    with pytest.raises(cp.BackendUnavailableError, match="Transformer Engine is not installed.*gpu.*Dockerfile"):
        cp.get_backend("te", world_size=2)


def test_plan_partition_and_determinism():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        lens = rng.integers(1, 30, size=int(rng.integers(1, 6))).tolist()
        opts = {"world_size": n}
        if rng.random() < 0.5 and n % 2 == 0:
            opts.update(cp_comm_type="a2a+p2p", head_parallel=2)
        be = te_planner(**opts)
        plan = be.plan(lens, SPEC)
        idx = torch.cat([plan.local_indices(r) for r in range(n)])
        assert torch.equal(idx.sort().values, torch.arange(sum(lens))), (lens, n)
        again = te_planner(**opts).plan(lens, SPEC)
        assert again.fingerprint == plan.fingerprint
        assert all(torch.equal(plan.local_indices(r), again.local_indices(r)) for r in range(n))


def test_plan_stats():
    lens = [5, 1, 13, 8, 2, 40]
    plan = te_planner(world_size=4, devices_per_node=2).plan(lens, SPEC)
    st = plan.stats(element_size=2)
    local = plan.layout.local_tokens
    kv = 2 * local * SPEC.num_kv_heads * SPEC.head_dim * 2
    # 4-rank ring with 2 ranks per node: ranks 1 and 3 send across nodes, 0 and 2 inside their node.
    assert st.fwd_intra_node_bytes == 2 * 3 * kv and st.fwd_inter_node_bytes == 2 * 3 * kv
    assert st.bwd_intra_node_bytes + st.bwd_inter_node_bytes == 2 * (st.fwd_intra_node_bytes + st.fwd_inter_node_bytes)
    assert sum(st.tokens) == sum(lens)
    # compute = real unmasked pairs of each rank's queries x heads; the sum is the whole batch's work
    assert sum(st.compute_pair_heads) == sum(L * (L + 1) // 2 for L in lens) * SPEC.num_heads
    # DualChunkSwap balances causal work better than a contiguous split of the same (padded) batch
    ring = cp.get_backend("ring", world_size=4).plan(lens, SPEC).stats()
    assert st.compute_imbalance < ring.compute_imbalance
    hier = te_planner(world_size=4, cp_comm_type="a2a+p2p", head_parallel=2).plan(lens, SPEC).stats()
    assert hier.extra["head_parallel"] == 2
    assert sum(hier.compute_pair_heads) == sum(st.compute_pair_heads)
    per_peer = local * (2 * 4 + 2 * 2) * 8 * 2 // 2
    assert hier.fwd_intra_node_bytes == 4 * (1 * kv + per_peer)  # ring of 2 + one a2a peer, one node


def test_memory_is_the_larger_pass_and_holds_what_a_ring_backward_must():
    """Memory counts the backward as for every backend (the contract's memory_bytes: the larger pass): at least
    q, out, dout, dq, k, v and one ring buffer of K/V with its dK/dV, over the rank's padded rows."""
    for options in ({}, {"cp_comm_type": "a2a+p2p", "head_parallel": 2}):
        plan = te_planner(world_size=4, devices_per_node=2, **options).plan([5, 1, 13, 8, 2, 40, 300], SPEC)
        st = plan.stats(element_size=2)
        fwd, bwd = st.extra["fwd_memory_bytes_per_rank"], st.extra["bwd_memory_bytes_per_rank"]
        assert list(st.memory_bytes) == [max(f, b) for f, b in zip(fwd, bwd)]
        local, H, Hkv, D = plan.layout.local_tokens, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim
        kv = 2 * local * Hkv * D * 2
        assert min(bwd) >= 4 * local * H * D * 2 + kv + 2 * kv
        assert min(bwd) > max(fwd)


def test_option_and_mask_errors():
    with pytest.raises(cp.CPError, match="cp_comm_type must be one of"):
        te_planner(world_size=2, cp_comm_type="a2a")
    with pytest.raises(cp.CPError, match="head_parallel applies only"):
        te_planner(world_size=2, head_parallel=2)
    with pytest.raises(cp.CPError, match=r"unknown option\(s\) \['kernel'\]"):  # TE runs its own kernels
        te_planner(world_size=2, kernel="reference")
    with pytest.raises(cp.CPError, match="unknown option"):
        te_planner(world_size=2, window=3)
    be = te_planner(world_size=2)
    be.plan([3, 4], cp.AttentionSpec(4, 2, 8, mask="full"))
    for mask in ("sliding_window", "lambda", "shared_question", "causal_blockwise"):
        with pytest.raises(cp.CPError, match=rf"mask '{mask}' is not supported.*causal, full.*zigzag"):
            be.plan([3, 4], cp.AttentionSpec(4, 2, 8, mask=mask))
    hier = te_planner(world_size=4, cp_comm_type="a2a+p2p")
    with pytest.raises(cp.CPError, match="'full' is not supported"):
        hier.plan([3, 4], cp.AttentionSpec(4, 2, 8, mask="full"))
    with pytest.raises(cp.CPError, match="must both be divisible"):
        te_planner(world_size=4, cp_comm_type="a2a+p2p", head_parallel=4).plan([3], SPEC)
    with pytest.raises(cp.CPError, match="must divide the world size"):
        te_planner(world_size=4, cp_comm_type="a2a+p2p", head_parallel=3).plan(
            [3], cp.AttentionSpec(6, 3, 8))
    # default a2a degree: gcd(world, kv heads)
    assert hier.plan([9], SPEC).head_parallel == 2


def _te_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (Transformer Engine runs on GPUs only)"
    if importlib.util.find_spec("transformer_engine") is None:
        return "needs Transformer Engine (pip install '.[gpu]' or the Dockerfile image)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_te_ready() is not None, reason=str(_te_ready()))
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_te_one_rank_matches_reference(mask):
    import torch.distributed as dist

    if dist.is_initialized():
        _te_one_rank(mask)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from tests.distributed import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        _te_one_rank(mask)
    finally:
        dist.destroy_process_group()


def _te_one_rank(mask):
    lens = [7, 1, 33, 16]
    spec = cp.AttentionSpec(8, 2, 64, mask=mask)
    be = cp.get_backend("te")
    plan = be.plan(lens, spec)
    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    q, do = (torch.randn(t, 8, 64, generator=g) for _ in range(2))
    k, v = (torch.randn(t, 2, 64, generator=g) for _ in range(2))
    idx = plan.local_indices(0)
    ql, kl, vl = (x[idx].cuda().bfloat16().requires_grad_(True) for x in (q, k, v))
    out = be.attention(ql, kl, vl, plan)
    out.backward(do[idx].cuda().bfloat16())
    qr, kr, vr = (x.double().requires_grad_(True) for x in (q, k, v))
    ref = dense_attention(qr, kr, vr, lens, spec)
    ref.backward(do.double())
    for got, want in ((out, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)):
        err = (got.double().cpu() - want[idx].detach()).abs().max() / want.abs().max()
        assert err < 3e-2


# ------------------------------------------------------------------ the GPU path's tensor plumbing, on CPU

class _FakeDPA:
    """Stands in for TE's DotProductAttention on one rank: dense attention per document, reading only
    what TE reads (THD: cu_seqlens, cu_seqlens_padded; BSHD: causal over each padded row)."""

    def __init__(self, heads, kv_heads, dim, scale):
        self.h, self.g, self.d, self.scale = heads, heads // kv_heads, dim, scale

    def _attend(self, q, k, v, causal):
        kk, vv = k.repeat_interleave(self.g, 1), v.repeat_interleave(self.g, 1)
        s = torch.einsum("thd,shd->hts", q, kk) * self.scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv).reshape(q.shape[0], -1)

    def __call__(self, q, k, v, *, qkv_format, attn_mask_type, cu_seqlens_q=None, cu_seqlens_q_padded=None,
                 pad_between_seqs=None, **kw):
        if qkv_format == "thd":
            assert pad_between_seqs is True and attn_mask_type in ("padding_causal", "padding")
            out = q.new_zeros(q.shape[0], self.h * self.d)
            for d in range(cu_seqlens_q.numel() - 1):
                start = int(cu_seqlens_q_padded[d])
                n = int(cu_seqlens_q[d + 1] - cu_seqlens_q[d])
                sl = slice(start, start + n)
                out = out.index_copy(0, torch.arange(start, start + n),
                                     self._attend(q[sl], k[sl], v[sl], attn_mask_type == "padding_causal"))
            return out
        assert qkv_format == "bshd" and attn_mask_type == "causal"
        return torch.stack([self._attend(q[b], k[b], v[b], True) for b in range(q.shape[0])])


def _plumbing_worker(rank, world_size, cases):
    TEExecutor._check_device = lambda self, q: None
    TEExecutor._module = lambda self, plan, device: _FakeDPA(plan.spec.num_heads, plan.spec.num_kv_heads,
                                                             plan.spec.head_dim, plan.spec.scale)
    results = []
    for comm_type, mask, lens in cases:
        be = TEBackend(options=TEOptions(cp_comm_type=comm_type))
        spec = cp.AttentionSpec(4, 2, 8, mask=mask)
        plan = be.plan(lens, spec)
        g = torch.Generator().manual_seed(len(lens))
        t = sum(lens)
        q, do = (torch.randn(t, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(t, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        idx = plan.local_indices(rank)
        ql, kl, vl = (x[idx].clone().requires_grad_(True) for x in (q, k, v))
        out = be.attention(ql, kl, vl, plan)
        out.backward(do[idx])
        results.append((out.detach(), ql.grad, kl.grad, vl.grad))
    return results


def test_te_attention_plumbing_with_a_stand_in_kernel():
    from tests.distributed import run_ranks

    cases = [("p2p", "causal", [7, 1, 12, 2]), ("p2p", "full", [5, 1, 9]), ("a2a+p2p", "causal", [7, 1, 12, 2, 3])]
    (res,) = run_ranks(_plumbing_worker, 1, cases)
    for (comm_type, mask, lens), got in zip(cases, res):
        spec = cp.AttentionSpec(4, 2, 8, mask=mask)
        g = torch.Generator().manual_seed(len(lens))
        t = sum(lens)
        q, do = (torch.randn(t, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(t, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        ref = dense_attention(q, k, v, lens, spec)
        ref.backward(do)
        for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
            assert torch.allclose(a, b, atol=1e-10), (comm_type, mask)


def test_bucketed_lengths_cap_the_passes_with_the_fewest_extra_pairs():
    import itertools

    from dcp_backend.baselines.te_layout import bucket_lengths

    rng = np.random.default_rng(7)
    for trial in range(30):
        padded = rng.integers(1, 12, size=int(rng.integers(1, 9))) * 4
        k = int(rng.integers(1, 5))
        got = bucket_lengths(padded, k)
        assert np.all(got >= padded) and np.unique(got).size <= k and set(got.tolist()) <= set(padded.tolist())
        extra = float((got.astype(float) ** 2 - padded.astype(float) ** 2).sum())
        # brute force over every choice of at most k bounds among the distinct lengths (the largest included)
        values = np.unique(padded)
        best = float("inf")
        for n in range(1, k + 1):
            for bounds in itertools.combinations(values[:-1].tolist(), n - 1):
                b = np.array(sorted(bounds) + [values[-1]])
                up = b[np.searchsorted(b, padded)]
                best = min(best, float((up.astype(float) ** 2 - padded.astype(float) ** 2).sum()))
        assert extra == pytest.approx(best), (padded, k)


def test_a2a_p2p_plans_at_most_max_length_groups_passes():
    lens = [5, 1, 13, 8, 2, 7, 30, 64, 17, 3]
    plan = te_planner(world_size=4, cp_comm_type="a2a+p2p", head_parallel=2,
                                  max_length_groups=3).plan(lens, SPEC)
    groups = plan.layout.length_groups
    assert len(groups) == 3 and plan.stats().extra["passes_per_layer"] == 3
    assert len(te_planner(world_size=4, cp_comm_type="a2a+p2p").plan(lens, SPEC).layout.length_groups) == 4
    idx = np.concatenate([plan.local_indices(r) for r in range(4)])
    assert np.array_equal(np.sort(idx), np.arange(sum(lens)))  # still a partition of the real tokens
    p2p = te_planner(world_size=4).plan(lens, SPEC)  # THD: one pass, no extra padding
    assert p2p.stats().extra["passes_per_layer"] == 1
    assert np.array_equal(p2p.layout.padded_seqlens, padded_lengths(np.array(lens), 4))
