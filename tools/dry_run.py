#!/usr/bin/env python
"""Plan context-parallel attention for batches without GPUs: DCP statistics beside the static baselines.

For every batch the tool makes a DCP plan (blocks, hypergraph placement, schedules, and the compiled
programs of *all* devices) and the ring, zigzag, LoongTrain, TE and Megatron-Core hybrid CP plans (the
latter from megatron-core's own scheduler; power-of-two CP sizes only) for the same lengths, mask and
topology, and reports what each would move and balance: forward/backward bytes inter- and intra-node
(totals and per device), compute per device and its imbalance (max/mean), memory per device, and for
DCP the stages, instructions and planning seconds per phase. Nothing runs on a device.

    python tools/dry_run.py --seqlens 598,4423,9965 --nodes 4 --devices-per-node 8 --block-size 1024
    python tools/dry_run.py --dataset ldc --num-batches 20 --tokens-per-batch 65536 --json
    python tools/dry_run.py --seqlens-file lengths.txt --tokens-per-batch 131072 --mask lambda \
        --mask-arg window=2048
    python tools/dry_run.py --dataset ldc --num-batches 20 --nodes 4 --devices-per-node 8 --sweep \
        --out dry_run_ldc.csv          # then: python tools/plot_dry_run.py dry_run_ldc.csv

Batches: ``--seqlens`` (one batch), ``--seqlens-file`` (a JSON list of batches, ``{"batches": [...]}``,
or document lengths, one per line or a flat JSON list, packed whole and in order into batches of
``--tokens-per-batch``; a document over the budget is an error), or ``--dataset longalign|ldc`` with
``--num-batches`` (seeded synthetic lengths, see :mod:`dcp_backend.workloads`; documents are clipped to
``--tokens-per-batch``, which is the "max length" of a configuration).

Planning time is the plan's ``planning_seconds`` with every device's programs compiled (blocks +
partition + schedule + compile; wall clock); in training each rank compiles only its own programs, which
``rank_planning_seconds`` counts (blocks + partition + schedule + the slowest rank's own programs). On a
shared machine also read ``planning_cpu_seconds`` (the process's CPU time for the same work: the
planner is single-threaded, so this is its cost without other jobs' load). Bytes assume
``--element-size`` bytes per model element (2 = bf16); 1 MB = 10^6 bytes. Before the first timed plan the
tool plans one small batch untimed: a process's first plan also pays one-time start-up (lazy imports, the
partitioner's first call; about 0.4 s here), which a training run's planning worker pays once, not per batch.

``--json`` prints one JSON object per batch (DCP figures at the top level, the baselines' under
``baselines``). ``--sweep`` runs the grids of the published dry-run study (block size x mask; lambda
window; shared-question answers; causal-blockwise k_local; compute imbalance x inter-node factor) and
writes one CSV row per (grid, configuration, batch); a configuration that appears in two grids is
planned once. ``tools/plot_dry_run.py`` draws the figures from that CSV.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace


import numpy as np

import dcp_backend as cp
from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.registry import make_options, plan_each
from dcp_backend.masks import count_pairs, parse_key_values, parse_mask_args, resolve_mask_args
from dcp_backend.workloads import DATASETS, checked_batch, dataset_batches, read_seqlens_file

BASELINES = ("ring", "zigzag", "loongtrain", "te", "hybrid")
BYTE_KEYS = ("fwd_inter_node_bytes", "bwd_inter_node_bytes", "fwd_intra_node_bytes", "bwd_intra_node_bytes")
FIGURE_KEYS = BYTE_KEYS + ("compute_imbalance", "memory_imbalance", "max_device_memory_bytes")
PHASES = ("blocks", "partition", "schedule", "compile")
SWEEP_MASKS = ("causal", "lambda", "shared_question", "causal_blockwise")
_DEFAULTS = DCPOptions()

# The published study's grids (tokens per batch 65536, block 1024, compute 0.1 / memory 0.2 / factor 4 in
# the base point); "small" is a seconds-long version for tests and smoke runs.
GRIDS = {
    "paper": {
        "block_size": (512, 1024, 2048, 4096),
        "lambda_window": (512, 1024, 2048, 4096, 8192),
        "num_answers": (1, 2, 4, 8, 16),
        "k_local": (1, 2, 4, 8, 16),
        "compute_imbalance": (0.1, 0.2, 0.3, 0.4),
        "inter_node_factor": (1, 2, 4, 8, 16),
    },
    "small": {
        "block_size": (64, 128),
        "lambda_window": (32, 128),
        "num_answers": (1, 4),
        "k_local": (1, 2),
        "compute_imbalance": (0.1, 0.3),
        "inter_node_factor": (1, 4),
    },
}
SMALL_GRID_MASK_ARGS = {"causal_blockwise": {"block": 32}, "lambda": {"sink": 8}}

CSV_COLUMNS = [
    "dataset", "tokens_per_batch", "nodes", "devices_per_node", "grid", "mask", "mask_args", "lambda_window",
    "num_answers", "k_local", "block_size", "compute_imbalance_limit", "memory_imbalance_limit",
    "inter_node_factor", "num_stages", "batch", "num_docs", "tokens", "mask_sparsity", "status",
    "planning_seconds", "rank_planning_seconds", *(f"{p}_seconds" for p in PHASES), "planning_wall_seconds", "planning_cpu_seconds",
    *BYTE_KEYS, "max_device_fwd_inter_node_bytes", "compute_imbalance", "memory_imbalance",
    "max_device_memory_bytes", "num_token_blocks", "num_computation_blocks", "instructions",
    *(f"{b}_{k}" for b in BASELINES for k in ("fwd_inter_node_bytes", "bwd_inter_node_bytes", "compute_imbalance")),
]


# ----------------------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dry_run.py", description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (python -m pydoc tools/dry_run.py) for details.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("batches (one of --seqlens, --seqlens-file, --dataset)")
    src.add_argument("--seqlens", help="comma-separated document lengths of one packed batch")
    src.add_argument("--seqlens-file", help="JSON list of batches (or {\"batches\": [...]}), or document lengths "
                     "one per line / a flat JSON list, packed into batches of --tokens-per-batch")
    src.add_argument("--dataset", choices=list(DATASETS), help="seeded synthetic dataset-shaped batches")
    src.add_argument("--num-batches", type=int, default=1, help="batches drawn with --dataset (default 1)")
    src.add_argument("--tokens-per-batch", type=int, default=65536,
                     help="batch budget in tokens = max document length (default 65536)")
    src.add_argument("--scale", type=float, default=1.0, help="multiply the dataset's lengths (default 1)")
    src.add_argument("--seed", type=int, default=0, help="seed of the dataset draws and of the DCP partitioner")
    t = p.add_argument_group("topology")
    t.add_argument("--nodes", type=int, default=4)
    t.add_argument("--devices-per-node", type=int, default=8)
    a = p.add_argument_group("attention")
    a.add_argument("--mask", default="causal", help=f"one of {', '.join(cp.available_masks())} (default causal)")
    a.add_argument("--mask-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="mask argument, repeatable (e.g. --mask-arg window=2048)")
    a.add_argument("--num-heads", type=int, default=8)
    a.add_argument("--num-kv-heads", type=int, default=2)
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--element-size", type=int, default=2, choices=[2, 4], help="bytes per element (2 = bf16)")
    d = p.add_argument_group("DCP planner")
    d.add_argument("--block-size", default="1024", help="tokens per block, or 'auto' (default 1024)")
    d.add_argument("--head-block-size", type=int, default=None,
                   help="query heads per head block (default: query heads per KV head)")
    d.add_argument("--compute-imbalance", type=float, default=_DEFAULTS.compute_imbalance,
                   help=f"allowed max/mean - 1 of compute per device (default {_DEFAULTS.compute_imbalance})")
    d.add_argument("--memory-imbalance", type=float, default=_DEFAULTS.memory_imbalance,
                   help=f"allowed max/mean - 1 of tokens per device (default {_DEFAULTS.memory_imbalance})")
    d.add_argument("--inter-node-factor", type=float, default=_DEFAULTS.inter_node_imbalance_factor,
                   help="compute tolerance multiplier of the node-level partition "
                   f"(default {_DEFAULTS.inter_node_imbalance_factor})")
    d.add_argument("--num-stages", type=int, default=_DEFAULTS.num_stages)
    d.add_argument("--partitioner", default=_DEFAULTS.partitioner, choices=["mtkahypar", "greedy"])
    d.add_argument("--inter-node-cost", type=float, default=_DEFAULTS.inter_node_cost)
    d.add_argument("--dcp-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DCP option, repeatable (e.g. memory_limit=150, communication=direct, "
                   "partial_dtype=fp32, placement_seeds=none; see dcp_backend/dcp/config.py); overrides the "
                   "flags above")
    d.add_argument("--verify", action="store_true", help="also check every DCP plan with the symbolic verifier")
    o = p.add_argument_group("output")
    o.add_argument("--baselines", default=",".join(BASELINES),
                   help="baselines planned beside DCP, comma-separated, or 'none' (default: all five)")
    o.add_argument("--json", action="store_true", help="one JSON object per batch on stdout")
    o.add_argument("--sweep", action="store_true", help="run the published dry-run grids into --out (CSV)")
    o.add_argument("--grid", default="paper", choices=sorted(GRIDS), help="sweep grid (default paper)")
    o.add_argument("--out", default="dry_run_sweep.csv", help="sweep CSV path (default dry_run_sweep.csv)")
    o.add_argument("--jobs", type=int, default=0,
                   help="sweep: plans in parallel processes, one core each (default 0 = one per available core)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    sources = [x for x in ("seqlens", "seqlens_file", "dataset") if getattr(args, x)]
    if len(sources) != 1:
        p.error("pass exactly one of --seqlens, --seqlens-file, --dataset")
    for name in ("num_batches", "tokens_per_batch", "nodes", "devices_per_node", "num_stages"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int")
    if not args.scale > 0:
        p.error("--scale must be positive")
    if args.jobs < 0:
        p.error("--jobs must be >= 0 (0 = one process per available core)")
    if args.json and args.sweep:
        p.error("--sweep writes a CSV (--out); drop --json")
    if args.block_size != "auto":
        try:
            args.block_size = int(args.block_size)
        except ValueError:
            p.error(f"--block-size must be an int or 'auto', got {args.block_size!r}")
    try:
        args.mask_args = parse_mask_args(args.mask_arg)
    except cp.CPError as exc:
        p.error(str(exc))
    args.baselines = [] if args.baselines.strip() == "none" else [
        b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = sorted(set(args.baselines) - set(BASELINES))
    if bad:
        p.error(f"unknown baseline(s) {bad}; choose from {list(BASELINES)} or 'none'")
    try:
        args.spec = make_spec(args, args.mask, args.mask_args)
        args.topology = cp.Topology.grid(args.nodes, args.devices_per_node)
        options = dict(
            block_size=args.block_size, head_block_size=args.head_block_size,
            compute_imbalance=args.compute_imbalance, memory_imbalance=args.memory_imbalance,
            inter_node_imbalance_factor=args.inter_node_factor, num_stages=args.num_stages, seed=args.seed,
            partitioner=args.partitioner, inter_node_cost=args.inter_node_cost)
        options.update(parse_key_values(args.dcp_option, "--dcp-option values"))
        args.options = make_options("dcp", **options)
    except cp.CPError as exc:
        p.error(str(exc))
    try:
        args.batches = load_batches(args)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    return args


def make_spec(args, mask: str, mask_args: dict) -> cp.AttentionSpec:
    return cp.AttentionSpec(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                            mask=mask, mask_args=dict(mask_args))


def load_batches(args) -> list[list[int]]:
    if args.seqlens:
        try:
            batch = [int(x) for x in args.seqlens.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seqlens must be comma-separated ints, got {args.seqlens!r}")
        return [checked_batch(batch, "--seqlens")]
    if args.dataset:
        return dataset_batches(args.dataset, args.num_batches, args.tokens_per_batch, args.seed, args.scale)
    return read_seqlens_file(args.seqlens_file, args.tokens_per_batch)




# ----------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class Config:
    """One DCP configuration of a sweep (the mask arguments resolved, so equal configurations compare equal)."""

    mask: str
    mask_args: tuple
    options: DCPOptions

    @property
    def args(self) -> dict:
        return dict(self.mask_args)


def make_config(mask: str, mask_args: dict, options: DCPOptions) -> Config:
    return Config(mask, tuple(sorted(resolve_mask_args(mask, mask_args).items())), options)


def mask_sparsity(batch: PackedBatch, mask: str, mask_args: dict) -> float:
    """Unmasked (query, key) pairs over causal pairs of the batch (1 = causal; smaller = sparser)."""
    pairs = float(count_pairs(batch, mask, mask_args))
    L = batch.seqlens.astype(np.float64)
    return pairs / float((L * (L + 1) / 2).sum())


_WARM: set = set()


def _warm_up(spec: cp.AttentionSpec, topology: cp.Topology, options: DCPOptions, element_size: int) -> None:
    """Plan one small batch untimed, once per process and topology (one-time start-up is not per-batch cost)."""
    from dcp_backend.dcp.planner import make_plan

    if topology in _WARM:
        return
    _WARM.add(topology)
    docs = [512 * topology.world_size, 64 * topology.world_size, 300]
    try:
        make_plan(PackedBatch.from_seqlens(docs), spec, topology, replace(options, block_size=256),
                  element_size=element_size, compile_all=True)
    except cp.CPError:  # a mask or option this small batch does not suit: the timed plan reports it
        pass


def plan_dcp(batch: PackedBatch, spec: cp.AttentionSpec, topology: cp.Topology, options: DCPOptions,
             element_size: int, verify: bool = False) -> dict:
    """Plan (all devices compiled) and return the DCP statistics as a flat dict."""
    from dcp_backend.dcp.planner import make_plan

    _warm_up(spec, topology, options, element_size)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = make_plan(batch, spec, topology, options, element_size=element_size, compile_all=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = plan.stats(element_size)
    if verify:
        from dcp_backend.dcp.verify import verify_plan

        verify_plan(plan)
    d = st.as_dict()
    for k in ("backend_name", "world_size", "nodes", "devices_per_node"):
        d.pop(k)
    d["tokens_per_device"] = d.pop("tokens")
    d["planning_wall_seconds"] = wall
    d["planning_cpu_seconds"] = cpu  # CPU time of the process: the plan's cost without other jobs' load
    d["instructions"] = int(sum(d["instructions_per_device"]))
    d["max_device_fwd_inter_node_bytes"] = int(max(d["fwd_inter_node_bytes_per_rank"]))
    if verify:
        d["verified"] = True
    return d


def plan_baselines(names, seqlens, spec: cp.AttentionSpec, topology: cp.Topology, element_size: int) -> dict:
    """The same figures for each static baseline at its defaults, or ``{"error": reason}`` for one that
    cannot plan this batch."""
    out = {}
    for name in names:
        t0 = time.perf_counter()
        plan = plan_each([name], seqlens, spec, topology)[name]
        if isinstance(plan, cp.CPError):
            out[name] = {"error": str(plan)}
            continue
        out[name] = _baseline_figures(plan.stats(element_size), time.perf_counter() - t0)
    return out


def _baseline_figures(st, seconds: float) -> dict:
    d = st.as_dict()
    out = {k: d[k] for k in FIGURE_KEYS}
    out["planning_seconds"] = seconds
    for k in ("head_parallel", "window", "cp_comm_type", "padding_fraction", "max_seqlen_per_rank", "rounds",
              "group_sizes"):
        if k in d:
            out[k] = d[k]
    out["memory_bytes"] = d["memory_bytes"]  # each device's peak, as DCP's record has it
    out["fwd_bytes_per_rank"] = d.get("fwd_bytes_per_rank")
    out["bwd_bytes_per_rank"] = d.get("bwd_bytes_per_rank")
    return out


def batch_record(index: int, seqlens: list[int], args, spec: cp.AttentionSpec, options: DCPOptions) -> dict:
    batch = PackedBatch.from_seqlens(seqlens)
    world = args.topology.world_size
    rec = {"batch": index, "num_docs": len(seqlens), "tokens": int(sum(seqlens)), "seqlens": list(seqlens),
           "nodes": args.nodes, "devices_per_node": args.devices_per_node, "world_size": world,
           "mask": spec.mask, "mask_args": dict(spec.mask_args),
           "mask_sparsity": mask_sparsity(batch, spec.mask, spec.mask_args)}
    rec.update(plan_dcp(batch, spec, args.topology, options, args.element_size, args.verify))
    rec["dcp_options"] = dataclasses.asdict(options)  # every option the plan was made with
    rec["baselines"] = plan_baselines(args.baselines, seqlens, spec, args.topology, args.element_size)
    return rec


# ----------------------------------------------------------------------------------------- output

def _mb(x) -> str:
    return f"{x / 1e6:.1f}"


def print_record(rec: dict, out=None) -> None:
    out = out or sys.stdout
    ph = rec["planning_seconds_by_phase"]
    print(f"batch {rec['batch']}: {rec['num_docs']} documents, {rec['tokens']} tokens, mask {rec['mask']} "
          f"(unmasked/causal pairs {rec['mask_sparsity']:.3f}), {rec['nodes']} nodes x "
          f"{rec['devices_per_node']} devices", file=out)
    print(f"  dcp: block {rec['block_size']}, head block {rec['head_block_size']}, {rec['num_stages']} stages, "
          f"{rec['num_token_blocks']} token blocks, {rec['num_computation_blocks']} computation blocks, "
          f"{rec['instructions']} instructions", file=out)
    print(f"  dcp planning {rec['planning_seconds']:.3f} s (" + ", ".join(
        f"{p} {ph.get(p, 0.0):.3f}" for p in PHASES) + f"; cpu {rec['planning_cpu_seconds']:.3f} s)"
        + (", verified" if rec.get("verified") else "")
        + f"; one rank {rec['rank_planning_seconds']:.3f} s (its own programs only)",
        file=out)
    head = (f"  {'backend':<11}{'fwd inter MB':>14}{'bwd inter MB':>14}{'fwd intra MB':>14}{'bwd intra MB':>14}"
            f"{'compute imb':>12}{'memory imb':>11}{'max mem MB':>11}")
    print(head, file=out)
    rows = [("dcp", rec)] + list(rec["baselines"].items())
    for name, r in rows:
        if "error" in r:
            print(f"  {name:<11}  ({r['error'].split(' (')[0]})", file=out)
            continue
        print(f"  {name:<11}" + "".join(f"{_mb(r[k]):>14}" for k in BYTE_KEYS)
              + f"{r['compute_imbalance']:>12.3f}{r['memory_imbalance']:>11.3f}"
              f"{_mb(r['max_device_memory_bytes']):>11}", file=out)


def print_summary(records: list[dict], out=None) -> None:
    out = out or sys.stdout
    print(f"mean over {len(records)} batches:", file=out)
    print(f"  dcp planning {np.mean([r['planning_seconds'] for r in records]):.3f} s (max "
          f"{max(r['planning_seconds'] for r in records):.3f}); one rank "
          f"{np.mean([r['rank_planning_seconds'] for r in records]):.3f} s (max "
          f"{max(r['rank_planning_seconds'] for r in records):.3f})", file=out)
    names = ["dcp"] + list(records[0]["baselines"])
    for name in names:
        rs = [r if name == "dcp" else r["baselines"][name] for r in records]
        rs = [r for r in rs if "error" not in r]
        if not rs:
            continue
        print(f"  {name:<11}" + "".join(f"{_mb(np.mean([r[k] for r in rs])):>14}" for k in BYTE_KEYS)
              + f"{np.mean([r['compute_imbalance'] for r in rs]):>12.3f}"
              f"{np.mean([r['memory_imbalance'] for r in rs]):>11.3f}"
              f"{_mb(np.mean([r['max_device_memory_bytes'] for r in rs])):>11}", file=out)


def _progress(total: int, args, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="plan", file=sys.stderr, dynamic_ncols=True,
                disable=True if args.no_progress or total < 2 else None)


def run_batches(args) -> list[dict]:
    records = []
    with _progress(len(args.batches), args, "dry run") as bar:
        for i, seqlens in enumerate(args.batches):
            rec = batch_record(i, seqlens, args, args.spec, args.options)
            records.append(rec)
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                bar.clear()
                print_record(rec)
            bar.update(1)
    if not args.json and len(records) > 1:
        print_summary(records)
    return records


# ----------------------------------------------------------------------------------------- sweep

def sweep_configs(args) -> list[tuple[str, Config]]:
    """(grid name, configuration) in the published study's order; the base point is the command line's
    block size and balance options."""
    g = GRIDS[args.grid]
    extra = SMALL_GRID_MASK_ARGS if args.grid == "small" else {}
    base = args.options

    def cfg(mask, margs=None, **opt):
        return make_config(mask, {**extra.get(mask, {}), **(margs or {})}, replace(base, **opt))

    out = [("block_size", cfg(m, block_size=b)) for b in g["block_size"] for m in SWEEP_MASKS]
    out += [("lambda_window", cfg("lambda", {"window": w})) for w in g["lambda_window"]]
    out += [("shared_question", cfg("shared_question", {"num_answers": n})) for n in g["num_answers"]]
    out += [("causal_blockwise", cfg("causal_blockwise", {"k_local": k})) for k in g["k_local"]]
    out += [("imbalance", cfg("causal", compute_imbalance=float(c), inter_node_imbalance_factor=float(f)))
            for c in g["compute_imbalance"] for f in g["inter_node_factor"]]
    return out


def sweep_row(args, grid: str, cfg: Config, b: int, seqlens, dcp: dict, baselines: dict, sparsity: float) -> dict:
    o = cfg.options
    margs = cfg.args
    row = {
        "dataset": args.dataset or ("file" if args.seqlens_file else "seqlens"),
        "tokens_per_batch": args.tokens_per_batch, "nodes": args.nodes, "devices_per_node": args.devices_per_node,
        "grid": grid, "mask": cfg.mask, "mask_args": json.dumps(margs, sort_keys=True),
        "lambda_window": margs["window"] if cfg.mask == "lambda" else "",
        "num_answers": margs["num_answers"] if cfg.mask == "shared_question" else "",
        "k_local": margs["k_local"] if cfg.mask == "causal_blockwise" else "",
        "block_size": o.block_size, "compute_imbalance_limit": o.compute_imbalance,
        "memory_imbalance_limit": o.memory_imbalance, "inter_node_factor": o.inter_node_imbalance_factor,
        "num_stages": o.num_stages, "batch": b, "num_docs": len(seqlens), "tokens": int(sum(seqlens)),
        "mask_sparsity": f"{sparsity:.6f}",
    }
    if "error" in dcp:
        row["status"] = "error: " + dcp["error"]
    else:
        row["status"] = "ok"
        row["block_size"] = dcp["block_size"]
        row["planning_seconds"] = f"{dcp['planning_seconds']:.6f}"
        row["rank_planning_seconds"] = f"{dcp['rank_planning_seconds']:.6f}"
        for p in PHASES:
            row[f"{p}_seconds"] = f"{dcp['planning_seconds_by_phase'].get(p, 0.0):.6f}"
        row["planning_wall_seconds"] = f"{dcp['planning_wall_seconds']:.6f}"
        row["planning_cpu_seconds"] = f"{dcp['planning_cpu_seconds']:.6f}"
        for k in (*BYTE_KEYS, "max_device_fwd_inter_node_bytes", "max_device_memory_bytes", "num_token_blocks",
                  "num_computation_blocks", "instructions"):
            row[k] = dcp[k]
        row["compute_imbalance"] = f"{dcp['compute_imbalance']:.6f}"
        row["memory_imbalance"] = f"{dcp['memory_imbalance']:.6f}"
    for name, st in baselines.items():
        if "error" not in st:
            row[f"{name}_fwd_inter_node_bytes"] = st["fwd_inter_node_bytes"]
            row[f"{name}_bwd_inter_node_bytes"] = st["bwd_inter_node_bytes"]
            row[f"{name}_compute_imbalance"] = f"{st['compute_imbalance']:.6f}"
    return row


def _sweep_task(task) -> tuple[tuple, dict]:
    """One DCP plan of a sweep (runs in the main process or in a worker process)."""
    key, seqlens, spec, topology, options, element_size, verify = task
    try:
        return key, plan_dcp(PackedBatch.from_seqlens(seqlens), spec, topology, options, element_size, verify)
    except cp.CPError as exc:
        return key, {"error": str(exc)}


def _expected_cost(cfg: Config, seqlens) -> float:
    """Rough planning cost (blocks per document, squared) to start the slowest plans first."""
    b = cfg.options.block_size if isinstance(cfg.options.block_size, int) else 1024
    return float(sum((-(-n // b)) ** 2 for n in seqlens))


def _resolve_jobs(jobs: int) -> int:
    if jobs > 0:
        return jobs
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_sweep(args) -> dict:
    configs = sweep_configs(args)
    unique = list(dict.fromkeys(c for _, c in configs))
    total = len(unique) * len(args.batches)
    jobs = min(_resolve_jobs(args.jobs), total)
    t_start = time.perf_counter()
    per_mask: dict[tuple, tuple[float, dict]] = {}  # (mask, args, batch) -> (sparsity, baselines)
    tasks = []
    for c, cfg in enumerate(unique):
        spec = make_spec(args, cfg.mask, cfg.args)
        for b, seqlens in enumerate(args.batches):
            key = (cfg.mask, cfg.mask_args, b)
            if key not in per_mask:  # baselines do not depend on the DCP options: once per mask and batch
                per_mask[key] = (mask_sparsity(PackedBatch.from_seqlens(seqlens), cfg.mask, cfg.args),
                                 plan_baselines(args.baselines, seqlens, spec, args.topology, args.element_size))
            tasks.append(((c, b), seqlens, spec, args.topology, cfg.options, args.element_size, args.verify))
    results: dict[tuple[int, int], dict] = {}
    with _progress(total, args, "sweep") as bar:
        if jobs == 1:
            for task in tasks:
                key, res = _sweep_task(task)
                results[key] = res
                bar.update(1)
        else:
            # Slowest plans first; each worker plans one batch at a time on one core. Fork where available
            # (the tool's parent process never initialises the partitioner, so forking it is safe).
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            tasks.sort(key=lambda t: -_expected_cost(unique[t[0][0]], t[1]))
            from dcp_backend.dcp import partition

            forkable = "fork" in mp.get_all_start_methods() and partition._MTK is None
            method = "fork" if forkable else "spawn"  # never fork a process whose partitioner has threads
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context(method)) as pool:
                for fut in as_completed([pool.submit(_sweep_task, t) for t in tasks]):
                    key, res = fut.result()
                    results[key] = res
                    bar.update(1)
    wall = time.perf_counter() - t_start
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for grid, cfg in configs:
            for b, seqlens in enumerate(args.batches):
                sparsity, baselines = per_mask[(cfg.mask, cfg.mask_args, b)]
                res = results[(unique.index(cfg), b)]
                w.writerow(sweep_row(args, grid, cfg, b, seqlens, res, baselines, sparsity))
    meta = {
        "command": "python tools/dry_run.py " + " ".join(args.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "grid": args.grid, "configurations": len(configs), "unique_configurations": len(unique),
        "batches": len(args.batches), "plans": total, "jobs": jobs, "wall_seconds": wall,
        "planning_seconds_total": float(sum(r.get("planning_seconds", 0.0) for r in results.values())),
        "planning_cpu_seconds_total": float(sum(r.get("planning_cpu_seconds", 0.0) for r in results.values())),
        "errors": sum("error" in r for r in results.values()),
    }
    with open(args.out + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"sweep: {len(configs)} configurations ({len(unique)} distinct) x {len(args.batches)} batches = "
          f"{total} DCP plans in {wall:.1f} s on {jobs} process(es) ({meta['errors']} errors) -> {args.out}",
          file=sys.stderr)
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        run_sweep(args)
        return 0
    try:
        run_batches(args)
    except cp.CPError as exc:  # a plan the options cannot make (e.g. a memory_limit below what fits)
        print(f"dry_run.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
