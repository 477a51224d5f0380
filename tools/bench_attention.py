#!/usr/bin/env python
"""Per-backend context-parallel attention timing (forward and backward) over torch.distributed.

Launch with torchrun (NCCL on GPUs, gloo on CPU) or let the tool spawn gloo ranks itself:

    torchrun --nproc_per_node 8 tools/bench_attention.py --dataset longalign --num-batches 4 \
        --tokens-per-batch 131072 --backends ring,zigzag,loongtrain,te,dcp
    python tools/bench_attention.py --spawn 4 --seqlens 3000,1,517 --backends ring,zigzag --mask causal
    python tools/bench_attention.py --spawn 2 --sanity-check

Each measurement is the maximum over ranks of the mean over ``--repeats`` timed runs after ``--warmup``
untimed ones; every timed forward and backward starts at a barrier. TFLOP/s count the attention work of
the real, unmasked (query, key) pairs: 4*pairs*heads*head_dim forward, twice that backward
(``tflops_rank``); ``exec_tflops_rank`` adds what the block kernel really executes on top (the flex kernel
recomputes each block forward in its backward).

``--sanity-check`` runs every backend once on a small ragged batch, checks output and gradients against
the dense reference, and prints one line per backend (``Ring Attn: 1.2345 ms``, ...; a backend that
cannot run here says why on its line).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist


import dcp_backend as cp
from dcp_backend.masks import parse_mask_args
from dcp_backend.registry import options_class
from dcp_backend.workloads import dataset_batches

LABELS = {"ring": "Ring Attn", "zigzag": "Zigzag Ring Attn", "te": "TE Attn", "loongtrain": "LoongTrain Attn",
          "dcp": "DCP Attn"}
SANITY_ORDER = ["ring", "zigzag", "te", "loongtrain", "dcp"]
SANITY_SEQLENS = [257, 96, 1, 170, 33]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# tflops_rank: model attention TFLOP/s per rank (fwd + bwd = 3x fwd); exec_tflops_rank: the FLOPs the kernels
# executed (flex recomputes each block forward in its backward: 4x fwd); imbalance: the plan's max/mean
# compute per rank; comm_mb: bytes the plan sends, all ranks, forward + backward (PlanStats).
COLUMNS = ["batch", "tokens", "docs", "backend", "mask", "world", "plan_ms", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
           "tflops_rank", "exec_tflops_rank", "imbalance", "comm_mb", "status"]
PROBE_WORK = (1, 1024, 1024, "causal_split")  # a point of the CPU cost table's grid (fp32, head dim 64, 8/2 heads)


def probe_ms(device, reps: int = 6) -> float:
    """Mean ms of one fixed kernel call run on every rank at once (all ranks busy, like a pass)."""
    from dcp_backend.cost_model import calibration_work
    from dcp_backend.kernels import get_kernel

    kern = get_kernel("auto", device)
    w = calibration_work(*PROBE_WORK)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(w.total_q, 8, 64, generator=g).to(device)
    k = torch.randn(w.total_k, 2, 64, generator=g).to(device)
    kern.forward(q, k, k, w, 0.125)
    dist.barrier()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        kern.forward(q, k, k, w, 0.125)
    _sync(device)
    ms = (time.perf_counter() - t0) / reps * 1e3
    return _mean_over_ranks(ms, device)


# ----------------------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("batches")
    src.add_argument("--seqlens", help="comma-separated document lengths of one packed batch")
    src.add_argument("--dataset", choices=["longalign", "ldc"], help="synthetic dataset-shaped batches")
    src.add_argument("--num-batches", type=int, default=1)
    src.add_argument("--tokens-per-batch", type=int, default=4096)
    src.add_argument("--scale", type=float, default=1.0,
                     help="multiply the dataset's lengths (fit the machine); documents are clipped to "
                     "--tokens-per-batch and packed whole (dcp_backend.workloads)")
    src.add_argument("--seed", type=int, default=0)
    b = p.add_argument_group("backends")
    b.add_argument("--backends", default="ring,zigzag,loongtrain,te,dcp")
    b.add_argument("--block-size", default=None, help="dcp block sizes, comma-separated (one run each)")
    b.add_argument("--head-parallel", type=int, default=None, help="loongtrain (and te a2a+p2p) a2a degree")
    b.add_argument("--window", type=int, default=None, help="loongtrain double-ring window")
    b.add_argument("--cp-comm-type", default=None, help="te: p2p or a2a+p2p")
    b.add_argument("--devices-per-node", type=int, default=None)
    b.add_argument("--kernel", default=None, help="block kernel of ring/zigzag/loongtrain/dcp (default auto)")
    a = p.add_argument_group("attention")
    a.add_argument("--mask", default="causal")
    a.add_argument("--mask-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="mask argument, repeatable (e.g. --mask-arg window=512)")
    a.add_argument("--num-heads", type=int, default=8)
    a.add_argument("--num-kv-heads", type=int, default=2)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    r = p.add_argument_group("run")
    r.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1)")
    r.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; 1 with --sanity-check)")
    r.add_argument("--spawn", type=int, default=None,
                   help="spawn N local gloo ranks (default when not under torchrun: 2)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--timeout", type=float, default=600.0, help="process-group timeout in seconds")
    r.add_argument("--csv", help="also write the rows to this CSV file")
    r.add_argument("--probe", action="store_true",
                   help="time one fixed kernel call on every rank at once before and after each measurement "
                        "(column probe_ms: a load indicator for shared machines; see tools/validate_simulator.py)")
    r.add_argument("--sanity-check", action="store_true")
    args = p.parse_args(argv)
    if args.seqlens and args.dataset:
        p.error("pass --seqlens or --dataset, not both")
    if not args.sanity_check and not (args.seqlens or args.dataset):
        p.error("pass --seqlens, --dataset or --sanity-check")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = (1 if args.sanity_check else 3) if args.repeats is None else args.repeats
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    try:
        args.mask_args = parse_mask_args(args.mask_arg)
    except cp.CPError as exc:
        p.error(str(exc))
    return args


def batches_of(args) -> list[list[int]]:
    if args.sanity_check:
        return [list(SANITY_SEQLENS)]
    if args.seqlens:
        try:
            return [[int(x) for x in args.seqlens.split(",") if x.strip()]]
        except ValueError:
            raise SystemExit(f"--seqlens must be comma-separated ints, got {args.seqlens!r}")
    return dataset_batches(args.dataset, args.num_batches, args.tokens_per_batch, args.seed, args.scale)


def runs_of(args) -> list[tuple[str, str, dict]]:
    """(label, backend, options) per requested run; options are filtered to what the backend accepts."""
    names = SANITY_ORDER if args.sanity_check else [x.strip() for x in args.backends.split(",") if x.strip()]
    runs = []
    for name in names:
        opts = {"head_parallel": args.head_parallel, "window": args.window, "kernel": args.kernel}
        if name == "te":
            opts.update(cp_comm_type=args.cp_comm_type, kernel=None)
            if args.cp_comm_type != "a2a+p2p":
                opts["head_parallel"] = None
        try:
            fields = set(options_class(name).names())
        except cp.BackendUnavailableError:
            fields = set(opts)
        except cp.CPError:
            fields = set()
        opts = {k: v for k, v in opts.items() if v is not None and k in fields}
        if args.devices_per_node:  # the topology, not an option
            opts["devices_per_node"] = args.devices_per_node
        if name == "dcp" and args.block_size:
            for bs in args.block_size.split(","):
                runs.append((f"dcp(block={bs})", name, dict(opts, block_size=bs if bs == "auto" else int(bs))))
        else:
            runs.append((name, name, opts))
    return runs


# ------------------------------------------------------------------------------------------- measuring

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collective_device(device):
    """Where a collective's tensor must live: the GPU under NCCL (which takes no CPU tensors), else CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _max_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _pairs(seqlens, spec) -> int:
    from dcp_backend.batch import PackedBatch
    from dcp_backend.masks import count_pairs

    return count_pairs(PackedBatch.from_seqlens(seqlens), spec.mask, spec.mask_args)


def measure(args, name, opts, seqlens, spec, device, dtype, check: bool) -> dict:
    """Plan, warm up, time; returns the row fields (identical on every rank) or raises."""
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = cp.get_backend(name, **opts)
    t0 = time.perf_counter()
    plan = backend.plan(seqlens, spec)
    plan_ms = (time.perf_counter() - t0) * 1e3
    idx = plan.local_indices(rank)
    g = torch.Generator().manual_seed(args.seed + 17)
    t = int(sum(seqlens))
    full = [torch.randn(t, h, spec.head_dim, generator=g)
            for h in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads, spec.num_heads)]
    q, k, v, do = (x[idx].to(device=device, dtype=dtype) for x in full)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    for _ in range(args.warmup):
        backend.attention(q, k, v, plan).backward(do)
    probes = [probe_ms(device)] if getattr(args, "probe", False) else []
    fwd, bwd = [], []
    for _ in range(args.repeats):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        out = backend.attention(q, k, v, plan)
        _sync(device)
        fwd.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        out.backward(do)
        _sync(device)
        bwd.append(time.perf_counter() - t0)
    f_ms, b_ms = (1e3 * float(np.mean(x)) for x in (fwd, bwd))
    if probes:
        probes.append(probe_ms(device))
    err = 0.0
    if check:
        from dcp_backend.dense_reference import dense_attention

        qr, kr, vr = (x.double().requires_grad_(True) for x in full[:3])
        ref = dense_attention(qr, kr, vr, seqlens, spec)
        ref.backward(full[3].double())
        for got, want in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
            want = want.detach()
            err = max(err, float((got.detach().double().cpu() - want[idx]).abs().max() / want.abs().max()))
    f_ms, b_ms, plan_ms, err = _max_over_ranks([f_ms, b_ms, plan_ms, err], device)
    fwd_flops = 4.0 * _pairs(seqlens, spec) * spec.num_heads * spec.head_dim
    flops = fwd_flops * 3  # model FLOPs: forward + backward at twice the forward
    # executed FLOPs add the block forwards a kernel recomputes in its backward (flex: one per block)
    executed = flops + fwd_flops * _backward_recompute(name, opts, device)
    secs = (f_ms + b_ms) * 1e-3
    row = {"plan_ms": plan_ms, "fwd_ms": f_ms, "bwd_ms": b_ms, "fwd_bwd_ms": f_ms + b_ms,
           **({"probe_ms": float(np.mean(probes))} if probes else {}),
           "tflops_rank": flops / secs / 1e12 / world, "exec_tflops_rank": executed / secs / 1e12 / world,
           "err": err}
    try:
        st = plan.stats(element_size=torch.empty(0, dtype=dtype).element_size())
        row["imbalance"] = st.compute_imbalance
        row["comm_mb"] = (st.fwd_inter_node_bytes + st.fwd_intra_node_bytes + st.bwd_inter_node_bytes
                          + st.bwd_intra_node_bytes) / 1e6
    except NotImplementedError:
        pass
    return row


def _backward_recompute(name: str, opts: dict, device) -> float:
    """Block forwards the backend's kernel recomputes per block backward (0 for TE's own kernels)."""
    if name == "te":
        return 0.0
    from dcp_backend.kernels import get_kernel

    return float(get_kernel(opts.get("kernel", "auto"), device).backward_recompute)


def _why(exc: BaseException) -> str:
    """The reason a backend cannot run, for its row (and its sanity-check line)."""
    if isinstance(exc, cp.BackendUnavailableError):
        if "is not available in this build" in str(exc):
            return f"not available yet ({exc})"
        return f"unavailable ({exc})"
    return f"error ({type(exc).__name__}: {exc})"


def worker(args) -> list[dict]:
    world = dist.get_world_size()
    device = torch.device(args.device_resolved)
    dtype = DTYPES[args.dtype_resolved]
    spec_kw = dict(mask=args.mask, mask_args=args.mask_args)
    if args.sanity_check:
        spec_kw = dict(mask="causal", mask_args={})
    spec = cp.AttentionSpec(args.num_heads, args.num_kv_heads, args.head_dim, **spec_kw)
    rows = []
    for bi, seqlens in enumerate(batches_of(args)):
        for label, name, opts in runs_of(args):
            row = {"batch": bi, "tokens": int(sum(seqlens)), "docs": len(seqlens), "backend": label,
                   "mask": spec.mask, "world": world, "status": "ok", "name": name}
            try:
                row.update(measure(args, name, opts, seqlens, spec, device, dtype, check=args.sanity_check))
            except (cp.CPError, cp.BackendUnavailableError) as exc:  # the same on every rank: no desync
                row["status"] = _why(exc)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ reporting

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def report(args, rows: list[dict]) -> None:
    if args.sanity_check:
        tol = 5e-2 if args.dtype_resolved != "fp32" else 1e-3
        for r in rows:
            label = LABELS.get(r["name"], r["backend"])
            if r["status"] != "ok":
                print(f"{label}: {r['status']}")
            elif not r["err"] < tol:
                print(f"{label}: FAILED (max relative error {r['err']:.2e} vs the dense reference)")
            else:
                print(f"{label}: {r['fwd_bwd_ms']:.4f} ms")
        sys.stdout.flush()
        return
    print(f"# bench_attention  {datetime.datetime.now().isoformat(timespec='seconds')}  world={rows[0]['world']}  "
          f"device={args.device_resolved}  dtype={args.dtype_resolved}  heads={args.num_heads}/{args.num_kv_heads}"
          f"  head_dim={args.head_dim}  mask={args.mask}{args.mask_args or ''}  warmup={args.warmup}  "
          f"repeats={args.repeats}  host={platform.node()}  cpus={os.cpu_count()}")
    notes: dict[str, str] = {}
    table = []
    for r in rows:
        cells = [_fmt(r.get(c, "")) for c in COLUMNS]
        if r["status"] != "ok":  # the short word in the table, the reason once below it
            short = r["status"].split(" (", 1)[0]
            notes.setdefault(r["backend"], r["status"])
            cells[-1] = short
        table.append(cells)
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
    for t in table:
        print("  ".join(x.rjust(w) for x, w in zip(t, widths)))
    for label, why in notes.items():
        print(f"# {label}: {why}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS + (["probe_ms"] if args.probe else []), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- launching

def _resolve(args) -> None:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device_resolved = "cuda" if use_cuda else "cpu"
    args.dtype_resolved = args.dtype if args.dtype != "auto" else ("bf16" if use_cuda else "fp32")


def _run_rank(args) -> None:
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.device_resolved == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        args.device_resolved = f"cuda:{local}"
        dist.init_process_group("nccl", timeout=timeout)
    else:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", timeout=timeout)
    try:
        rows = worker(args)
        if dist.get_rank() == 0:
            report(args, rows)
    finally:
        dist.destroy_process_group()


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _run_rank(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    _resolve(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and args.spawn is None:
        _run_rank(args)
        return 0
    import socket

    import torch.multiprocessing as mp

    n = args.spawn or 2
    if args.device_resolved == "cuda" and n > torch.cuda.device_count():
        raise SystemExit(f"--spawn {n} needs {n} GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_spawned, args=(n, port, args), nprocs=n, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        print(f"bench_attention: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
