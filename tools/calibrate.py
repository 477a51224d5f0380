#!/usr/bin/env python
"""Measure the block kernel on this device and write a cost table (JSON) for dcp_backend.cost_model.

    python tools/calibrate.py --device cpu --out dcp_backend/cost_tables/cpu.json      # measure (minutes)
    python tools/calibrate.py --device cuda --out my_gpu.json                           # on a GPU
    python tools/calibrate.py --from-jsonl h100_block_costs.jsonl \
        --out dcp_backend/cost_tables/h100.json                                         # convert H100 rows
    python tools/calibrate.py --check dcp_backend/cost_tables/cpu.json                  # fit quality
    python tools/calibrate.py --derive-flash dcp_backend/cost_tables/h100.json \
        --out dcp_backend/cost_tables/h100_flash.json                                   # flash-attn, derived

The grid is (q length, kv length, mask / unmasked fraction, heads, head dim, dtype); each point is a
synthetic work of equal segments (``dcp_backend.cost_model.calibration_work``) sized to a fixed amount of
work, plus a few points of many distinct small segments (so kernel-call overhead is measured apart
from per-row cost). Every point is timed forward and backward: the median of ``--repeats`` runs after
``--warmup`` runs, one torch thread on CPU (what the gloo benchmarks use per rank). The table also gets
the device's copy bandwidth (index_select + index_copy_ of rows, the executors' packing pattern).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np
import torch


from dcp_backend.cost_model import (SDPA_CAUSAL_TFLOPS, CostModel, calibration_work, derive_flash_table, read_table,
                                    table_from_block_costs, write_table)
from dcp_backend.kernels import get_kernel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="table to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernel", default="auto")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--heads", default="4/1,8/2", help="query/KV head pairs, comma-separated")
    p.add_argument("--q-lens", default="16,64,256,1024")
    p.add_argument("--kv-mults", default="1,4", help="kv length = q length x these")
    p.add_argument("--masks", default="full,causal_last,band", help="full, causal_last, band, causal_split")
    p.add_argument("--work", type=float, default=None,
                   help="(query, key) pairs x heads per point (default 2e7 CPU, 4e10 GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--network", default=None, help="network preset recorded as the table's default")
    p.add_argument("--name", default=None)
    p.add_argument("--from-jsonl", help="convert measured stage costs (data/h100_block_costs.jsonl format)")
    p.add_argument("--check", help="print measured vs fitted time for every point of this table")
    p.add_argument("--copy-only", help="re-measure only the copy bandwidth of this table (in place)")
    p.add_argument("--append", help="measure the grid and add its points to this table (in place)")
    p.add_argument("--derive-flash", metavar="TABLE",
                   help="derive a flash-attn table from this (FlexAttention) table and --sdpa-tflops (no flash-attn "
                        "measurement: see dcp_backend.cost_model.derive_flash_table)")
    p.add_argument("--sdpa-tflops", type=float, default=SDPA_CAUSAL_TFLOPS,
                   help=f"measured dense causal SDPA forward TFLOP/s on one 32K document (default {SDPA_CAUSAL_TFLOPS:g})")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ measuring

def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_point(kernel, pt: dict, dev: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(forward seconds, backward seconds): medians over ``repeats``."""
    work = calibration_work(pt["segments"], pt["q_len"], pt["kv_len"], pt["mask"], pt.get("density"),
                            pt.get("vary", False))
    dt = TORCH_DTYPES[pt["dtype"]]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(work.total_q, pt["heads"], pt["head_dim"], generator=g).to(dev, dt)
    k = torch.randn(work.total_k, pt["kv_heads"], pt["head_dim"], generator=g).to(dev, dt)
    v = torch.randn(work.total_k, pt["kv_heads"], pt["head_dim"], generator=g).to(dev, dt)
    do = torch.randn_like(q)
    scale = pt["head_dim"] ** -0.5
    out, lse = kernel.forward(q, k, v, work, scale)
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out, lse = kernel.forward(q, k, v, work, scale)
        _sync(dev)
        t1 = time.perf_counter()
        kernel.backward(do, q, k, v, out, lse, work, scale)
        _sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return float(np.median(fwd)), float(np.median(bwd))


def copy_bandwidth(dev: torch.device, repeats: int) -> dict:
    """Bytes/s and per-op overhead of gathering rows into a fresh tensor and scattering them back (the
    executors allocate their temporaries, so large ones pay page faults on a CPU)."""
    res = []
    for rows in (16, 256, 2048, 8192, 16384):  # 32 KB .. 32 MB gathered: the executors' store sizes
        x = torch.randn(rows * 2, 8, 64, device=dev)
        idx = torch.sort(torch.randperm(rows * 2, device=dev)[:rows]).values
        ts = []
        for _ in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            y = torch.index_select(x, 0, idx)  # allocating, as the executors' gathers are
            x.index_copy_(0, idx, y)
            del y
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        nbytes = 2 * rows * 8 * 64 * 4  # gathered once, scattered once
        res.append((nbytes, float(np.median(ts[1:])) / 2))  # per op
    b = np.array([r[0] / 2 for r in res])
    t = np.array([r[1] for r in res])
    # least squares on relative error (sizes span four orders of magnitude), non-negative intercept
    A = np.stack([np.ones_like(b), b], 1) / t[:, None]
    icpt, slope = np.linalg.lstsq(A, np.ones_like(b), rcond=None)[0]
    if icpt < 0:
        icpt, slope = 0.0, float(np.sum(b / t) / np.sum((b / t) ** 2))
    return {"bytes_per_s": float(1.0 / max(slope, 1e-15)), "overhead_s": float(max(icpt, 0.0)),
            "measured": [{"bytes": int(bb), "seconds": tt} for bb, tt in zip(b, t)]}


def grid(args, cuda: bool) -> list[dict]:
    work = args.work or (4e10 if cuda else 2e7)
    pts = []
    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    for dt in args.dtypes.split(","):
        for hd in (int(x) for x in args.head_dims.split(",")):
            for h, kvh in heads:
                base = dict(dtype=dt, head_dim=hd, heads=h, kv_heads=kvh)
                for q in (int(x) for x in args.q_lens.split(",")):
                    for m in (int(x) for x in args.kv_mults.split(",")):
                        kv = q * m
                        for mask in args.masks.split(","):
                            dens = 0.25 if mask == "band" else None
                            if mask == "band" and q * m * 0.25 < 4:
                                continue
                            segs = int(np.clip(round(work / (q * kv * h)), 1, 4096))
                            pts.append(dict(base, segments=segs, q_len=q, kv_len=kv, mask=mask, density=dens))
                # many distinct small segments: one kernel call each on the CPU kernel
                for q in (16, 64):
                    pts.append(dict(base, segments=32, q_len=q, kv_len=q, mask="full", density=None, vary=True))
    return pts


def measure(args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    kernel = get_kernel(args.kernel, dev)
    probe = CostModel(None, "h100" if dev.type == "cuda" else "cpu")
    pts = grid(args, dev.type == "cuda")
    t_start = time.time()
    out = []
    for i, pt in enumerate(pts):
        f, b = time_point(kernel, pt, dev, args.warmup, args.repeats)
        pt = dict(pt, fwd_s=f, bwd_s=b)
        pt = {k: v for k, v in pt.items() if v is not None}
        out.append(pt)
        print(f"[{i + 1}/{len(pts)}] {pt['dtype']} d={pt['head_dim']} h={pt['heads']}/{pt['kv_heads']} "
              f"{pt['segments']}x({pt['q_len']}x{pt['kv_len']} {pt['mask']}{' vary' if pt.get('vary') else ''}) "
              f"fwd {f * 1e3:.3f} ms bwd {b * 1e3:.3f} ms", flush=True)
    name = args.name or ("cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev).split()[1].lower())
    device_desc = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                   f"{args.threads} torch thread(s)" if dev.type == "cpu" else torch.cuda.get_device_name(dev))
    return {
        "format": "dcp-cost-table", "version": 1, "name": name,
        "device": device_desc, "kernel": kernel.name,
        "tile": list(probe.tile), "visit": probe.visit,
        "analytic": "cpu" if dev.type == "cpu" else "h100",
        "network": args.network or ("cpu-loopback" if dev.type == "cpu" else "h100-p5"),
        "source": f"measured by tools/calibrate.py on {platform.node()}",
        "date": datetime.date.today().isoformat(),
        "command": "python tools/calibrate.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "repeats": args.repeats, "statistic": "median",
        "calibration_seconds": round(time.time() - t_start, 1),
        "copy": copy_bandwidth(dev, args.repeats),
        "points": out,
    }


# ------------------------------------------------------------------------------------------ converting

def check(path: str) -> None:
    from dcp_backend.cost_model import load_cost_model

    cm = load_cost_model(path)
    print(f"# {cm.describe()}")
    print(f"{'dtype':>5} {'d':>4} {'heads':>6} {'segs':>5} {'q':>5} {'kv':>6} {'mask':>12}  "
          f"{'fwd ms':>9} {'model':>9} {'bwd ms':>9} {'model':>9}")
    errs = []
    for pt in cm.table["points"]:
        w = calibration_work(pt["segments"], pt["q_len"], pt["kv_len"], pt["mask"], pt.get("density"),
                             pt.get("vary", False))
        row = []
        for pas in ("fwd", "bwd"):
            got = cm.work_seconds(w, pt["heads"], pt["head_dim"], pt["dtype"], pas == "bwd")
            row += [pt[f"{pas}_s"] * 1e3, got * 1e3]
            errs.append(abs(got / pt[f"{pas}_s"] - 1))
        print(f"{pt['dtype']:>5} {pt['head_dim']:>4} {pt['heads']:>3}/{pt['kv_heads']:<2} {pt['segments']:>5} "
              f"{pt['q_len']:>5} {pt['kv_len']:>6} {pt['mask'] + ('*' if pt.get('vary') else ''):>12}  "
              + " ".join(f"{x:9.4f}" for x in row))
    print(f"# median |model/measured - 1| = {np.median(errs):.3f}, max = {np.max(errs):.3f}")
    for e in cm.excluded:
        print(f"# excluded as outlier: {e['segments']}x({e['q_len']}x{e['kv_len']} {e['mask']}) heads "
              f"{e['heads']}: {e['reason']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        check(args.check)
        return 0
    if args.copy_only:
        table = read_table(args.copy_only)
        dev = torch.device(args.device)
        if dev.type == "cpu":
            torch.set_num_threads(args.threads)
        table["copy"] = copy_bandwidth(dev, max(args.repeats, 9))
        table["copy_command"] = "python tools/calibrate.py " + " ".join(sys.argv[1:])
        write_table(table, args.copy_only)
        print(f"copy: {table['copy']['bytes_per_s'] / 1e9:.2f} GB/s + {table['copy']['overhead_s'] * 1e6:.1f} us per op")
        return 0
    if args.append:
        table = read_table(args.append)
        new = measure(args)
        table["points"].extend(new["points"])
        table.setdefault("appended", []).append({"command": new["command"], "date": new["date"],
                                                 "points": len(new["points"])})
        write_table(table, args.append)
        print(f"appended {len(new['points'])} points to {args.append}")
        return 0
    if not args.out:
        raise SystemExit("--out is required (or --check)")
    command = "python tools/calibrate.py " + " ".join(sys.argv[1:])
    if args.derive_flash:
        table = derive_flash_table(read_table(args.derive_flash), args.sdpa_tflops, command=command)
    elif args.from_jsonl:
        table = table_from_block_costs(args.from_jsonl, command)
    else:
        table = measure(args)
    write_table(table, args.out)  # must fit
    print(f"wrote {args.out} ({len(table['points'])} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
