#!/usr/bin/env python
"""The published microbenchmark (DCP, SOSP'25, Figs. 12-13) reproduced in simulation, side by side.

    python tools/reproduce_paper.py --out runs/paper                 # simulate (tens of minutes)
    python tools/reproduce_paper.py --out runs/paper --plot-only     # figures + tables from the JSON

Setup as published: LongAlign- and LDC-shaped batches of 131072 tokens at length scales 0.5, 1, 2, 4
(``dcp_backend.sim.benchmark_batches``), 8 query / 2 KV heads, head dim 128, bf16, 4 nodes x 8 devices; causal
forward and backward for ring, zigzag, LoongTrain (best window), TE (a2a+p2p as published, and p2p),
Megatron-Core's hybrid CP (not in the paper; megatron-core's scheduler, best of two max_seqlen_per_rank) and
DCP (best of block sizes 1024/2048/4096 at 1x and 2x token share, as hybrid, and its static candidates); the sparse masks (lambda, shared
question, causal blockwise) for DCP against the best baseline. Every plan is simulated under four
settings: the H100 cost table with the H100 p5 network or the A100 p4d network (the published cluster's
network class), each with DCP's executor copies as built or fused (one memory operation per instruction,
as the published executor's Triton copies). Their numbers are measured on A100s, ours simulated with the
H100 table: compare speed-up ratios, not milliseconds.

Writes ``<out>/results.json``, ``docs/figures/fig12_causal.{png,pdf}``, ``docs/figures/fig13_masks.{png,pdf}``
and prints the markdown tables used in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import dcp_backend as cp
from dcp_backend.cost_model import load_cost_model
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.sim.benchmark_batches import describe, paper_batches
from dcp_backend.sim.compare import BASELINES, candidate_plans, simulate_candidates
from dcp_backend.sim.network import Topology

# Published means (ms per batch, N4D32, A100), docs/research/dcp_reference.md section 8:
# {(dataset, pass): {scale: (ring, zigzag, loongtrain, te, dcp)}}
PUBLISHED = {
    ("ldc", "fwd"): {0.5: (28.3, 37.2, 19.4, 24.4, 8.0), 1: (52.5, 32.0, 14.8, 15.5, 7.0),
                     2: (26.9, 29.5, 13.1, 14.5, 8.5), 4: (26.8, 28.8, 10.4, 11.7, 8.9)},
    ("ldc", "bwd"): {0.5: (80.8, 81.3, 44.2, 33.9, 16.0), 1: (78.6, 79.9, 35.6, 26.8, 13.7),
                     2: (77.0, 76.4, 33.8, 25.0, 15.6), 4: (75.1, 76.2, 27.1, 23.1, 18.2)},
    ("longalign", "fwd"): {0.5: (27.4, 30.0, 11.8, 13.9, 7.9), 1: (26.9, 28.8, 10.1, 12.7, 9.4),
                           2: (27.1, 28.0, 9.6, 11.6, 11.0), 4: (26.7, 27.1, 9.2, 11.8, 13.3)},
    ("longalign", "bwd"): {0.5: (77.8, 79.2, 30.6, 25.3, 15.5), 1: (75.1, 75.7, 27.0, 23.2, 19.1),
                           2: (74.8, 75.9, 24.2, 22.7, 20.4), 4: (73.3, 73.5, 22.9, 23.0, 27.6)},
}
PUBLISHED_MASKS = {"fwd": {"ldc": (2.2, 5.9), "longalign": (1.9, 4.3)}, "bwd": {"ldc": (1.4, 3.5), "longalign": (1.4, 3.5)}}
MASKS = {"causal": {}, "lambda": {"sink": 64, "window": 4096},
         "shared_question": {"question_fraction": 0.2, "num_answers": 4},
         "causal_blockwise": {"block": 256, "k_local": 2}}
SETTINGS = {"p5": ("h100-p5", False), "p5-fused": ("h100-p5", True), "p4d": ("a100-p4d", False),
            "p4d-fused": ("a100-p4d", True)}
LABELS = {"ring": "Ring", "zigzag": "Zigzag", "loongtrain": "LoongTrain", "te-a2a": "TE (a2a+p2p)", "te": "TE (p2p)",
          "hybrid": "MCore hybrid CP", "dcp": "DCP"}


def simulate(args) -> dict:
    cm = load_cost_model(args.cost_model)
    topo = Topology.grid(4, 8)
    out, path, done = open_results(args, {"cost_model": cm.describe(), "settings": SETTINGS},
                                   ("dataset", "scale", "mask", "batch"))
    t_all = time.time()
    for mask in args.masks.split(","):
        nb = args.batches if mask == "causal" else args.mask_batches
        backends = ("ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp") if mask == "causal" else \
            ("zigzag", "loongtrain", "te-a2a", "hybrid", "dcp")
        spec = cp.AttentionSpec(8, 2, 128, mask=mask, mask_args=MASKS[mask])
        for ds in args.datasets.split(","):
            for scale in (float(s) for s in args.scales.split(",")):
                batches = paper_batches(ds, nb, 131072, scale, seed=args.seed)
                for bi, seqlens in enumerate(batches):
                    if (ds, scale, mask, bi) in done:
                        continue
                    t0 = time.time()
                    cands = candidate_plans(seqlens, spec, topo, backends, (1024, 2048, 4096),
                                            DCPOptions(cost_model=cm.spec), None)
                    plan_s = time.time() - t0
                    point = {"dataset": ds, "scale": scale, "mask": mask, "batch": bi, "seqlens": seqlens,
                             "plan_seconds": {c.label + " " + c.config: c.plan_seconds for c in cands}, "results": {}}
                    cache: dict = {}
                    for sname, (net, fused) in SETTINGS.items():
                        res = simulate_candidates(cands, cm, net, "bf16", fused, cache=cache, kernel=args.kernel)
                        point["results"][sname] = {k: {"fwd_ms": e.fwd_ms, "bwd_ms": e.bwd_ms, "config": e.config}
                                                   for k, e in res.items()}
                    out["points"].append(point)
                    r = point["results"]["p5"]
                    print(f"{mask:16s} {ds:9s} x{scale:<4g} batch {bi}: {len(seqlens)} docs; plan {plan_s:.0f}s, "
                          f"all {time.time() - t0:.0f}s; p5 dcp {r['dcp']['fwd_ms']:.2f}/{r['dcp']['bwd_ms']:.2f} ms "
                          f"({r['dcp']['config']})", flush=True)
                    save_results(path, out)
    save_results(path, out, t_all)
    return out


# ------------------------------------------------------------------------------------------ analysis

def mean_ms(points, ds, scale, mask, setting, label, which):
    v = [p["results"][setting][label][f"{which}_ms"] for p in points
         if p["dataset"] == ds and p["scale"] == scale and p["mask"] == mask and label in p["results"][setting]]
    return float(np.mean(v)) if v else float("nan")


def speedup(points, ds, scale, mask, setting, which, dcp_label="dcp"):
    """Mean over batches of (best baseline time / dcp time), per batch."""
    ups = []
    for p in points:
        if p["dataset"] == ds and p["scale"] == scale and p["mask"] == mask:
            r = p["results"][setting]
            best = min(r[k][f"{which}_ms"] for k in r if k in BASELINES)
            ups.append(best / r[dcp_label][f"{which}_ms"])
    return float(np.mean(ups)) if ups else float("nan")


def tables(res) -> str:
    pts = res["points"]
    scales = sorted({p["scale"] for p in pts})
    lines = []
    for setting in SETTINGS:
        lines.append(f"\n#### Causal, setting `{setting}` ({SETTINGS[setting][0]}, "
                     f"{'fused copies' if SETTINGS[setting][1] else 'executor copies as built'})\n")
        lines.append("| dataset | pass | scale | Ring | Zigzag | LoongTrain | TE a2a+p2p | TE p2p | MCore hybrid | DCP | "
                     "DCP hypergraph only | DCP speed-up (ours) | published speed-up | published ms "
                     "(Ring/ZZ/LT/TE/DCP) |")
        lines.append("|---|---|---|" + "---:|" * 11 + "---|")
        for ds in ("ldc", "longalign"):
            for which in ("fwd", "bwd"):
                for s in scales:
                    m = {k: mean_ms(pts, ds, s, "causal", setting, k, which) for k in
                         ("ring", "zigzag", "loongtrain", "te-a2a", "te", "hybrid", "dcp", "dcp-hypergraph")}
                    if np.isnan(m["dcp"]):
                        continue
                    pub = PUBLISHED[(ds, which)][s if s != 1.0 else 1]
                    pub_up = min(pub[:4]) / pub[4]
                    up = speedup(pts, ds, s, "causal", setting, which)
                    lines.append(f"| {ds} | {which} | {s:g} | " + " | ".join(f"{m[k]:.2f}" for k in m)
                                 + f" | {up:.2f}x | {pub_up:.2f}x | {'/'.join(f'{x:g}' for x in pub)} |")
    lines.append("\n#### Never lose? DCP (best candidate) against the best baseline and against its hypergraph plan "
                 "(forward + backward, per batch)\n")
    lines.append("| setting | batches | DCP faster than the best baseline | worst DCP / best baseline | static "
                 "candidate chosen | hypergraph / DCP (mean, max) |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for setting in SETTINGS:
        n = wins = chosen = 0
        worst, gain = 0.0, []
        for p in pts:
            r = p["results"][setting]
            best = min(r[k]["fwd_ms"] + r[k]["bwd_ms"] for k in r if k in BASELINES)
            d = r["dcp"]["fwd_ms"] + r["dcp"]["bwd_ms"]
            h = r["dcp-hypergraph"]["fwd_ms"] + r["dcp-hypergraph"]["bwd_ms"]
            n += 1
            wins += d < best
            worst = max(worst, d / best)
            chosen += not r["dcp"]["config"].startswith("hypergraph")
            gain.append(h / d)
        lines.append(f"| {setting} | {n} | {wins} | {worst:.2f} | {chosen} | {np.mean(gain):.2f}x, {np.max(gain):.2f}x |")
    masks = [m for m in MASKS if m != "causal" and any(p["mask"] == m for p in pts)]
    if masks:
        for setting in SETTINGS:
            lines.append(f"\n#### Sparse masks, setting `{setting}`: DCP speed-up over the best baseline "
                         "(zigzag, LoongTrain, TE a2a+p2p with range masks, MCore hybrid)\n")
            lines.append("| dataset | pass | " + " | ".join(f"{m} x{s:g}" for m in masks for s in scales) + " | published |")
            lines.append("|---|---|" + "---:|" * (len(masks) * len(scales)) + "---|")
            for ds in ("ldc", "longalign"):
                for which in ("fwd", "bwd"):
                    cells = [speedup(pts, ds, s, m, setting, which) for m in masks for s in scales]
                    lo, hi = PUBLISHED_MASKS[which][ds]
                    lines.append(f"| {ds} | {which} | " + " | ".join(f"{c:.2f}" for c in cells)
                                 + f" | {lo}-{hi}x (vs TE) |")
    return "\n".join(lines)


def plot(res, fig_dir: str, setting: str = "p5") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    scales = sorted({p["scale"] for p in pts})
    files = []
    order = ["ring", "zigzag", "loongtrain", "te-a2a", "hybrid", "dcp"]
    colors = {"ring": "#9e9e9e", "zigzag": "#607d8b", "loongtrain": "#4caf50", "te-a2a": "#2196f3",
              "hybrid": "#ff9800", "dcp": "#e53935"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for j, ds in enumerate(("ldc", "longalign")):
        for i, which in enumerate(("fwd", "bwd")):
            ax = axes[i, j]
            x = np.arange(len(scales))
            wdt = 0.8 / len(order)
            for k, lab in enumerate(order):
                vals = [mean_ms(pts, ds, s, "causal", setting, lab, which) for s in scales]
                ax.bar(x + (k - (len(order) - 1) / 2) * wdt, vals, wdt, label=LABELS[lab], color=colors[lab])
            fused = [mean_ms(pts, ds, s, "causal", setting + "-fused", "dcp", which) for s in scales]
            ax.scatter(x + (len(order) - 1) / 2 * wdt, fused, marker="_", s=200, color="black", zorder=3,
                       label="DCP, fused copies (what-if)")
            for xi, s in zip(x, scales):
                up = speedup(pts, ds, s, "causal", setting, which)
                pub = PUBLISHED[(ds, which)][s if s != 1.0 else 1]
                ax.annotate(f"{up:.2f}x\n(pub. {min(pub[:4]) / pub[4]:.2f}x)", (xi, 0), xytext=(0, -30),
                            textcoords="offset points", ha="center", fontsize=7)
            ax.set_xticks(x)
            ax.set_xticklabels([f"x{s:g}" for s in scales])
            ax.set_ylabel(f"{which} ms (simulated)")
            ax.set_title(f"{'LDC' if ds == 'ldc' else 'LongAlign'}, causal, {which.upper()}")
            ax.tick_params(axis="x", pad=28)
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle("Fig. 12 reproduction: simulated 4x8 H100 (p5 network), 131072 tokens/batch, 8/2 heads, d=128, "
                 "bf16\nlabels: DCP speed-up over the best baseline (published A100 speed-up)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    files += save_figure(fig, fig_dir, "fig12_causal")

    masks = [m for m in MASKS if any(p["mask"] == m for p in pts)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharey="row")
    mcol = {"causal": "#e53935", "lambda": "#8e24aa", "shared_question": "#fb8c00", "causal_blockwise": "#00897b"}
    for j, ds in enumerate(("ldc", "longalign")):
        for i, which in enumerate(("fwd", "bwd")):
            ax = axes[i, j]
            x = np.arange(len(scales))
            wdt = 0.8 / max(len(masks), 1)
            for k, m in enumerate(masks):
                ups = [speedup(pts, ds, s, m, setting, which) for s in scales]
                ax.bar(x + (k - (len(masks) - 1) / 2) * wdt, ups, wdt, label=m, color=mcol[m], zorder=2)
            lo, hi = PUBLISHED_MASKS[which][ds]
            ax.axhspan(lo, hi, color="#ffeb3b", alpha=0.25, label="published sparse-mask range (vs TE)", zorder=0)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(x)
            ax.set_xticklabels([f"x{s:g}" for s in scales])
            ax.set_ylabel("DCP speed-up over best baseline")
            ax.set_title(f"{'LDC' if ds == 'ldc' else 'LongAlign'}, {which.upper()}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Fig. 13 reproduction: DCP vs the best baseline per mask (simulated 4x8 H100, p5 network)", fontsize=9)
    fig.tight_layout()
    files += save_figure(fig, fig_dir, "fig13_masks")
    return files


# ------------------------------------------------------------------------------------------ the driver
# (shared with tools/reproduce_e2e.py)

def save_figure(fig, fig_dir: str, stem: str) -> list[str]:
    """``<fig_dir>/<stem>.png`` and ``.pdf``; closes the figure."""
    import matplotlib.pyplot as plt

    files = []
    for ext in ("png", "pdf"):
        files.append(os.path.join(fig_dir, f"{stem}.{ext}"))
        fig.savefig(files[-1], dpi=150)
    plt.close(fig)
    return files


def add_driver_args(p: argparse.ArgumentParser, out: str, masks: str) -> None:
    p.add_argument("--out", default=out)
    p.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"))
    p.add_argument("--datasets", default="ldc,longalign")
    p.add_argument("--masks", default=masks)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cost-model", default="h100")
    p.add_argument("--kernel", default="auto", choices=["auto", "flash", "table"],
                   help="block-kernel costs for every backend (auto: flash-attn for full/causal segments where the "
                        "table has a flash companion; table: the table's kernel everywhere)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore an existing results.json (default: resume)")


def open_results(args, header: dict, key: tuple) -> tuple[dict, str, set]:
    """``<out>/results.json`` (resumed unless ``--fresh``) or a new one with ``header``; the point keys done."""
    path = os.path.join(args.out, "results.json")
    out = {"date": datetime.date.today().isoformat(), "command": f"python {sys.argv[0]} " + " ".join(sys.argv[1:]),
           "kernel": args.kernel, **header, "points": []}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            out = json.load(f)
    return out, path, {tuple(p[k] for k in key) for p in out["points"]}


def save_results(path: str, out: dict, started: float | None = None) -> None:
    if started is not None:
        out["wall_seconds"] = out.get("wall_seconds", 0) + time.time() - started
    with open(path, "w") as f:
        json.dump(out, f)


def drive(args, simulate, plot, tables, group: str, fmt) -> int:
    """Simulate (or, with ``--plot-only``, load) the results, draw the figures, print the tables and the
    batches of each (dataset, ``group``) point."""
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    if args.plot_only:
        with open(os.path.join(args.out, "results.json")) as f:
            res = json.load(f)
    else:
        res = simulate(args)
    files = plot(res, args.figures)
    print(tables(res))
    for ds in ("ldc", "longalign"):
        for v in sorted({p[group] for p in res["points"]}):
            b = [p["seqlens"] for p in res["points"] if p["dataset"] == ds and p[group] == v and p["mask"] == "causal"]
            if b:
                print(f"batches {ds} {fmt(v)}: {describe(b)}")
    print("wrote", ", ".join(files))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_args(p, "runs/paper", "causal,lambda,shared_question,causal_blockwise")
    p.add_argument("--scales", default="0.5,1,2,4")
    p.add_argument("--batches", type=int, default=3, help="batches per causal point")
    p.add_argument("--mask-batches", type=int, default=2, help="batches per sparse-mask point")
    return drive(p.parse_args(argv), simulate, plot, tables, "scale", lambda s: f"x{s:g}")


if __name__ == "__main__":
    sys.exit(main())
