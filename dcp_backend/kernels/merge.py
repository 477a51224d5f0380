"""Numerically stable log-sum-exp merging of partial attention results.

Two partial results (out_a, lse_a) and (out_b, lse_b) of the same query rows over disjoint key sets
combine as ``lse = logaddexp(lse_a, lse_b)`` and ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
Rows where both sides saw no key keep ``out = 0``, ``lse = -inf``. Accumulators are fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor):
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    new_lse = torch.where(total > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return wa / safe, wb / safe, new_lse


def merge_partial(out_a, lse_a, out_b, lse_b):
    """Merge two partial results; returns (out, lse) in the accumulation dtype of ``lse_a``."""
    wa, wb, lse = _weights(lse_a, lse_b.to(lse_a.dtype))
    out = out_a.to(lse.dtype) * wa.unsqueeze(-1) + out_b.to(lse.dtype) * wb.unsqueeze(-1)
    return out, lse


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
    """In place: fold (out_b, lse_b) into the accumulator rows ``rows`` (all rows if None).

    ``rows`` must not repeat (each accumulator row is updated once per call).
    """
    if rows is None:
        out, lse = merge_partial(acc_out, acc_lse, out_b, lse_b)
        acc_out.copy_(out)
        acc_lse.copy_(lse)
        return
    out, lse = merge_partial(acc_out.index_select(0, rows), acc_lse.index_select(0, rows), out_b, lse_b)
    acc_out.index_copy_(0, rows, out)
    acc_lse.index_copy_(0, rows, lse)


def merge_many(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Merge k partial results of the same rows at once (stable: one max, one exp per part)."""
    lse_stack = torch.stack([l.to(lses[0].dtype) for l in lses])
    m = lse_stack.max(dim=0).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_stack - m)
    total = w.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    out = sum(o.to(lse.dtype) * (wi / safe).unsqueeze(-1) for o, wi in zip(outs, w))
    return out, lse
