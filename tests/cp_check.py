"""Shard, run, unshard, compare: check a CP backend against an independent float64 reference.

Workers (one per rank) run a list of cases and return their local outputs and gradients, the bytes the
backend counted as sent, and the trace of every transfer they made; the parent process reassembles the
results by ``plan.local_indices``, compares them with :func:`tests.reference_oracle.attention` (a reference
that shares no mask or scale code with the library: its visibility comes from DESIGN.md's per-token rule,
its scale is ``1/math.sqrt(head_dim)``), and replays the traces under NCCL's ordering rules
(:func:`dcp_backend.comm_order.replay`), so every exactness test is also a deadlock check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import dcp_backend as cp
from dcp_backend import comm
from dcp_backend.comm_order import CommOrderError, replay
from tests import reference_oracle

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp64": 1e-9}


@dataclass
class Case:
    backend: str
    seqlens: list
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    mask: str = "causal"
    mask_args: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    dtype: str = "fp32"
    seed: int = 0
    softmax_scale: float | None = None
    forward_only: bool = False  # no backward (kernels without one, e.g. FlexAttention on CPU)

    def spec(self) -> cp.AttentionSpec:
        return cp.AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, mask=self.mask,
                                mask_args=self.mask_args, softmax_scale=self.softmax_scale)

    def tensors(self):
        g = torch.Generator().manual_seed(self.seed)
        t = int(sum(self.seqlens))
        q = torch.randn(t, self.num_heads, self.head_dim, generator=g, dtype=torch.float64)
        k = torch.randn(t, self.num_kv_heads, self.head_dim, generator=g, dtype=torch.float64)
        v = torch.randn(t, self.num_kv_heads, self.head_dim, generator=g, dtype=torch.float64)
        do = torch.randn(t, self.num_heads, self.head_dim, generator=g, dtype=torch.float64)
        return q, k, v, do

    def __str__(self) -> str:
        scale = "" if self.softmax_scale is None else f" scale={self.softmax_scale}"
        return (f"{self.backend}{self.options} mask={self.mask}{self.mask_args or ''} heads={self.num_heads}/"
                f"{self.num_kv_heads}{scale} {self.dtype} seqlens={self.seqlens}")


def random_seqlens(rng: np.random.Generator, num_docs: int, max_len: int, world_size: int) -> list[int]:
    """Ragged lengths that include a 1-token document and documents shorter than the world size."""
    lens = rng.integers(1, max_len + 1, size=num_docs).tolist()
    lens[int(rng.integers(0, num_docs))] = 1
    if num_docs > 1:
        lens[int(rng.integers(0, num_docs))] = int(rng.integers(1, max(2, world_size)))
    return [int(x) for x in lens]


def worker(rank: int, world_size: int, cases: list[Case]):
    results = []
    for case in cases:
        q, k, v, do = case.tensors()
        backend = cp.get_backend(case.backend, **case.options)
        plan = backend.plan(case.seqlens, case.spec())
        plan.prepare(rank)  # what a planning worker does (host tables), checked by every case
        idx = plan.local_indices(rank)
        dt = DTYPES[case.dtype]
        ql, kl, vl = (x[idx].to(dt).requires_grad_(True) for x in (q, k, v))
        backend.counters.reset()
        with comm.record_trace() as trace:
            if case.forward_only:
                with torch.no_grad():
                    out = backend.attention(ql, kl, vl, plan)
            else:
                out = backend.attention(ql, kl, vl, plan)
            sent_fwd = backend.counters.total()
            if not case.forward_only:
                out.backward(do[idx].to(dt))
        res = {"idx": idx, "out": out.detach().double(), "trace": trace.events,
               "sent_fwd": sent_fwd, "sent_bwd": backend.counters.total() - sent_fwd}
        if not case.forward_only:
            res.update(dq=ql.grad.double(), dk=kl.grad.double(), dv=vl.grad.double())
        results.append(res)
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|; absolute where the reference is below 1 (inputs are O(1), and a
    gradient can be exactly zero, e.g. a query with a single visible key)."""
    scale = b.abs().max().item() if b.numel() else 1.0
    return (a - b).abs().max().item() / max(scale, 1.0)


def _reference(case: Case, cache: dict) -> dict:
    """The reference's out (and dq, dk, dv) for a case; cases with the same inputs share one."""
    key = (tuple(case.seqlens), case.mask, tuple(sorted(case.mask_args.items())), case.softmax_scale,
           case.num_heads, case.num_kv_heads, case.head_dim, case.seed, case.forward_only)
    if key not in cache:
        q, k, v, do = case.tensors()
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        ref = reference_oracle.attention(q, k, v, case.seqlens, case.mask, case.mask_args, case.softmax_scale)
        want = {"out": ref.detach()}
        if not case.forward_only:
            ref.backward(do)
            want.update(dq=q.grad, dk=k.grad, dv=v.grad)
        cache[key] = want
    return cache[key]


def rms_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (root mean square; sees a small error spread over many elements)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case_errors(case: Case, per_rank: list[list[dict]], ci: int, cache: dict | None = None, metric=None) -> dict:
    """Relative error of out (and dq, dk, dv) of case ``ci`` against the reference (``metric``, default
    :func:`rel_err`)."""
    metric = metric or rel_err
    total = int(sum(case.seqlens))
    keys = ("out",) if case.forward_only else ("out", "dq", "dk", "dv")
    want = _reference(case, {} if cache is None else cache)
    errs = {}
    for key in keys:
        shape = per_rank[0][ci][key].shape[1:]
        buf = torch.zeros((total,) + tuple(shape), dtype=torch.float64)
        for r in range(len(per_rank)):
            buf[per_rank[r][ci]["idx"]] = per_rank[r][ci][key]
        errs[key] = metric(buf, want[key])
    return errs


def check_results(cases: list[Case], per_rank: list[list[dict]]) -> None:
    """Assert partition of tokens, agreement of out (dq, dk, dv) with the reference, and communication that
    NCCL's ordering rules would complete."""
    failures = []
    cache: dict = {}
    for ci, case in enumerate(cases):
        total = int(sum(case.seqlens))
        idx = torch.cat([per_rank[r][ci]["idx"] for r in range(len(per_rank))])
        assert torch.equal(torch.sort(idx).values, torch.arange(total)), f"{case}: local_indices do not partition"
        tol = TOLERANCE[case.dtype]
        errs = case_errors(case, per_rank, ci, cache)
        bad = {k_: e for k_, e in errs.items() if not e < tol}
        if bad:
            failures.append(f"{case}: relative errors {bad} exceed {tol}")
        try:
            replay([per_rank[r][ci]["trace"] for r in range(len(per_rank))])
        except CommOrderError as exc:
            failures.append(f"{case}: its communication would deadlock or mismatch under NCCL: {exc}")
    assert not failures, "\n".join(failures)
