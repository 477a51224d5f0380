#!/usr/bin/env python
"""Validate the simulator against real runs on this machine: gloo ranks on CPU, every backend.

    python tools/validate_simulator.py --worlds 2,4 --datasets ldc,longalign --rounds 3 --out runs/validation

Three steps, each reproducible on its own:

1. network: time point-to-point exchanges between ``N`` spawned gloo ranks (one torch thread each) over
   several message sizes, and fit latency + bytes / bandwidth: the loopback network model;
2. measured: run ``tools/bench_attention.py --spawn N`` on the batches (``--rounds`` separate invocations;
   each reports the max over ranks of the mean of ``--repeats`` timed runs), and take the median over
   rounds per (batch, backend);
3. predicted: plan the same batches with the same options (DCP block size ``auto``, LoongTrain's
   defaults, one node) and simulate them with the CPU cost table (``dcp_backend/cost_tables/cpu.json``)
   and the loopback network fitted around that round, ``N`` ranks sharing the cores they really got.

The machine is shared: other jobs take CPU. Right before and after each backend's timed runs all ``N``
ranks run one fixed kernel call of the cost table's grid at once (``bench_attention.py --probe``); its
time against the table's gives the host model of that backend's run (:func:`host_model`: a per-core
speed when there are no more ranks than cores, else other jobs' runnable threads ``L`` under fair
sharing, each computing rank getting ``cores / (computing + L)``), and its prediction runs with it. TE, not measured, is
predicted with the round's least loaded setting. Predicted and measured are both medians over rounds.

Prints (and writes ``<out>/validation.md`` / ``.json``) predicted against measured forward and backward
ms per backend and the relative error. TE cannot run here (no CUDA, no Transformer Engine): it is
simulated but not measured.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import dcp_backend as cp
from dcp_backend.cost_model import load_cost_model
from dcp_backend.cost_model import calibration_work
from dcp_backend.sim.network import NetworkModel, fit_link, get_network, host_model
from dcp_backend.sim.simulator import simulate_plan


# ------------------------------------------------------------------------------------------- network

PROBE_WORK = (1, 1024, 1024, "causal_split")  # a point of the CPU cost table's grid (fp32, d 64, 8/2 heads)
PROBE_REPS = 6

def _net_worker(rank, world, port, sizes, reps, q):
    import datetime as dt

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=120))
    res = {}
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for pattern in ("pair", "ring") if world > 1 else ():
        for n in sizes:
            x = torch.randn(n // 4)
            y = torch.empty_like(x)
            ts = []
            for i in range(reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if pattern == "pair":  # ranks 0 and 1 only, one message each way
                    if rank < 2:
                        ops = [dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, y, 1 - rank)]
                        for w in dist.batch_isend_irecv(ops):
                            w.wait()
                else:  # everyone sends to the next, receives from the previous
                    ops = [dist.P2POp(dist.isend, x, nxt), dist.P2POp(dist.irecv, y, prv)]
                    for w in dist.batch_isend_irecv(ops):
                        w.wait()
                if i:
                    ts.append(time.perf_counter() - t0)
            t = torch.tensor([float(np.median(ts))], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res[(pattern, n)] = float(t.item())
    # CPU probe: every rank runs the same kernel call at once, as the ranks of a pass do
    from dcp_backend.kernels import get_kernel

    kern = get_kernel("cpu_flash", "cpu")
    w = calibration_work(*PROBE_WORK)
    qq = torch.randn(w.total_q, 8, 64)
    kk = torch.randn(w.total_k, 2, 64)
    kern.forward(qq, kk, kk, w, 0.125)
    dist.barrier()
    ts = []
    for _ in range(PROBE_REPS):
        t0 = time.perf_counter()
        kern.forward(qq, kk, kk, w, 0.125)
        ts.append(time.perf_counter() - t0)
    t = torch.tensor([float(np.mean(ts))], dtype=torch.float64)
    dist.all_reduce(t)
    res["probe_s"] = float(t.item()) / world
    dist.destroy_process_group()
    if rank == 0:
        q.put(res)


def measure_network(world: int, reps: int = 7) -> dict:
    import socket

    import torch.multiprocessing as mp

    sizes = [4 << 10, 256 << 10, 2 << 20, 8 << 20]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_net_worker, args=(world, port, sizes, reps, q), nprocs=world, join=True, start_method="spawn")
    res = q.get()
    fit = {}
    for pattern in ("pair", "ring"):
        if world == 1:  # nothing to send: the preset (unused by a one-rank plan)
            net = get_network("cpu-loopback")
            fit[pattern] = {"bytes_per_s": net.intra_bw, "latency_s": net.intra_latency, "seconds": {}}
            continue
        seconds = [res[(pattern, n)] for n in sizes]
        fit[pattern] = {**fit_link(sizes, seconds), "seconds": {str(n): t for n, t in zip(sizes, seconds)}}
    fit["probe_s"] = res["probe_s"]
    return fit


# ------------------------------------------------------------------------------------------- measured

def bench(args, world: int, dataset: str, csv_path: str) -> list[dict]:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_attention.py"), "--spawn", str(world),
           "--dataset", dataset, "--num-batches", "1", "--tokens-per-batch", str(args.tokens), "--scale",
           str(args.scale), "--seed", str(args.seed), "--backends", args.backends, "--num-heads", str(args.heads),
           "--num-kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim), "--dtype", "fp32",
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--mask", "causal", "--csv", csv_path,
           "--probe"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"bench_attention failed:\n{out.stdout}\n{out.stderr}")
    with open(csv_path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ predicted

def predict(args, world: int, seqlens: list[int], nets: dict, cm) -> dict:
    """Simulated (fwd, bwd) ms per backend; ``nets[name]`` is the network/host model of that backend's run
    (``nets["te"]`` defaults to the median background of the others: TE does not run here)."""
    spec = cp.AttentionSpec(args.heads, args.kv_heads, args.head_dim, mask="causal")
    out = {}
    for name in [b.strip() for b in args.backends.split(",")] + ["te"]:
        plan = cp.get_planner(name).plan(seqlens, spec, cp.Topology(world))
        rep = simulate_plan(plan, cm, nets[name], "fp32")
        out[name] = {"fwd_ms": rep.fwd_ms, "bwd_ms": rep.bwd_ms, **rep.summary()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--datasets", default="ldc,longalign")
    p.add_argument("--backends", default="ring,zigzag,loongtrain,dcp")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="separate bench invocations; the median is kept")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--cost-model", default="cpu")
    p.add_argument("--network", default=None, help="skip the network measurement: use this preset")
    p.add_argument("--out", default="runs/validation")
    p.add_argument("--reanalyze", action="store_true",
                   help="re-predict the measurements saved in --out (bench CSVs, loopback fits) with the current "
                        "model; nothing is measured")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from dcp_backend.workloads import dataset_batches

    cm = load_cost_model(args.cost_model)
    report = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
              "command": "python tools/validate_simulator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": vars(args), "networks": {}, "rows": []}
    rows = []

    def network_of(fits, world, probe_s):
        bw = float(np.mean([f["ring"]["bytes_per_s"] for f in fits]))
        lat = float(np.mean([f["ring"]["latency_s"] for f in fits]))
        table_s = cm.work_seconds(calibration_work(*PROBE_WORK), 8, 64, "fp32")
        speed, bg = host_model(world, table_s / probe_s, args.cores)
        # messages of a pass go around all ranks at once: the ring fit
        return NetworkModel(f"cpu-loopback-{world}", intra_bw=bw, inter_bw_per_node=bw, nics_per_node=1,
                            intra_latency=lat, inter_latency=lat, cores=args.cores, background=bg, speed=speed)

    saved = None
    if args.reanalyze:
        with open(os.path.join(args.out, "validation.json")) as f:
            saved = json.load(f)
        report["networks"] = saved["networks"]
        report["reanalysis_of"] = saved["command"] + f" ({saved['date']})"
    for world in (int(w) for w in args.worlds.split(",")):
        for ds in args.datasets.split(","):
            seqlens = dataset_batches(ds, 1, args.tokens, args.seed, args.scale)[0]
            measured: dict = {}
            predicted: dict = {}
            predicted_idle: dict = {}
            probes = [measure_network(world)] if saved is None else None
            for rnd in range(args.rounds):
                csv_path = os.path.join(args.out, f"bench_{ds}_w{world}_r{rnd}.csv")
                if saved is None:
                    rows_r = bench(args, world, ds, csv_path)
                    probes.append(measure_network(world))
                else:
                    with open(csv_path) as f:
                        rows_r = list(csv.DictReader(f))
                    n0 = next(iter(saved["networks"][f"{ds}_w{world}"][rnd].values()))
                    fit = {"ring": {"bytes_per_s": n0["intra_bw"], "latency_s": n0["latency"]}}
                    probes = [fit, fit]
                nets = {}
                for r in rows_r:
                    if r["status"] == "ok":
                        measured.setdefault(r["backend"], []).append((float(r["fwd_ms"]), float(r["bwd_ms"])))
                        # the load indicator measured right around this backend's timed runs
                        nets[r["backend"]] = get_network(args.network) if args.network else network_of(
                            probes[-2:], world, float(r["probe_ms"]) * 1e-3)
                nets["te"] = min(nets.values(), key=lambda n: (n.background, -n.speed))
                if saved is None:
                    report["networks"].setdefault(f"{ds}_w{world}", []).append(
                        {k: {"intra_bw": n.intra_bw, "latency": n.intra_latency, "background": n.background,
                             "speed": n.speed} for k, n in nets.items()})
                for name, pr in predict(args, world, seqlens, nets, cm).items():
                    predicted.setdefault(name, []).append((pr["fwd_ms"], pr["bwd_ms"]))
                idle = {k: dataclasses.replace(n, speed=1.0, background=0.0) for k, n in nets.items()}
                for name, pr in predict(args, world, seqlens, idle, cm).items():
                    predicted_idle.setdefault(name, []).append((pr["fwd_ms"], pr["bwd_ms"]))
                net = nets["te"]
                print(f"# {ds} world {world} round {rnd + 1}/{args.rounds}: loopback "
                      f"{net.intra_bw / 2**30:.2f} GiB/s + {net.intra_latency * 1e6:.0f} us, host (speed, background) "
                      + ", ".join(f"{k} ({n.speed:.2f}, {n.background:.1f})" for k, n in nets.items()) + "; measured " + ", ".join(f"{k} {v[-1][0]:.0f}/{v[-1][1]:.0f}"
                                                                 for k, v in measured.items())
                      + "; predicted " + ", ".join(f"{k} {v[-1][0]:.0f}/{v[-1][1]:.0f}" for k, v in predicted.items()),
                      flush=True)
            for name, pr in predicted.items():
                m = measured.get(name)
                row = {"world": world, "dataset": ds, "docs": len(seqlens), "backend": name,
                       "pred_fwd_ms": statistics.median(x[0] for x in pr),
                       "pred_bwd_ms": statistics.median(x[1] for x in pr),
                       "pred_fwd_all": [x[0] for x in pr], "pred_bwd_all": [x[1] for x in pr]}
                pi = predicted_idle[name]
                row.update(idle_fwd_ms=min(x[0] for x in pi), idle_bwd_ms=min(x[1] for x in pi))
                if m:
                    row.update(min_fwd_ms=min(x[0] for x in m), min_bwd_ms=min(x[1] for x in m))
                    row["err_min_fwd"] = row["idle_fwd_ms"] / row["min_fwd_ms"] - 1
                    row["err_min_bwd"] = row["idle_bwd_ms"] / row["min_bwd_ms"] - 1
                    row.update(meas_fwd_ms=statistics.median(x[0] for x in m),
                               meas_bwd_ms=statistics.median(x[1] for x in m),
                               meas_fwd_all=[x[0] for x in m], meas_bwd_all=[x[1] for x in m])
                    row["err_fwd"] = row["pred_fwd_ms"] / row["meas_fwd_ms"] - 1
                    row["err_bwd"] = row["pred_bwd_ms"] / row["meas_bwd_ms"] - 1
                rows.append(row)
    report["rows"] = rows
    lines = ["| ranks | batch | backend | measured fwd ms | predicted fwd ms | error | measured bwd ms | "
             "predicted bwd ms | error |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "meas_fwd_ms" in r:
            lines.append(f"| {r['world']} | {r['dataset']} ({r['docs']} docs) | {r['backend']} | "
                         f"{r['meas_fwd_ms']:.1f} | {r['pred_fwd_ms']:.1f} | {100 * r['err_fwd']:+.0f}% | "
                         f"{r['meas_bwd_ms']:.1f} | {r['pred_bwd_ms']:.1f} | {100 * r['err_bwd']:+.0f}% |")
        else:
            lines.append(f"| {r['world']} | {r['dataset']} ({r['docs']} docs) | {r['backend']} | not run here | "
                         f"{r['pred_fwd_ms']:.1f} | | not run here | {r['pred_bwd_ms']:.1f} | |")
    lines += ["", "Fastest round against the unloaded prediction (host speed 1, no other jobs):", "",
              "| ranks | batch | backend | fastest fwd ms | predicted fwd ms | error | fastest bwd ms | "
              "predicted bwd ms | error |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "min_fwd_ms" in r:
            lines.append(f"| {r['world']} | {r['dataset']} ({r['docs']} docs) | {r['backend']} | "
                         f"{r['min_fwd_ms']:.1f} | {r['idle_fwd_ms']:.1f} | {100 * r['err_min_fwd']:+.0f}% | "
                         f"{r['min_bwd_ms']:.1f} | {r['idle_bwd_ms']:.1f} | {100 * r['err_min_bwd']:+.0f}% |")
    md = "\n".join(lines)
    print(md)
    suffix = "_reanalysis" if saved is not None else ""
    with open(os.path.join(args.out, f"validation{suffix}.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, f"validation{suffix}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
