"""CPU block kernel on ATen's flash-attention CPU op and its backward.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp and its backward
accepts an external (merged) out/lse, which is exactly what blockwise context parallelism needs. Equal
shaped segments run as one batched call; full segments run without a mask, square causal segments with
``is_causal`` (top-left aligned, so only used when q_len == k_len), others with an additive mask.
The op returns ``lse = 0`` for a row with no visible key; we fix those rows to ``-inf``.
"""
from __future__ import annotations

import torch

from dcp_backend.kernels.base import BlockKernel, KIND_CAUSAL, acc_dtype, segment_state
from dcp_backend.kernels.work import AttnWork

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _gather(x: torch.Tensor, rows: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """rows of x [T, H, D] -> [batch, H, length, D]."""
    return x.index_select(0, rows).view(batch, length, x.shape[1], x.shape[2]).transpose(1, 2)


def _scatter_rows(y: torch.Tensor) -> torch.Tensor:
    """[batch, H, length, D] -> [batch * length, H, D]."""
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b * n, h, d)


def _groups(q, k, v, work: AttnWork):
    """Per group of equal-shaped segments: (group, q rows, kv rows, q, k, v gathered to [batch, H, len, D]),
    and the work's empty rows, all on q's device."""
    state = segment_state(work)
    rows, empty = state.rows(q.device)
    out = []
    for g, (qr, kr) in zip(state.groups, rows):
        out.append((g, qr, kr, _gather(q, qr, g.batch, g.q_len), _gather(k, kr, g.batch, g.k_len),
                    _gather(v, kr, g.batch, g.k_len)))
    return out, empty


class CPUFlashKernel(BlockKernel):
    name = "cpu_flash"

    def supports(self, device, dtype):
        return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16)

    def prepare(self, work: AttnWork):
        return segment_state(work)

    def forward(self, q, k, v, work: AttnWork, scale: float):
        tq, h, d = q.shape
        out = torch.zeros(tq, h, d, dtype=q.dtype, device=q.device)
        lse = torch.full((tq, h), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        groups, empty = _groups(q, k, v, work)
        for g, qr, kr, qg, kg, vg in groups:
            mask = g.additive_mask(q.dtype, q.device)
            o, l = _fwd(qg, kg, vg, 0.0, g.kind == KIND_CAUSAL, attn_mask=mask, scale=scale)
            out.index_copy_(0, qr, _scatter_rows(o).to(q.dtype))
            lse.index_copy_(0, qr, l.transpose(1, 2).reshape(-1, h).to(lse.dtype))
        if empty.numel():
            lse.index_fill_(0, empty, float("-inf"))
            out.index_fill_(0, empty, 0.0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, work: AttnWork, scale: float):
        tq, h, d = q.shape
        dq = torch.zeros_like(q)
        acc = acc_dtype(q.dtype)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        # A row with no visible key anywhere has lse = -inf; any finite value gives P = 0 there.
        # The op wants the lse in fp32 except for fp64 inputs.
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(acc)
        groups, _ = _groups(q, k, v, work)
        for g, qr, kr, qg, kg, vg in groups:
            og = _gather(out, qr, g.batch, g.q_len)
            dog = _gather(dout, qr, g.batch, g.q_len)
            lg = lse.index_select(0, qr).view(g.batch, g.q_len, h).transpose(1, 2).contiguous()
            mask = g.additive_mask(q.dtype, q.device)
            gq, gk, gv = _bwd(
                dog.contiguous(), qg.contiguous(), kg.contiguous(), vg.contiguous(), og.contiguous(), lg,
                0.0, g.kind == KIND_CAUSAL, attn_mask=mask, scale=scale,
            )
            dq.index_copy_(0, qr, _scatter_rows(gq).to(dq.dtype))
            dk.index_add_(0, kr, _scatter_rows(gk).to(acc))
            dv.index_add_(0, kr, _scatter_rows(gv).to(acc))
        return dq, dk, dv
