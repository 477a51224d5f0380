"""The `flash` kernel's CPU-testable core: full and causal segments go to the flash function (one varlen
call each), the rest to the general kernel, and the pieces recombine into exactly the reference kernel's
forward and backward. The flash function is a stand-in (explicit float64 softmax per segment, written
here); the real flash-attn path runs only on GPUs (tools/gpu_verify.py)."""
import importlib.util

import numpy as np
import pytest
import torch

from dcp_backend.errors import CPError
from dcp_backend.kernels import AttnWork, auto_kernel, get_kernel
from dcp_backend.kernels.flash import FlashKernel, split_work
from dcp_backend.kernels.reference import ReferenceKernel
from dcp_backend.kernels.work import KIND_CAUSAL, KIND_CAUSAL_BR, KIND_FULL, KIND_GENERAL

H, HKV, D, SCALE = 4, 2, 8, 0.37


def _segments():
    """(q_len, k_len, ranges) per segment: full, square causal, bottom-right causal, sink+window (general),
    a segment without keys, a second full one, a general one with an empty row."""
    def causal(q, k):
        i = np.arange(q)
        return np.stack([np.zeros(q, np.int64), k - q + i + 1], -1)[:, None]

    def full(q, k):
        return np.tile(np.array([[[0, k]]], np.int64), (q, 1, 1))

    lam = np.array([[[0, 2], [max(2, i + 3 - 3), i + 3]] for i in range(7)], np.int64)
    gen2 = np.array([[[1, 3]], [[0, 0]], [[2, 5]]], np.int64)
    return [(5, 7, full(5, 7)), (6, 6, causal(6, 6)), (3, 8, causal(3, 8)), (7, 9, lam), (2, 0, np.zeros((2, 1, 2),
            np.int64)), (4, 4, full(4, 4)), (3, 5, gen2)]


def _work():
    segs = _segments()
    r = max(s[2].shape[1] for s in segs)
    ranges = np.concatenate([np.concatenate([s[2], np.zeros((s[0], r - s[2].shape[1], 2), np.int64)], 1)
                             for s in segs])
    cu = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    return AttnWork(cu([s[0] for s in segs]), cu([s[1] for s in segs]), ranges)


class StandIn:
    """flash-attn's varlen contract in float64: (out, lse [T, H]) forward; backward with the given out/lse."""

    def __init__(self):
        self.calls = []

    def _scores(self, q, k, causal):
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(H // HKV, 1)) * SCALE
        if causal:
            ql, kl = q.shape[0], k.shape[0]
            keep = torch.ones(ql, kl, dtype=torch.bool).tril(kl - ql)
            s = s.masked_fill(~keep, float("-inf"))
        return s

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        assert scale == SCALE
        self.calls.append(("fwd", causal, np.diff(cu_q.numpy()).tolist(), np.diff(cu_k.numpy()).tolist()))
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            s = self._scores(qs, ks, causal)
            lse = torch.logsumexp(s, -1)
            outs.append(torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]),
                                     vs.double().repeat_interleave(H // HKV, 1)))
            lses.append(lse.transpose(0, 1))
        return torch.cat(outs).to(q.dtype), torch.cat(lses).float()

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
        self.calls.append(("bwd", causal, np.diff(cu_q.numpy()).tolist(), np.diff(cu_k.numpy()).tolist()))
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g = H // HKV
        for i in range(len(cu_q) - 1):
            a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            qs, ks, vs = q[a:b].double(), k[c:e].double().repeat_interleave(g, 1), v[c:e].double().repeat_interleave(g, 1)
            p = torch.exp(self._scores(q[a:b], k[c:e], causal) - lse[a:b].double().transpose(0, 1)[..., None])
            do = dout[a:b].double()
            dp = torch.einsum("qhd,khd->hqk", do, vs)
            delta = (do * out[a:b].double()).sum(-1).transpose(0, 1)[..., None]
            ds = p * (dp - delta)
            dq[a:b] = (torch.einsum("hqk,khd->qhd", ds, ks) * SCALE).to(q.dtype)
            dk[c:e] = (torch.einsum("hqk,qhd->khd", ds, qs) * SCALE).view(e - c, HKV, g, D).sum(2).to(k.dtype)
            dv[c:e] = torch.einsum("hqk,qhd->khd", p, do).view(e - c, HKV, g, D).sum(2).to(v.dtype)
        return dq, dk, dv


class CountingReference(ReferenceKernel):
    def __init__(self):
        self.works = []

    def forward(self, q, k, v, work, scale):
        self.works.append(work)
        return super().forward(q, k, v, work, scale)


def _kernel(stand_in, general=None):
    return FlashKernel(general=general or ReferenceKernel(), flash_forward=stand_in.forward,
                       flash_backward=stand_in.backward, dtypes=(torch.float64,), device_types=("cpu",))


def test_split_routes_full_and_causal_to_flash_and_keeps_every_row_once():
    work = _work()
    kinds = work.kinds()
    assert kinds.tolist()[:4] == [KIND_FULL, KIND_CAUSAL, KIND_CAUSAL_BR, KIND_GENERAL]
    sp = split_work(work)
    assert [p.causal for p in sp.flash] == [False, True]
    assert sp.flash[0].segments.tolist() == [0, 5] and sp.flash[1].segments.tolist() == [1, 2]
    assert sp.flash[1].cu_q.tolist() == [0, 6, 9] and sp.flash[1].cu_k.tolist() == [0, 6, 14]
    rows = np.concatenate([p.q_rows for p in sp.flash] + [sp.general_q_rows, sp.keyless_rows])
    assert np.array_equal(np.sort(rows), np.arange(work.total_q))
    assert sp.general.num_segments == 2 and sp.keyless_rows.size == 2
    # the general sub-work keeps its rows' ranges (relative to their segments)
    assert np.array_equal(sp.general.ranges[:7], work.ranges[sp.general_q_rows[:7]])


def test_forward_and_backward_equal_the_reference_kernel():
    work = _work()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(work.total_q, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(work.total_k, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(work.total_k, HKV, D, generator=g, dtype=torch.float64)
    dout = torch.randn(work.total_q, H, D, generator=g, dtype=torch.float64)
    ref = ReferenceKernel()
    o_ref, l_ref = ref.forward(q, k, v, work, SCALE)
    stand_in, general = StandIn(), CountingReference()
    kern = _kernel(stand_in, general)
    out, lse = kern.forward(q, k, v, work, SCALE)
    torch.testing.assert_close(out, o_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l_ref))
    # flash-attn's lse is fp32 (so is the stand-in's)
    torch.testing.assert_close(lse[torch.isfinite(l_ref)], l_ref[torch.isfinite(l_ref)], rtol=1e-6, atol=1e-6)
    # one flash call per kind, the general kernel once, on the general segments only
    assert [c[:2] for c in stand_in.calls] == [("fwd", False), ("fwd", True)]
    assert stand_in.calls[1][2:] == ([6, 3], [6, 8])
    assert len(general.works) == 1 and general.works[0].q_lens.tolist() == [7, 3]
    for a, b in zip(kern.backward(dout, q, k, v, out, lse, work, SCALE),
                    ref.backward(dout, q, k, v, o_ref, l_ref, work, SCALE)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)


def test_a_work_of_one_kind_is_one_call_without_gathers_and_other_dtypes_go_general():
    n = 9
    r = np.stack([np.zeros(n, np.int64), np.arange(1, n + 1)], -1)[:, None]
    work = AttnWork(np.array([0, n]), np.array([0, n]), r)
    q = torch.randn(n, H, D, dtype=torch.float64)
    k, v = torch.randn(n, HKV, D, dtype=torch.float64), torch.randn(n, HKV, D, dtype=torch.float64)
    stand_in, general = StandIn(), CountingReference()
    out, _ = _kernel(stand_in, general).forward(q, k, v, work, SCALE)
    assert split_work(work).flash[0].whole and len(stand_in.calls) == 1 and not general.works
    torch.testing.assert_close(out, ReferenceKernel().forward(q, k, v, work, SCALE)[0])
    stand_in, general = StandIn(), CountingReference()
    _kernel(stand_in, general).forward(q.float(), k.float(), v.float(), work, SCALE)  # fp32: not a flash dtype
    assert not stand_in.calls and len(general.works) == 1


def test_auto_picks_flash_only_where_installed_and_a_missing_flash_attn_is_named():
    assert auto_kernel("cpu") == "cpu_flash"
    assert auto_kernel("cuda", flash_installed=True) == "flash"
    assert auto_kernel("cuda", flash_installed=False) == "flex"
    if importlib.util.find_spec("flash_attn") is None:
        assert auto_kernel("cuda") == "flex"
        with pytest.raises(CPError, match="needs flash-attn.*not installed here.*kernel='flex'"):
            get_kernel("flash", "cuda")
