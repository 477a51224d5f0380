"""Block kernels: cpu_flash and the reference kernel against an independent per-segment dense softmax
(all segment kinds, empty rows, zero-length segments, GQA, fp64/fp32/bf16, forward and backward); flex tile
tables against a dense count (the FlexAttention kernel itself: test_flex.py); LSE merging."""
import numpy as np
import pytest
import torch

from dcp_backend.kernels import AttnWork, get_kernel, merge_into_, merge_many, merge_partial
from dcp_backend.kernels.flex import tile_tables
from dcp_backend.kernels.work import KIND_CAUSAL, KIND_FULL, KIND_GENERAL
from dcp_backend.errors import CPError


def random_work(rng, num_segments=7, max_len=23, num_ranges=2):
    """Segments of every kind: full, square causal, general ranges, rows with no key, empty segments."""
    qlens, klens, ranges = [], [], []
    kinds = ["full", "causal", "general", "empty_rows", "zero_q", "zero_k", "general"]
    for s in range(num_segments):
        kind = kinds[s % len(kinds)]
        ql = int(rng.integers(1, max_len + 1))
        kl = ql if kind == "causal" else int(rng.integers(1, max_len + 1))
        if kind == "zero_q":
            ql = 0
        if kind == "zero_k":
            kl = 0
        r = np.zeros((ql, num_ranges, 2), np.int64)
        if kind == "full":
            r[:, 0] = (0, kl)
        elif kind == "causal":
            r[:, 0, 0], r[:, 0, 1] = 0, np.arange(1, ql + 1)
        elif kind in ("general", "empty_rows") and kl > 0:
            for i in range(ql):
                cuts = np.sort(rng.choice(kl + 1, size=2 * num_ranges, replace=True))
                live = [(a, b) for a, b in cuts.reshape(-1, 2) if b > a]
                if kind == "empty_rows" and i % 2 == 0:
                    live = []
                merged = []
                for a, b in live:
                    if merged and a <= merged[-1][1]:
                        merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
                    else:
                        merged.append((a, b))
                for j, (a, b) in enumerate(merged):
                    r[i, j] = (a, b)
        qlens.append(ql)
        klens.append(kl)
        ranges.append(r)
    cu_q = np.concatenate([[0], np.cumsum(qlens)])
    cu_k = np.concatenate([[0], np.cumsum(klens)])
    return AttnWork(cu_q, cu_k, np.concatenate(ranges))


def dense_oracle(q, k, v, work, scale, dout):
    """Per-segment explicit softmax in float64 with autograd: (out, lse, dq, dk, dv)."""
    q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    grp = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for s in range(work.num_segments):
        q0, q1, k0, k1 = work.cu_q[s], work.cu_q[s + 1], work.cu_k[s], work.cu_k[s + 1]
        if q1 == q0:
            continue
        vis = torch.zeros(q1 - q0, k1 - k0, dtype=torch.bool)
        for i in range(q1 - q0):
            for a, b in work.ranges[q0 + i]:
                vis[i, a:b] = True
        kk = k[k0:k1].repeat_interleave(grp, 1)
        vv = v[k0:k1].repeat_interleave(grp, 1)
        sc = torch.einsum("thd,shd->hts", q[q0:q1], kk) * scale
        sc = sc.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(sc, -1)
        p = torch.exp(sc - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        outs.append(torch.einsum("hts,shd->thd", p, vv))
        lses.append(lse.transpose(0, 1))
    out, lse = torch.cat(outs), torch.cat(lses)
    (out * dout.double()).sum().backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def tensors(work, h, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(work.total_q, h, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(work.total_k, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(work.total_k, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(work.total_q, h, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("kernel", ["cpu_flash", "reference"])
def test_kernel_matches_dense_oracle(kernel):
    kern = get_kernel(kernel)
    rng = np.random.default_rng(1)
    for trial, (dtype, h, hkv) in enumerate([(torch.float64, 4, 2), (torch.float32, 4, 4), (torch.float32, 6, 2),
                                             (torch.bfloat16, 4, 1), (torch.float64, 2, 1)]):
        work = random_work(rng)
        work.validate()
        kinds = work.kinds()
        assert {KIND_FULL, KIND_CAUSAL, KIND_GENERAL} <= set(kinds.tolist())
        q, k, v, do = tensors(work, h, hkv, 8, dtype, trial)
        scale = 0.3
        out, lse = kern.forward(q, k, v, work, scale)
        assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        o_ref, l_ref, dq_ref, dk_ref, dv_ref = dense_oracle(q, k, v, work, scale, do)
        tol = TOL[dtype]
        empty = torch.from_numpy((work.ranges[..., 1] - work.ranges[..., 0]).sum(1) == 0)
        assert empty.any()
        assert torch.all(torch.isneginf(lse[empty])) and torch.all(out[empty] == 0)
        assert torch.equal(torch.isneginf(l_ref), torch.isneginf(lse))
        fin = ~empty
        assert (out.double() - o_ref).abs().max() <= tol * o_ref.abs().max() * 4
        assert (lse[fin].double() - l_ref[fin]).abs().max() <= tol * 10
        dq, dk, dv = kern.backward(do, q, k, v, out, lse, work, scale)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
            assert (got.double() - want).abs().max() <= tol * 10 * want.abs().max(), (kernel, dtype, h, hkv)
        assert torch.all(dq[empty] == 0)


@pytest.mark.parametrize("tile", [4, 16, 128])
def test_tile_tables_match_dense_count(tile):
    rng = np.random.default_rng(3)
    work = random_work(rng, num_segments=12, max_len=40)
    tq, tk = work.total_q, work.total_k
    vis = np.zeros((tq, tk), bool)
    seg = work.seg_ids()
    for t in range(tq):
        for a, b in work.ranges[t]:
            vis[t, work.cu_k[seg[t]] + a: work.cu_k[seg[t]] + b] = True
    nq, nk = -(-tq // tile), -(-tk // tile)
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, fq_num, fq_idx = tile_tables(work, tile)
    assert kv_idx.shape == (nq, nk) and q_idx.shape == (nk, nq)  # torch's BlockMask widths
    for i in range(nq):
        partial, full = set(), set()
        for j in range(nk):
            blk = vis[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
            if blk.all() and blk.shape == (tile, tile):
                full.add(j)
            elif blk.any():
                partial.add(j)
        assert set(kv_idx[i, :kv_num[i]].tolist()) == partial, (i, tile)
        assert set(full_idx[i, :full_num[i]].tolist()) == full, (i, tile)
        for j in range(nk):  # the transposed tables of the backward list the same tiles
            assert (i in q_idx[j, :q_num[j]]) == (j in partial), (i, j, tile)
            assert (i in fq_idx[j, :fq_num[j]]) == (j in full), (i, j, tile)


def test_attn_work_checks():
    with pytest.raises(CPError, match="cu_q and cu_k"):
        AttnWork(np.array([0, 2]), np.array([0]), np.zeros((2, 1, 2)))
    with pytest.raises(CPError, match="ranges must be"):
        AttnWork(np.array([0, 2]), np.array([0, 2]), np.zeros((3, 1, 2)))
    w = AttnWork(np.array([0, 1]), np.array([0, 2]), np.array([[[0, 3]]]))
    with pytest.raises(CPError, match="outside its segment"):
        w.validate()
    a = AttnWork(np.array([0, 2]), np.array([0, 3]), np.array([[[0, 3]], [[1, 2]]]))
    both = AttnWork.concat([a, AttnWork.empty(), a])
    assert both.num_segments == 2 and both.cu_k.tolist() == [0, 3, 6] and both.num_pairs() == 2 * a.num_pairs()


# ------------------------------------------------------------------------------------------- LSE merge

def _attend(q, k, v, cols):
    s = (q @ k.T)[:, cols]
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v[cols], lse


def test_merge_of_disjoint_key_sets_equals_full_attention():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (5, 30, 30))
    perm = torch.randperm(30, generator=g)
    parts = [perm[:7], perm[7:8], perm[8:20], perm[20:]]
    full_o, full_l = _attend(q, k, v, torch.arange(30))
    res = [_attend(q, k, v, p) for p in parts]
    o, l = merge_many([r[0] for r in res], [r[1] for r in res])
    assert torch.allclose(o, full_o, atol=1e-12) and torch.allclose(l, full_l, atol=1e-12)
    # pairwise, in either order (commutative), equals merge_many
    o2, l2 = res[0]
    for r in res[1:]:
        o2, l2 = merge_partial(o2, l2, *r)
    o3, l3 = res[-1]
    for r in reversed(res[:-1]):
        o3, l3 = merge_partial(r[0], r[1], o3, l3)
    assert torch.allclose(o2, full_o, atol=1e-12) and torch.allclose(o3, o2, atol=1e-12)
    assert torch.allclose(l3, l2, atol=1e-12)


def test_merge_with_empty_sides_and_in_place_rows():
    o = torch.randn(4, 3, 2, dtype=torch.float64)
    lse = torch.randn(4, 3, dtype=torch.float64)
    z, ninf = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    mo, ml = merge_partial(o, lse, z, ninf)  # merging "no keys" is the identity
    assert torch.equal(mo, o) and torch.equal(ml, lse)
    eo, el = merge_partial(z, ninf, z, ninf)  # both empty stays empty, no NaN
    assert torch.all(eo == 0) and torch.all(torch.isneginf(el))
    big = merge_partial(o, lse + 1000.0, o * 2, lse + 1000.0)  # stable at large lse
    assert torch.allclose(big[0], o * 1.5) and torch.allclose(big[1], lse + 1000.0 + np.log(2.0))
    acc_o, acc_l = z.clone(), ninf.clone()
    rows = torch.tensor([3, 1])
    merge_into_(acc_o, acc_l, o[:2], lse[:2], rows=rows)
    assert torch.equal(acc_o[rows], o[:2]) and torch.equal(acc_l[rows], lse[:2])
    assert torch.all(acc_o[[0, 2]] == 0) and torch.all(torch.isneginf(acc_l[[0, 2]]))
    merge_into_(acc_o, acc_l, o, lse)
    assert torch.allclose(acc_l[rows], torch.logaddexp(lse[:2], lse[rows]))
