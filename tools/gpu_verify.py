#!/usr/bin/env python
"""One command that checks what only a GPU can: ``python tools/gpu_verify.py`` (or ``make gpu-check``).

On a machine with 1 to 8 GPUs it runs, then prints one table and exits non-zero if any check failed:

1. **kernel** (one GPU): the compiled FlexAttention block kernel (``torch.compile(..., fullgraph=True)``) on
   random works with several key ranges per row and empty rows, and on single causal documents of 1K, 8K
   and 32K tokens; GQA 4:1, head dim 64 and 128, bf16 and fp32. Forward out and log-sum-exp and the
   backward dq/dk/dv are compared with a float64 oracle computed in row chunks on the GPU. Tolerances
   (max |error| / max |oracle|): out and lse 5e-3 in fp32 (TF32 may be used), 3e-2 in bf16; gradients
   1e-2 in fp32, 6e-2 in bf16. It also fails on any eager-fallback or recompile-limit warning, counts the
   graphs compiled over 10 different plans (at most 3 expected with dynamic shapes), and reports flex
   forward and forward+backward TFLOP/s against SDPA causal on one 32K-token document. Then the
   ``flash`` kernel (flash-attn varlen for full and causal segments, flex for the rest) on the same
   works plus DCP-like stage works (query blocks against several key blocks, causal on the last), same
   oracle and tolerances, and its TFLOP/s on the 32K document; where flash-attn is not installed one
   row says so (``auto`` then uses flex).
2. **dist** (all visible GPUs, NCCL, 120 s process-group timeout): every backend (TE where installed) on a
   small ragged batch and on a 128K-token long-tailed batch, forward and backward, checked against the
   float64 oracle on each rank's tokens; steady-state ms and TFLOP/s per backend.
3. **train**: 20 bf16 iterations of a tiny GPT per backend (``torchrun pretrain_gpt.py``); the loss must
   be finite and decreasing, and the iteration-1 loss must agree across backends (2% in bf16).
4. **megatron**: the CUDA-only megatron-core path (``DistributedDataParallel`` with overlapped gradient
   reduce-scatter, ``DistributedOptimizer`` with bf16 parameters, megatron-core's torch_dist save
   strategy): a run stopped at iteration 3 (``--exit-interval``) and resumed gives the losses of an
   uninterrupted one (2% in bf16); TP 2 x CP when 4+ GPUs.
5. **rng**: megatron-core's CUDA RNG tracker survives a checkpoint's RNG save and restore.

Without CUDA it prints one line saying CUDA is needed and exits 2. ``--allow-cpu`` runs the same code
paths on the CPU instead (eager flex forward only, gloo, fp32; smaller sizes), which is how the tool
itself is tested without a GPU; it proves nothing about GPUs.

Budget: about 5 minutes on 8 H100s, most of it compiling (an estimate: this tool has not yet run on a GPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOL = {  # (out and lse, gradients): max |error| / max |oracle|
    torch.float32: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}
BAD_LOG_WORDS = ("without torch.compile", "recompile_limit", "cache_size_limit", "falling back", "fall back")
BACKENDS = ("ring", "zigzag", "loongtrain", "dcp", "te")


# ------------------------------------------------------------------------------------------- oracle

def work_visibility(work, rows: slice, device) -> torch.Tensor:
    """Boolean [rows, total_k] visibility of a slice of a work's query rows (absolute key rows)."""
    seg = np.repeat(np.arange(work.num_segments), np.diff(work.cu_q))[rows]
    base = work.cu_k[seg][:, None]
    r = work.ranges[rows]
    starts = torch.from_numpy(r[..., 0] + base).to(device)
    ends = torch.from_numpy(r[..., 1] + base).to(device)
    cols = torch.arange(work.total_k, device=device)[None, None, :]
    return ((cols >= starts[..., None]) & (cols < ends[..., None])).any(1)


def oracle(q, k, v, dout, work, scale, chunk: int = 512):
    """float64 (out, lse, dq, dk, dv) of one work, in chunks of query rows (memory O(chunk * keys))."""
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, dout))
    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    kk = k64.repeat_interleave(g, 1).transpose(0, 1)  # [H, K, D]
    vv = v64.repeat_interleave(g, 1).transpose(0, 1)
    out = torch.zeros_like(q64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64, device=q.device)
    dq = torch.zeros_like(q64)
    dkk = torch.zeros_like(kk)
    dvv = torch.zeros_like(vv)
    for r0 in range(0, work.total_q, chunk):
        rows = slice(r0, min(r0 + chunk, work.total_q))
        vis = work_visibility(work, rows, q.device)  # [n, K]
        qc = q64[rows].transpose(0, 1)  # [H, n, D]
        s = (qc @ kk.transpose(1, 2)) * scale
        s = s.masked_fill(~vis[None], float("-inf"))
        l = torch.logsumexp(s, -1)  # [H, n]
        p = torch.exp(s - torch.where(torch.isinf(l), torch.zeros_like(l), l)[..., None])
        o = p @ vv  # [H, n, D]
        out[rows] = o.transpose(0, 1)
        lse[rows] = l.transpose(0, 1)
        doc = do64[rows].transpose(0, 1)
        dp = doc @ vv.transpose(1, 2)
        delta = (doc * o).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[rows] = ((ds @ kk) * scale).transpose(0, 1)
        dkk += (ds.transpose(1, 2) @ qc) * scale
        dvv += p.transpose(1, 2) @ doc
    dk = dkk.view(hkv, g, -1, q.shape[2]).sum(1).transpose(0, 1)
    dv = dvv.view(hkv, g, -1, q.shape[2]).sum(1).transpose(0, 1)
    return out, lse, dq, dk, dv


def rel(a, b) -> float:
    fin = torch.isfinite(b)
    if not fin.any():
        return 0.0
    a, b = a.double()[fin], b[fin]
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


# ------------------------------------------------------------------------------------------- works

def causal_work(n: int):
    from dcp_backend.kernels import AttnWork

    r = np.zeros((n, 1, 2), np.int64)
    r[:, 0, 1] = np.arange(1, n + 1)
    return AttnWork(np.array([0, n]), np.array([0, n]), r)


def random_work(rng, max_len: int = 1500):
    """Segments with a sink and a sliding window per row (two ranges), some rows with no key."""
    from dcp_backend.kernels import AttnWork

    nseg = int(rng.integers(2, 6))
    qlens = rng.integers(1, max_len, size=nseg)
    klens = qlens + rng.integers(0, max_len // 2, size=nseg)
    ranges = []
    for ql, kl in zip(qlens.tolist(), klens.tolist()):
        i = np.arange(ql)
        end = kl - ql + i + 1
        sink = np.minimum(rng.integers(1, 64, size=ql), end)
        start = np.maximum(sink, end - rng.integers(1, 512, size=ql))
        r = np.zeros((ql, 2, 2), np.int64)
        r[:, 0, 1] = sink
        r[:, 1, 0], r[:, 1, 1] = start, np.where(start < end, end, start)
        r[rng.random(ql) < 0.03] = 0  # empty rows
        ranges.append(r)
    cu = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    return AttnWork(cu(qlens), cu(klens), np.concatenate(ranges))


def tensors(work, h, hkv, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda n, heads: torch.randn(n, heads, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(work.total_q, h), mk(work.total_k, hkv), mk(work.total_k, hkv), mk(work.total_q, h)


# ------------------------------------------------------------------------------------------- checks

class Report:
    def __init__(self):
        self.rows = []

    def add(self, section, name, ok: bool | None, detail: str):
        """ok: True passed, False failed, None informational or not applicable."""
        self.rows.append((section, name, {True: "ok", False: "FAILED", None: "-"}[ok], detail))
        sys.stderr.write(f"[gpu_verify] {section} {name}: {self.rows[-1][2]} {detail}\n")

    @property
    def failed(self) -> bool:
        return any(r[2] == "FAILED" for r in self.rows)

    def print(self):
        w = [max(len(str(r[i])) for r in self.rows + [("section", "check", "result", "detail")]) for i in range(3)]
        print(f"{'section':<{w[0]}}  {'check':<{w[1]}}  {'result':<{w[2]}}  detail")
        for r in self.rows:
            print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")


class LogWatch(logging.Handler):
    """Collects warnings from torch's compiler loggers and the warnings module."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def bad(self) -> list[str]:
        return [m for m in self.messages if any(w in m.lower() for w in BAD_LOG_WORDS)]


def _timed(fn, device, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def kernel_section(rep: Report, device, quick: bool) -> None:
    from dcp_backend.kernels.flex import FlexKernel

    cuda = device.type == "cuda"
    kern = FlexKernel(compile=cuda)
    watch = LogWatch()
    for name in ("torch._dynamo", "torch._inductor", "torch.nn.attention"):
        logging.getLogger(name).addHandler(watch)
    rng = np.random.default_rng(0)
    sizes = ([1024, 8192, 32768] if cuda else [1024, 2048]) if not quick else [1024 if cuda else 512]
    configs = ([(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)] if cuda
               else [(torch.float32, 64)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype, d in configs:
            works = [(f"random ranges #{i}", random_work(rng, 1500 if cuda else 300)) for i in range(2)]
            works += [(f"causal {n / 1024:g}K", causal_work(n)) for n in sizes]
            for label, work in works:
                h, hkv = (8, 2) if work.total_q <= 8192 else (4, 1)  # GQA 4:1
                q, k, v, do = tensors(work, h, hkv, d, dtype, device, seed=work.total_q)
                name = f"flex {label} {str(dtype)[6:]} d{d} h{h}/{hkv}"
                try:
                    with torch.no_grad():
                        out, lse = kern.forward(q, k, v, work, 1 / math.sqrt(d))
                    ref = oracle(q, k, v, do, work, 1 / math.sqrt(d))
                    t_out, t_grad = TOL[dtype]
                    errs = {"out": rel(out, ref[0]), "lse": rel(lse, ref[1])}
                    same_empty = torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
                    if cuda:
                        dq, dk, dv = kern.backward(do, q, k, v, out, lse, work, 1 / math.sqrt(d))
                        errs.update(dq=rel(dq, ref[2]), dk=rel(dk, ref[3]), dv=rel(dv, ref[4]))
                    ok = same_empty and all(e <= (t_out if key in ("out", "lse") else t_grad)
                                            for key, e in errs.items())
                    detail = " ".join(f"{key}={e:.1e}" for key, e in errs.items())
                    if not cuda:
                        detail += " (CPU: forward only)"
                    rep.add("kernel", name, ok, detail + ("" if same_empty else " empty rows differ"))
                except Exception as exc:  # noqa: BLE001 - every failure is a table row
                    rep.add("kernel", name, False, f"{type(exc).__name__}: {str(exc)[:160]}")
                del q, k, v, do
    bad = watch.bad() + [str(w.message) for w in caught if any(b in str(w.message).lower() for b in BAD_LOG_WORDS)
                         and cuda]
    rep.add("kernel", "no eager fallback / recompile-limit warning", not bad if cuda else None,
            "; ".join(bad)[:200] if bad else ("none" if cuda else "CPU runs flex eagerly by design"))
    # graphs compiled over 10 different plans of the same kind (causal packs of varying lengths)
    if cuda:
        import torch._dynamo.utils as dutils

        before = dutils.counters["stats"]["unique_graphs"]
        from dcp_backend.kernels import AttnWork

        for i in range(10):
            lens = rng.integers(200, 3000, size=int(rng.integers(2, 6)))
            r = np.concatenate([np.stack([np.zeros(n, np.int64), np.arange(1, n + 1)], 1)[:, None] for n in lens])
            cu = np.concatenate([[0], np.cumsum(lens)])
            w = AttnWork(cu, cu, r)
            q, k, v, do = tensors(w, 8, 2, 128, torch.bfloat16, device, seed=100 + i)
            out, lse = kern.forward(q, k, v, w, 0.1)
            kern.backward(do, q, k, v, out, lse, w, 0.1)
        graphs = dutils.counters["stats"]["unique_graphs"] - before
        rep.add("kernel", "compiled graphs over 10 plans", graphs <= 3, f"{graphs} new graphs")
        _throughput(rep, kern, device)


def stage_work(rng, block: int = 512, max_blocks: int = 6):
    """DCP-like stage work: query blocks, each against 1-``max_blocks`` key blocks of its document, causal on
    the last (bottom-right causal segments) or all earlier ones (full segments)."""
    from dcp_backend.kernels import AttnWork

    qlens, klens, ranges = [], [], []
    for _ in range(int(rng.integers(3, 8))):
        nk = int(rng.integers(1, max_blocks + 1))
        kl = nk * block
        i = np.arange(block)
        end = kl - block + i + 1 if rng.random() < 0.6 else np.full(block, kl)
        ranges.append(np.stack([np.zeros(block, np.int64), end], -1)[:, None])
        qlens.append(block)
        klens.append(kl)
    cu = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    return AttnWork(cu(qlens), cu(klens), np.concatenate(ranges))


def flash_section(rep: Report, device, quick: bool) -> None:
    """The flash kernel against the oracle (CUDA with flash-attn only; otherwise one row saying why)."""
    from dcp_backend.kernels.flash import flash_attn_installed

    if device.type != "cuda" or not flash_attn_installed():
        why = "no CUDA" if device.type != "cuda" else "flash-attn is not installed"
        rep.add("kernel", "flash (flash-attn varlen + flex)", None,
                f"{why}: not checked; kernel 'auto' uses flex here (install the gpu extra / Dockerfile image)")
        return
    from dcp_backend.kernels import get_kernel

    kern = get_kernel("flash", device)
    rng = np.random.default_rng(1)
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        works = [("random ranges", random_work(rng, 1500)), ("dcp-like stage", stage_work(rng)),
                 ("dcp-like stage #2", stage_work(rng, 1024, 4))]
        works += [(f"causal {n / 1024:g}K", causal_work(n)) for n in ([1024] if quick else [1024, 8192])]
        for label, work in works:
            q, k, v, do = tensors(work, 8, 2, d, dtype, device, seed=work.total_q + 11)
            name = f"flash {label} {str(dtype)[6:]} d{d} h8/2"
            try:
                with torch.no_grad():
                    out, lse = kern.forward(q, k, v, work, 1 / math.sqrt(d))
                dq, dk, dv = kern.backward(do, q, k, v, out, lse, work, 1 / math.sqrt(d))
                ref = oracle(q, k, v, do, work, 1 / math.sqrt(d))
                t_out, t_grad = TOL[torch.bfloat16]
                errs = {"out": rel(out, ref[0]), "lse": rel(lse, ref[1]), "dq": rel(dq, ref[2]),
                        "dk": rel(dk, ref[3]), "dv": rel(dv, ref[4])}
                same_empty = torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
                ok = same_empty and all(e <= (t_out if key in ("out", "lse") else t_grad) for key, e in errs.items())
                rep.add("kernel", name, ok, " ".join(f"{key}={e:.1e}" for key, e in errs.items())
                        + ("" if same_empty else " empty rows differ"))
            except Exception as exc:  # noqa: BLE001 - every failure is a table row
                rep.add("kernel", name, False, f"{type(exc).__name__}: {str(exc)[:160]}")
    if not quick:
        _throughput(rep, kern, device, "flash")


def _throughput(rep: Report, kern, device, label: str = "flex") -> None:
    """Kernel forward and forward+backward TFLOP/s against SDPA causal on one 32K causal document."""
    n, h, hkv, d = 32768, 32, 8, 128
    work = causal_work(n)
    q, k, v, do = tensors(work, h, hkv, d, torch.bfloat16, device, seed=7)
    flops = 4.0 * n * (n + 1) / 2 * h * d
    fwd = _timed(lambda: kern.forward(q, k, v, work, 1 / math.sqrt(d)), device)
    out, lse = kern.forward(q, k, v, work, 1 / math.sqrt(d))
    bwd = _timed(lambda: kern.backward(do, q, k, v, out, lse, work, 1 / math.sqrt(d)), device)
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    s_fwd = _timed(lambda: sdpa(qs, ks, vs, is_causal=True, enable_gqa=True), device)
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (qs, ks, vs))

    def sdpa_fb():
        sdpa(qg, kg, vg, is_causal=True, enable_gqa=True).backward(do.transpose(0, 1).unsqueeze(0))

    s_fb = _timed(sdpa_fb, device)
    tf = lambda f, ms: f / (ms * 1e-3) / 1e12  # noqa: E731
    recompute = f" (executed, with the recompute: {tf(4 * flops, fwd + bwd):.0f})" if kern.backward_recompute else ""
    rep.add("kernel", f"{label} vs SDPA causal 32K bf16 32/8 heads d128", None,
            f"{label} fwd {tf(flops, fwd):.0f} TFLOP/s, fwd+bwd {tf(3 * flops, fwd + bwd):.0f}{recompute}; "
            f"SDPA fwd {tf(flops, s_fwd):.0f}, fwd+bwd {tf(3 * flops, s_fb):.0f}")


# ----------------------------------------------------------------------------------- distributed

def _backend_options(name: str, world: int, num_kv_heads: int, cuda: bool) -> dict | None:
    if name == "te":
        import importlib.util

        if not cuda or importlib.util.find_spec("transformer_engine") is None:
            return None
        return {"cp_comm_type": "p2p"}
    if name == "loongtrain":
        return {"head_parallel": math.gcd(world, num_kv_heads)}
    if name == "dcp":
        return {"devices_per_node": world}
    return {}


def _dist_batches(cuda: bool, quick: bool) -> list[tuple[str, list[int]]]:
    small = [3000, 1, 517, 1200, 33, 2048]
    if not cuda:
        return [("small ragged", [300, 1, 57, 120, 33])]
    # long-tailed: one long document, a few mid-sized, many short ones; 131072 tokens
    long_tail = [65536, 24000, 12000, 8000, 6000, 4000, 3000] + [1000] * 8 + [472] * 1
    assert sum(long_tail) == 131072
    return [("small ragged", small)] + ([] if quick else [("128K long-tailed", long_tail)])


def _dist_rank(rank, world, port, cuda, quick, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import dcp_backend as cp
    from dcp_backend.batch import PackedBatch
    from dcp_backend.kernels import AttnWork
    from dcp_backend.masks import build_ranges, count_pairs

    rows = []
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    try:
        h, hkv, d = 8, 2, 128 if cuda else 32
        dtype = torch.bfloat16 if cuda else torch.float32
        spec = cp.AttentionSpec(h, hkv, d, mask="causal")
        for label, seqlens in _dist_batches(cuda, quick):
            batch = PackedBatch.from_seqlens(seqlens)
            ranges = build_ranges(batch, spec.mask, spec.mask_args)
            t = batch.total_tokens
            g = torch.Generator().manual_seed(11)
            full = [torch.randn(t, hh, d, generator=g).to(device=device, dtype=dtype) for hh in (h, hkv, hkv, h)]
            # the oracle over the whole batch as one work (documents as segments), on every rank
            whole = AttnWork(batch.cu_seqlens, batch.cu_seqlens, ranges)
            ref = oracle(*full, whole, spec.scale)
            pairs = count_pairs(batch, spec.mask, spec.mask_args)
            for name in BACKENDS:
                opts = _backend_options(name, world, hkv, cuda)
                if opts is None:
                    rows.append(("dist", f"{name} {label}", None, "Transformer Engine not installed or no CUDA"))
                    continue
                try:
                    be = cp.get_backend(name, **opts)
                    plan = be.plan(seqlens, spec)
                    plan.prepare(rank, device.type)
                    idx = plan.local_indices(rank).to(device)
                    q, k, v = (x.index_select(0, idx).detach().requires_grad_(True) for x in full[:3])
                    do = full[3].index_select(0, idx)

                    def step():
                        q.grad = k.grad = v.grad = None
                        be.attention(q, k, v, plan).backward(do)

                    out = be.attention(q, k, v, plan)
                    out.backward(do)
                    t_out, t_grad = TOL[dtype]
                    errs = {"out": rel(out.detach(), ref[0].index_select(0, idx)),
                            "dq": rel(q.grad, ref[2].index_select(0, idx)),
                            "dk": rel(k.grad, ref[3].index_select(0, idx)),
                            "dv": rel(v.grad, ref[4].index_select(0, idx))}
                    ms = _timed(step, device, warmup=1, reps=3)
                    err = torch.tensor([max(errs["out"], 0.0), max(errs["dq"], errs["dk"], errs["dv"]), ms],
                                       dtype=torch.float64, device=device)
                    dist.all_reduce(err, op=dist.ReduceOp.MAX)
                    e_out, e_grad, ms = err.tolist()
                    ok = e_out <= t_out and e_grad <= t_grad
                    tflops = 3 * 4.0 * pairs * h * d / (ms * 1e-3) / 1e12 / world
                    rows.append(("dist", f"{name} {label}", ok,
                                 f"out {e_out:.1e} grads {e_grad:.1e}; {ms:.2f} ms fwd+bwd, {tflops:.1f} TFLOP/s/GPU"))
                except Exception as exc:  # noqa: BLE001
                    rows.append(("dist", f"{name} {label}", False, f"{type(exc).__name__}: {str(exc)[:160]}"))
                    if isinstance(exc, cp.CommunicationError):
                        raise
    except Exception:  # noqa: BLE001
        rows.append(("dist", f"rank {rank}", False, traceback.format_exc(limit=3)[-300:]))
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "dist.json"), "w") as f:
                json.dump(rows, f)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def dist_section(rep: Report, cuda: bool, quick: bool, world: int, timeout: float) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tempfile.mkdtemp(prefix="gpu_verify_")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_rank, args=(r, world, port, cuda, quick, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    path = os.path.join(out_dir, "dist.json")
    if os.path.isfile(path):
        with open(path) as f:
            for section, name, ok, detail in json.load(f):
                rep.add(section, name, ok, detail)
    if hung:
        rep.add("dist", f"{world} ranks", False, f"ranks {hung} still running after {timeout:.0f} s (hang?)")
    elif not os.path.isfile(path):
        rep.add("dist", f"{world} ranks", False, "rank 0 wrote no results (crashed?)")
    shutil.rmtree(out_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ training

def train_section(rep: Report, cuda: bool, quick: bool, world: int, timeout: float) -> None:
    iters = 20 if not quick else 6
    first = {}
    for name in BACKENDS:
        opts = _backend_options(name, world, 2, cuda)
        if opts is None:
            rep.add("train", name, None, "Transformer Engine not installed or no CUDA")
            continue
        run = tempfile.mkdtemp(prefix=f"gpu_verify_{name}_")
        flags = [f"--{name}-{k.replace('_', '-')}={v}" for k, v in opts.items()]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.join(ROOT, "pretrain_gpt.py"), "--cp-backend", name, *flags,
               "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "8", "--num-query-groups", "2",
               "--seq-length", "4096" if cuda else "512", "--train-iters", str(iters), "--lr", "1e-3",
               "--lr-warmup-iters", "2", "--mock-data", "ldc", "--mock-num-documents", "400", "--vocab-size", "1024",
               "--log-interval", "1", "--log-dir", run, "--seed", "1234", "--num-workers", "1",
               "--context-parallel-size", str(world), "--position-embedding-type", "rope", "--eval-iters", "0",
               "--distributed-timeout-minutes", "2", *(["--bf16"] if cuda else [])]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            losses = []
            log = os.path.join(run, "train_log.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    losses = [json.loads(line).get("lm_loss") for line in f if line.strip()]
            if proc.returncode != 0 or len(losses) < iters:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                rep.add("train", name, False, f"exit {proc.returncode}, {len(losses)} iterations: {' | '.join(tail)[:200]}")
                continue
            finite = all(x is not None and math.isfinite(x) for x in losses)
            k = max(1, iters // 4)
            decreasing = finite and np.mean(losses[-k:]) < np.mean(losses[:k])
            first[name] = losses[0]
            rep.add("train", name, finite and decreasing,
                    f"lm loss {losses[0]:.4f} -> {losses[-1]:.4f} over {iters} iterations"
                    + ("" if decreasing else " (not decreasing)"))
        except subprocess.TimeoutExpired:
            rep.add("train", name, False, f"no result within {timeout:.0f} s")
        finally:
            shutil.rmtree(run, ignore_errors=True)
    if len(first) > 1:
        vals = np.array(list(first.values()))
        spread = float((vals.max() - vals.min()) / abs(vals.mean()))
        rep.add("train", "iteration-1 loss agrees across backends", spread <= 0.02,
                f"relative spread {spread:.1e} over {', '.join(first)}")


def _train_losses(flags: list[str], world: int, timeout: float) -> tuple[int, dict, str]:
    """pretrain_gpt.py under torchrun: (exit code, {iteration: (lm loss, grad norm)}, last lines)."""
    run = tempfile.mkdtemp(prefix="gpu_verify_megatron_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.join(ROOT, "pretrain_gpt.py"), *flags, "--log-dir", run]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=timeout)
        out = {}
        log = os.path.join(run, "train_log.jsonl")
        if os.path.isfile(log):
            with open(log) as f:
                for line in f:
                    r = json.loads(line)
                    if "split" not in r:
                        out[r["iteration"]] = (r["lm_loss"], r["grad_norm"])
        return proc.returncode, out, " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:200]
    finally:
        shutil.rmtree(run, ignore_errors=True)


def megatron_section(rep: Report, cuda: bool, world: int, timeout: float) -> None:
    """The GPU-only megatron-core path: DistributedDataParallel with overlapped gradient reduce-scatter,
    DistributedOptimizer with bf16 parameters and fp32 main parameters, torch_dist checkpoints written by
    megatron-core's own save strategy. A run stopped at iteration 3 and resumed must give the losses of an
    uninterrupted run (2% in bf16: reduction order may differ); with 4+ GPUs also at TP 2."""
    if not cuda:
        rep.add("megatron", "DDP + DistributedOptimizer + torch_dist save/resume", None, "CUDA only")
        return
    tp = 2 if world >= 4 and world % 2 == 0 else 1
    ckpt = tempfile.mkdtemp(prefix="gpu_verify_ckpt_")
    base = ["--cp-backend", "dcp", "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "8",
            "--num-query-groups", "2", "--seq-length", "4096", "--train-iters", "6", "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--mock-data", "ldc", "--mock-num-documents", "400", "--vocab-size", "1024",
            "--make-vocab-size-divisible-by", "64", "--log-interval", "1", "--seed", "1234", "--num-workers", "1",
            "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(world // tp),
            "--position-embedding-type", "rope", "--eval-iters", "0", "--bf16", "--use-distributed-optimizer",
            "--overlap-grad-reduce", "--distributed-timeout-minutes", "2"]
    try:
        rc_full, full, tail = _train_losses(base, world, timeout)
        if rc_full != 0 or len(full) < 6:
            rep.add("megatron", f"TP {tp} x CP {world // tp}, bf16, DistributedOptimizer", False,
                    f"exit {rc_full}: {tail}")
            return
        rc1, first, tail1 = _train_losses(base + ["--save", ckpt, "--exit-interval", "3"], world, timeout)
        rc2, second, tail2 = _train_losses(base + ["--save", ckpt, "--load", ckpt], world, timeout)
        ok = rc1 == 0 and rc2 == 0 and sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
        worst = max((abs(second[i][0] - full[i][0]) / abs(full[i][0]) for i in second), default=float("inf")) \
            if ok else float("inf")
        rep.add("megatron", f"TP {tp} x CP {world // tp}, bf16, DistributedOptimizer: resume at 3", ok and worst <= 0.02,
                f"max relative loss difference {worst:.1e} over iterations 4-6" if ok else f"{tail1} {tail2}")
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


def rng_section(rep: Report, cuda: bool) -> None:
    if not cuda:
        rep.add("rng", "CUDA RNG tracker checkpoint round trip", None, "no CUDA: nothing to track")
        return
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron.training import checkpointing

    try:
        tensor_parallel.model_parallel_cuda_manual_seed(123)
    except Exception as exc:  # noqa: BLE001 - needs megatron's parallel state in some versions
        rep.add("rng", "CUDA RNG tracker checkpoint round trip", None, f"tracker not initialisable here: {exc}")
        return
    state = checkpointing.rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4, device="cuda")
    checkpointing.set_rng_state(state)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4, device="cuda")
    rep.add("rng", "CUDA RNG tracker checkpoint round trip", bool(torch.equal(a, b)),
            "identical draws after restore" if torch.equal(a, b) else "draws differ after restore")


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="kernel,dist,train,megatron,rng", help="comma-separated subset to run")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for dist and train (default: all visible)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run of the tool itself)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the dist section (and per training run x2)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(f"gpu_verify: CUDA is needed (torch {torch.__version__} sees no CUDA device); run this on a GPU "
              "machine (see README: make gpu-check)")
        return 2
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"kernel", "dist", "train", "megatron", "rng"}
    if unknown:
        print(f"gpu_verify: unknown section(s) {sorted(unknown)}; choose from kernel, dist, train, megatron, rng")
        return 2
    world = args.gpus or (torch.cuda.device_count() if cuda else 2)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    rep = Report()
    t0 = time.time()
    if "kernel" in sections:
        kernel_section(rep, device, args.quick)
        flash_section(rep, device, args.quick)
    if "dist" in sections:
        dist_section(rep, cuda, args.quick, world, args.timeout)
    if "train" in sections:
        train_section(rep, cuda, args.quick, world, 2 * args.timeout + 60)
    if "megatron" in sections:
        megatron_section(rep, cuda, world, 2 * args.timeout + 60)
    if "rng" in sections:
        rng_section(rep, cuda)
    name = torch.cuda.get_device_name(0) if cuda else "CPU (--allow-cpu: proves nothing about GPUs)"
    print(f"# gpu_verify  {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"{name} x {world}  {time.time() - t0:.0f} s")
    rep.print()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
