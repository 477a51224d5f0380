#!/usr/bin/env python
"""Cluster-scale attention timelines from real plans and calibrated costs: every backend side by side.

    python tools/simulate.py --dataset ldc --nodes 4 --devices-per-node 8 --all-backends
    python tools/simulate.py --dataset longalign --scale 4 --num-batches 3 --network a100-p4d --all-backends
    python tools/simulate.py --seqlens 65536,32768,32768 --backends zigzag,dcp --mask lambda
    python tools/simulate.py --dataset ldc --backends dcp --timeline fwd      # per-rank op timeline

Each backend plans the batch exactly as it would for a run (DCP: blocks, Mt-KaHyPar placement, stage
schedule, compiled per-device instructions; ring / zigzag / LoongTrain / TE: their layouts and step
schedules), then the plan is replayed as a timeline of compute (the cost table: measured kernel costs,
``dcp_backend/cost_tables``) and communication (the network preset: per-device NVLink ports, per-node
NICs, latency) with the overlap each backend's executor has. Forward and backward attention time are
the maximum over ranks. Everything printed is simulated, nothing is measured here (see
docs/BENCHMARKS.md for how the simulator was validated against real runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time

import numpy as np


import dcp_backend as cp
from dcp_backend.cost_model import load_cost_model
from dcp_backend.masks import parse_key_values, parse_mask_args
from dcp_backend.sim.benchmark_batches import describe, paper_batches
from dcp_backend.sim.compare import ALL_BACKENDS, BASELINES, DCP_COMPUTE_TOLERANCES, compare_batch
from dcp_backend.sim.network import PRESETS, Topology, get_network


def _numbers(text: str, valid, wanted: str) -> tuple:
    """Comma-separated numbers that all pass ``valid``, else an argparse error naming ``wanted``."""
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or not all(valid(v) for v in vals):
        raise argparse.ArgumentTypeError(f"takes {wanted} separated by commas, got {text!r}")
    return vals


def share_factors(text: str) -> tuple:
    """``--dcp-shares``: token-share factors >= 1, comma-separated (whole numbers stay ints in the labels)."""
    vals = _numbers(text, lambda v: v >= 1, "token-share factors of at least 1 (e.g. 1,1.5,2)")
    return tuple(int(v) if v == int(v) else v for v in vals)


def compute_tolerances(text: str) -> tuple:
    """``--dcp-compute-tolerances``: compute_imbalance values above 0, comma-separated."""
    return _numbers(text, lambda v: v > 0, "compute_imbalance values above 0 (e.g. 0.1,0.2)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    b = p.add_argument_group("batches")
    b.add_argument("--dataset", choices=["ldc", "longalign"])
    b.add_argument("--seqlens", help="comma-separated document lengths of one batch")
    b.add_argument("--scale", type=float, default=1.0, help="length scale (published: 0.5, 1, 2, 4)")
    b.add_argument("--num-batches", type=int, default=1)
    b.add_argument("--tokens-per-batch", type=int, default=131072)
    b.add_argument("--seed", type=int, default=42)
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=4)
    c.add_argument("--devices-per-node", type=int, default=8)
    c.add_argument("--network", default=None, help=f"one of {sorted(PRESETS)} (default: the cost table's)")
    c.add_argument("--cost-model", default="h100", help="h100, cpu, a table path, or analytic:<h100|a100|cpu>")
    c.add_argument("--bandwidth-scale", type=float, default=1.0, help="multiply every link's bandwidth")
    c.add_argument("--kernel", default="auto", choices=["auto", "flash", "table"],
                   help="block-kernel costs, the same rule for every backend: flash = flash-attn (derived "
                        "h100_flash table) for full and causal segments, the table's kernel for the rest; table = "
                        "the table's kernel everywhere (h100: FlexAttention, with its backward recompute); auto = "
                        "flash where the table has a flash companion")
    a = p.add_argument_group("attention")
    a.add_argument("--num-heads", type=int, default=8)
    a.add_argument("--num-kv-heads", type=int, default=2)
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    a.add_argument("--mask", default="causal")
    a.add_argument("--mask-arg", action="append", default=[], metavar="KEY=VALUE")
    k = p.add_argument_group("backends")
    k.add_argument("--all-backends", action="store_true", help=f"all of {', '.join(ALL_BACKENDS)}")
    k.add_argument("--backends", default="zigzag,loongtrain,dcp")
    k.add_argument("--dcp-block-sizes", default="1024,2048,4096", help="best kept (published grid)")
    k.add_argument("--dcp-shares", default=(1, 2), type=share_factors,
                   help="token shares DCP's hypergraph plans are made at (2 = a device may hold twice the mean "
                        "tokens, as hybrid's 2x share), best kept")
    k.add_argument("--dcp-compute-tolerances", default=DCP_COMPUTE_TOLERANCES, type=compute_tolerances,
                   help="compute_imbalance values DCP's hypergraph plans are made at (a looser balance may cut "
                        "fewer bytes across nodes), best kept")
    k.add_argument("--dcp-candidates", default="hypergraph,zigzag,zigzag2d,ring",
                   help="dcp plans to try: hypergraph (per block size), zigzag, zigzag2d (structured placements), "
                        "ring (the hypergraph per block size and zigzag2d with schedule=ring)")
    k.add_argument("--dcp-plan-cost-model", default="table",
                   help="cost model for DCP's planning weights: 'table' (same as --cost-model) or 'none'")
    k.add_argument("--dcp-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DCP option, repeatable (e.g. memory_limit=auto, communication=direct)")
    k.add_argument("--dcp-memory-vs-zigzag", type=float, default=None, metavar="F",
                   help="DCP keeps its fastest plan whose largest device needs at most F times zigzag's attention "
                        "memory (e.g. 1.5); when none fits, the fastest, marked 'over the memory cap'")
    k.add_argument("--lt-windows", default=None, help="LoongTrain windows to try (default: powers of two)")
    o = p.add_argument_group("output")
    o.add_argument("--csv", help="write one row per (batch, backend)")
    o.add_argument("--json", help="write everything (per batch, per backend) as JSON")
    o.add_argument("--timeline", choices=["fwd", "bwd"], help="print the per-rank op timeline of each backend")
    o.add_argument("--fused-copies", action="store_true",
                   help="charge one memory operation per instruction (what-if: fused packing kernels)")
    o.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if bool(args.dataset) == bool(args.seqlens):
        p.error("pass exactly one of --dataset or --seqlens")
    try:
        args.mask_args = parse_mask_args(args.mask_arg)
        args.dcp_options = parse_key_values(args.dcp_option, "--dcp-option values")
    except cp.CPError as exc:
        p.error(str(exc))
    return args


def _timeline(rep, which: str) -> None:
    res = rep.fwd if which == "fwd" else rep.bwd
    print(f"  timeline {rep.label} {which}: (rank: op start-end ms, ops >= 1% of the pass)")
    for r in range(res.world_size):
        items = [f"{s.label} {s.start * 1e3:.2f}-{s.end * 1e3:.2f}" for s in res.spans[r]
                 if s.end - s.start >= 0.01 * res.time]
        print(f"    r{r}: " + "; ".join(items))


def main(argv=None) -> int:
    args = parse_args(argv)
    cm = load_cost_model(args.cost_model)
    net_name = args.network or cm.network or "h100-p5"
    net = get_network(net_name)
    if args.bandwidth_scale != 1.0:
        net = net.scaled(bandwidth=args.bandwidth_scale)
    topo = Topology.grid(args.nodes, args.devices_per_node)
    spec = cp.AttentionSpec(args.num_heads, args.num_kv_heads, args.head_dim, mask=args.mask, mask_args=args.mask_args)
    backends = ALL_BACKENDS if args.all_backends else tuple(x.strip() for x in args.backends.split(",") if x.strip())
    if args.seqlens:
        batches = [[int(x) for x in args.seqlens.split(",")]]
    else:
        batches = paper_batches(args.dataset, args.num_batches, args.tokens_per_batch, args.scale, args.seed)
    from dcp_backend.dcp.config import DCPOptions

    try:
        dcp_opts = DCPOptions(**{"cost_model": cm.spec if args.dcp_plan_cost_model == "table" else None,
                                 **args.dcp_options})
    except (cp.CPError, TypeError) as exc:
        print(f"simulate.py: error: --dcp-option: {exc}", file=sys.stderr)
        return 2
    from dcp_backend.sim.op_costs import flash_companion

    fl = flash_companion(cm, args.kernel)
    print(f"# simulate  {time.strftime('%Y-%m-%d %H:%M')}  topology {args.nodes}x{args.devices_per_node}  "
          f"network {net.name}  cost model {cm.describe()}")
    print(f"# kernels: {'flash-attn (' + fl.name + ') for full/causal segments, ' if fl else ''}"
          f"{cm.table.get('kernel', 'analytic') if cm.table else 'analytic'} for "
          f"{'the rest' if fl else 'every segment'}")
    print(f"# heads {args.num_heads}/{args.num_kv_heads} head_dim {args.head_dim} {args.dtype} mask {args.mask}"
          f"{args.mask_args or ''}  batches: {describe(batches)}")
    rows, dump = [], []
    for bi, seqlens in enumerate(batches):
        t0 = time.perf_counter()
        log = None if args.quiet else (lambda s: print(s, flush=True))
        if log:
            log(f"batch {bi}: {len(seqlens)} documents, {sum(seqlens)} tokens, longest {max(seqlens)}")
        res = compare_batch(seqlens, spec, topo, cm, net, args.dtype, backends,
                            tuple(int(x) for x in args.dcp_block_sizes.split(",")), dcp_opts,
                            [int(x) for x in args.lt_windows.split(",")] if args.lt_windows else None,
                            tuple(args.dcp_candidates.split(",")), log, fused_copies=args.fused_copies,
                            dcp_shares=args.dcp_shares, dcp_compute_tolerances=args.dcp_compute_tolerances,
                            kernel=args.kernel, dcp_memory_vs_zigzag=args.dcp_memory_vs_zigzag)
        wall = time.perf_counter() - t0
        for label, e in res.items():
            config = e.config + (" (over the memory cap)" if e.over_memory_limit else "")
            rows.append({"batch": bi, "backend": label, "config": config, "fwd_ms": e.fwd_ms, "bwd_ms": e.bwd_ms,
                         "memory_mb": e.memory_bytes / 1e6})
            if args.timeline:
                _timeline(e.report, args.timeline)
        dump.append({"seqlens": list(map(int, seqlens)), "wall_s": wall,
                     "results": {k: {"config": e.config, "fwd_ms": e.fwd_ms, "bwd_ms": e.bwd_ms,
                                     "memory_mb": e.memory_bytes / 1e6, "over_memory_limit": e.over_memory_limit,
                                     **e.report.summary()} for k, e in res.items()}})
        if log:
            log(f"batch {bi}: simulated every backend in {wall:.1f} s")
    _print_table(rows, batches)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["batch", "backend", "config", "fwd_ms", "bwd_ms", "memory_mb"])
            w.writeheader()
            w.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "network": net.name, "cost_model": cm.describe(),
                       "batches": dump}, f, indent=1)
    return 0


def _print_table(rows: list[dict], batches) -> None:
    labels = []
    for r in rows:
        if r["backend"] not in labels:
            labels.append(r["backend"])
    print()
    print(f"{'backend':16s} {'fwd ms':>9s} {'bwd ms':>9s} {'mem MB':>8s}   (mean over {len(batches)} batch(es); "
          f"memory: the largest device's; config of the last)")
    means = {}
    for lab in labels:
        f = np.mean([r["fwd_ms"] for r in rows if r["backend"] == lab])
        b = np.mean([r["bwd_ms"] for r in rows if r["backend"] == lab])
        m = np.mean([r["memory_mb"] for r in rows if r["backend"] == lab])
        cfg = [r["config"] for r in rows if r["backend"] == lab][-1]
        means[lab] = (f, b)
        print(f"{lab:16s} {f:9.3f} {b:9.3f} {m:8.1f}   {cfg}")
    base = [lab for lab in labels if lab in BASELINES]
    if "dcp" in means and base:
        for i, which in enumerate(("fwd", "bwd")):
            # speed-up per batch against that batch's best baseline, then the mean
            ups = []
            for bi in range(len(batches)):
                br = {r["backend"]: r for r in rows if r["batch"] == bi}
                best = min(br[lab][f"{which}_ms"] for lab in base)
                ups.append(best / br["dcp"][f"{which}_ms"])
            bl = min(base, key=lambda lab: means[lab][i])
            print(f"dcp speed-up over the best baseline, {which}: {np.mean(ups):.2f}x (per batch "
                  f"{', '.join(f'{u:.2f}' for u in ups)}; best baseline on average: {bl})")


if __name__ == "__main__":
    sys.exit(main())
