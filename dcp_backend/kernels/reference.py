"""Pure-torch block kernel: explicit softmax math, any device, used to cross-check the fast kernels.

Computes in float64 when given float64 and in float32 otherwise. Slow; for tests and debugging.
"""
from __future__ import annotations

import numpy as np
import torch

from dcp_backend.kernels.base import BlockKernel, segment_state
from dcp_backend.kernels.work import AttnWork


def _visible(g, device) -> torch.Tensor:
    return torch.from_numpy(np.array(g.visibility())).to(device)


def _prep(x, rows, batch, length, group):
    """rows of x [T, Hx, D] -> [batch, H, length, D] with KV heads repeated ``group`` times."""
    y = x.index_select(0, rows).view(batch, length, x.shape[1], x.shape[2]).transpose(1, 2)
    return y.repeat_interleave(group, dim=1) if group > 1 else y


class ReferenceKernel(BlockKernel):
    name = "reference"

    def forward(self, q, k, v, work: AttnWork, scale: float):
        tq, h, d = q.shape
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        grp = h // k.shape[1]
        out = torch.zeros(tq, h, d, dtype=ct, device=q.device)
        lse = torch.full((tq, h), float("-inf"), dtype=ct, device=q.device)
        state = segment_state(work)
        for g, (qr, kr) in zip(state.groups, state.rows(q.device)[0]):
            qg = _prep(q.to(ct), qr, g.batch, g.q_len, 1)
            kg = _prep(k.to(ct), kr, g.batch, g.k_len, grp)
            vg = _prep(v.to(ct), kr, g.batch, g.k_len, grp)
            s = (qg @ kg.transpose(-1, -2)) * scale
            s = s.masked_fill(~_visible(g, q.device).unsqueeze(1), float("-inf"))
            l = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - torch.where(torch.isinf(l), torch.zeros_like(l), l).unsqueeze(-1))
            o = p @ vg
            out.index_copy_(0, qr, o.transpose(1, 2).reshape(-1, h, d))
            lse.index_copy_(0, qr, l.transpose(1, 2).reshape(-1, h))
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, work: AttnWork, scale: float):
        tq, h, d = q.shape
        hkv = k.shape[1]
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        grp = h // hkv
        dq = torch.zeros(tq, h, d, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=q.device)
        dv = torch.zeros(v.shape, dtype=ct, device=q.device)
        lse = lse.to(ct)
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        state = segment_state(work)
        for g, (qr, kr) in zip(state.groups, state.rows(q.device)[0]):
            qg = _prep(q.to(ct), qr, g.batch, g.q_len, 1)
            kg = _prep(k.to(ct), kr, g.batch, g.k_len, grp)
            vg = _prep(v.to(ct), kr, g.batch, g.k_len, grp)
            og = _prep(out.to(ct), qr, g.batch, g.q_len, 1)
            dog = _prep(dout.to(ct), qr, g.batch, g.q_len, 1)
            lg = lse.index_select(0, qr).view(g.batch, g.q_len, h).transpose(1, 2)
            s = (qg @ kg.transpose(-1, -2)) * scale
            s = s.masked_fill(~_visible(g, q.device).unsqueeze(1), float("-inf"))
            p = torch.exp(s - lg.unsqueeze(-1))
            dp = dog @ vg.transpose(-1, -2)
            delta = (dog * og).sum(-1, keepdim=True)
            ds = p * (dp - delta)
            gq = (ds @ kg) * scale
            gk = (ds.transpose(-1, -2) @ qg) * scale
            gv = p.transpose(-1, -2) @ dog
            if grp > 1:  # fold repeated KV heads back onto their KV head
                gk = gk.view(g.batch, hkv, grp, g.k_len, d).sum(2)
                gv = gv.view(g.batch, hkv, grp, g.k_len, d).sum(2)
            dq.index_copy_(0, qr, gq.transpose(1, 2).reshape(-1, h, d))
            dk.index_add_(0, kr, gk.transpose(1, 2).reshape(-1, hkv, d))
            dv.index_add_(0, kr, gv.transpose(1, 2).reshape(-1, hkv, d))
        return dq.to(q.dtype), dk, dv
