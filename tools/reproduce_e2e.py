#!/usr/bin/env python
"""The published end-to-end comparison (DCP, SOSP'25, Figs. 14-15) in simulation: training-iteration time of
the 8B GPT for every backend, beside the published speed-ups.

    python tools/reproduce_e2e.py --out runs/e2e                  # simulate (tens of minutes on 2 cores)
    python tools/reproduce_e2e.py --out runs/e2e --plot-only      # figures + tables from the JSON

Setup as published (``dcp_backend.sim.e2e``): 32 layers, hidden 4096, 32 / 8 heads of 128, FFN 14336, TP 4,
8 nodes x 8 GPUs (16 CP ranks, 2 per node); one iteration = one LDC- or LongAlign-shaped batch of 16K, 32K,
64K or 128K tokens (``paper_batches``: 75%-full greedy packs, seed 42); causal and lambda masks. Each
backend plans the batch in every configuration it has (LoongTrain windows, TE p2p and a2a+p2p, the
hybrid CP's two max_seqlen_per_rank, DCP's block sizes and static candidates) and the configuration with
the shortest iteration is kept. Attention is simulated (every backend at its best kernel: flash-attn
costs for full and causal segments); GEMMs, norms and TP collectives come from a roofline at the
measured H100 matmul and copy rates; the gradient all-reduce and the optimizer are the same for every
backend. Two networks: ``a100-p4d`` (the published cluster's class) and ``h100-p5``. The published
numbers are measured on A100s with MLM = Megatron-LM with TE a2a+p2p (our ``te-a2a``): compare speed-up
ratios, not seconds.

Writes ``<out>/results.json``, ``docs/figures/fig14_15_e2e_<network>.{png,pdf}`` and prints the markdown
tables used in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared driver, also when run as a script

from dcp_backend.sim.benchmark_batches import paper_batches
from dcp_backend.sim.compare import BASELINES
from dcp_backend.sim.e2e import E2ESetup, best_iterations, e2e_candidates
from reproduce_paper import add_driver_args, drive, open_results, save_figure, save_results

MASKS = {"causal": {}, "lambda": {"sink": 64, "window": 4096}}
# Published iteration seconds, MLM -> DCP (dcp_reference.md section 8, decoded from the reference figures)
PUBLISHED = {
    ("longalign", 16384): {"causal": (1.32, 1.30), "lambda": (1.37, 1.24)},
    ("longalign", 32768): {"causal": (1.44, 1.39), "lambda": (1.50, 1.23)},
    ("longalign", 65536): {"causal": (1.86, 1.96), "lambda": (1.87, 1.42)},
    ("longalign", 131072): {"causal": (2.79, 2.83), "lambda": (2.80, 1.92)},
    ("ldc", 16384): {"causal": (1.32, 1.25), "lambda": (1.39, 1.21)},
    ("ldc", 32768): {"causal": (1.48, 1.31), "lambda": (1.55, 1.22)},
    ("ldc", 65536): {"causal": (1.97, 1.75), "lambda": (1.99, 1.54)},
    ("ldc", 131072): {"causal": (3.03, 2.88), "lambda": (3.06, 2.48)},
}
# DCP block sizes tried per tokens per batch (the published best configurations: 512 at 16K, 1024 at 32K
# and 64K, 2048 at 128K, each with a neighbour)
BLOCKS = {16384: (512, 1024), 32768: (1024, 2048), 65536: (1024, 2048), 131072: (2048, 4096)}
ORDER = ["ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp"]
LABELS = {"ring": "Ring", "zigzag": "Zigzag", "loongtrain": "LoongTrain", "te": "TE p2p",
          "te-a2a": "MLM (TE a2a+p2p)", "hybrid": "MCore hybrid CP", "dcp": "DCP"}
COLORS = {"ring": "#9e9e9e", "zigzag": "#607d8b", "loongtrain": "#4caf50", "te": "#90caf9", "te-a2a": "#2196f3",
          "hybrid": "#ff9800", "dcp": "#e53935"}


def simulate(args) -> dict:
    networks = args.networks.split(",")
    setups = {net: E2ESetup(tp=args.tp, nodes=args.nodes, gpus_per_node=args.gpus_per_node, network=net)
              for net in networks}
    out, path, done = open_results(args, {"cost_model": args.cost_model, "cluster": {
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tp": args.tp}}, ("dataset", "msl", "mask", "batch"))
    t_all = time.time()
    for mask in args.masks.split(","):
        for ds in args.datasets.split(","):
            for msl in (int(x) for x in args.msl.split(",")):
                for bi, seqlens in enumerate(paper_batches(ds, args.batches, msl, 1.0, seed=args.seed)):
                    if (ds, msl, mask, bi) in done:
                        continue
                    t0 = time.time()
                    cands = e2e_candidates(seqlens, mask, setups[networks[0]], args.cost_model, MASKS[mask],
                                           dcp_block_sizes=tuple(int(b) for b in args.dcp_block_sizes.split(","))
                                           if args.dcp_block_sizes else BLOCKS.get(msl, (1024, 2048)))
                    plan_s = time.time() - t0
                    point = {"dataset": ds, "msl": msl, "mask": mask, "batch": bi, "seqlens": seqlens,
                             "plan_seconds": plan_s, "results": {}}
                    for net, setup in setups.items():
                        best = best_iterations(cands, setup, args.cost_model, args.kernel)
                        point["results"][net] = {k: {"config": cfg, **rep.summary()} for k, (rep, cfg) in best.items()}
                    out["points"].append(point)
                    r = point["results"][networks[0]]
                    print(f"{mask:7s} {ds:9s} {msl:6d} batch {bi}: {len(seqlens)} docs; plan {plan_s:.0f}s, all "
                          f"{time.time() - t0:.0f}s; {networks[0]} dcp {r['dcp']['iteration_s']:.3f} s, "
                          f"te-a2a {r['te-a2a']['iteration_s']:.3f} s, hybrid {r['hybrid']['iteration_s']:.3f} s",
                          flush=True)
                    save_results(path, out)
    save_results(path, out, t_all)
    return out


# ------------------------------------------------------------------------------------------ analysis

def _points(res, ds, msl, mask):
    return [p for p in res["points"] if p["dataset"] == ds and p["msl"] == msl and p["mask"] == mask]


def mean_s(res, ds, msl, mask, net, label) -> float:
    v = [p["results"][net][label]["iteration_s"] for p in _points(res, ds, msl, mask) if label in p["results"][net]]
    return float(np.mean(v)) if v else float("nan")


def speedup(res, ds, msl, mask, net, over: str = "best") -> float:
    """Mean over batches of (baseline iteration / DCP iteration); ``over``: "best" baseline or a label."""
    ups = []
    for p in _points(res, ds, msl, mask):
        r = p["results"][net]
        base = min(r[k]["iteration_s"] for k in r if k in BASELINES) if over == "best" else r[over]["iteration_s"]
        ups.append(base / r["dcp"]["iteration_s"])
    return float(np.mean(ups)) if ups else float("nan")


def best_baseline_names(res, ds, msl, mask, net) -> str:
    names = []
    for p in _points(res, ds, msl, mask):
        r = p["results"][net]
        names.append(min((r[k]["iteration_s"], k) for k in r if k in BASELINES)[1])
    return "/".join(sorted(set(names), key=names.index))


def tables(res) -> str:
    nets = list(res["points"][0]["results"]) if res["points"] else []
    dss = [d for d in ("ldc", "longalign") if any(p["dataset"] == d for p in res["points"])]
    msls = sorted({p["msl"] for p in res["points"]})
    masks = [m for m in MASKS if any(p["mask"] == m for p in res["points"])]
    lines = []
    for net in nets:
        lines.append(f"\n#### Iteration time (s), `{net}` network, H100 compute (simulated)\n")
        lines.append("| dataset | tokens | mask | " + " | ".join(LABELS[k] for k in ORDER)
                     + " | DCP / best baseline | DCP / MLM | best baseline | published MLM -> DCP |")
        lines.append("|---|---:|---|" + "---:|" * (len(ORDER) + 2) + "---|---|")
        for ds in dss:
            for msl in msls:
                for mask in masks:
                    if not _points(res, ds, msl, mask):
                        continue
                    cells = " | ".join(f"{mean_s(res, ds, msl, mask, net, k):.3f}" for k in ORDER)
                    pub = PUBLISHED.get((ds, msl), {}).get(mask)
                    pub_s = f"{pub[0]:.2f} -> {pub[1]:.2f} ({pub[0] / pub[1]:.2f}x)" if pub else "-"
                    lines.append(f"| {ds} | {msl // 1024}K | {mask} | {cells} | "
                                 f"{speedup(res, ds, msl, mask, net):.2f}x | {speedup(res, ds, msl, mask, net, 'te-a2a'):.2f}x"
                                 f" | {best_baseline_names(res, ds, msl, mask, net)} | {pub_s} |")
        for mask in masks:
            ups = [speedup(res, ds, msl, mask, net) for ds in dss for msl in msls if _points(res, ds, msl, mask)]
            mlm = [speedup(res, ds, msl, mask, net, "te-a2a") for ds in dss for msl in msls if _points(res, ds, msl, mask)]
            pub = [PUBLISHED[(ds, msl)][mask][0] / PUBLISHED[(ds, msl)][mask][1] for ds in dss for msl in msls
                   if (ds, msl) in PUBLISHED and _points(res, ds, msl, mask)]
            lines.append(f"\n`{net}`, {mask}: DCP over the best baseline {min(ups):.2f}-{max(ups):.2f}x, over MLM "
                         f"(TE a2a+p2p) {min(mlm):.2f}-{max(mlm):.2f}x; published (over MLM) "
                         f"{min(pub):.2f}-{max(pub):.2f}x" if pub else "")
    return "\n".join(lines)


def plot(res, fig_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    nets = list(res["points"][0]["results"]) if res["points"] else []
    msls = sorted({p["msl"] for p in res["points"]})
    masks = [m for m in MASKS if any(p["mask"] == m for p in res["points"])]
    for net in nets:
        dss = [d for d in ("ldc", "longalign") if any(p["dataset"] == d for p in res["points"])]
        fig, axes = plt.subplots(len(dss), len(masks), figsize=(6 * len(masks), 3.5 * len(dss) + 0.5), squeeze=False)
        for i, ds in enumerate(dss):
            for j, mask in enumerate(masks):
                ax = axes[i, j]
                x = np.arange(len(msls))
                w = 0.8 / len(ORDER)
                for k, lab in enumerate(ORDER):
                    ax.bar(x + (k - (len(ORDER) - 1) / 2) * w, [mean_s(res, ds, m, mask, net, lab) for m in msls], w,
                           label=LABELS[lab], color=COLORS[lab])
                for xi, m in zip(x, msls):
                    pub = PUBLISHED.get((ds, m), {}).get(mask)
                    txt = f"{speedup(res, ds, m, mask, net):.2f}x / {speedup(res, ds, m, mask, net, 'te-a2a'):.2f}x"
                    if pub:
                        txt += f"\n(pub. {pub[0] / pub[1]:.2f}x)"
                    ax.annotate(txt, (xi, 0), xytext=(0, -14), textcoords="offset points", ha="center", va="top",
                                fontsize=7)
                ax.set_xticks(x)
                ax.set_xticklabels([f"{m // 1024}K" for m in msls])
                ax.tick_params(axis="x", pad=34)
                ax.set_ylabel("iteration s (simulated)")
                ax.set_title(f"{'LDC' if ds == 'ldc' else 'LongAlign'}, {mask}")
        h, lab = axes[0, 0].get_legend_handles_labels()
        fig.legend(h, lab, loc="lower center", ncol=len(ORDER), fontsize=8)
        fig.suptitle(f"Figs. 14-15 reproduction: 8B GPT, TP 4, 8x8 GPUs, H100 compute, {net} network (simulated)\n"
                     "labels: DCP over the best baseline / over MLM (TE a2a+p2p) (published A100 speed-up over MLM)",
                     fontsize=9)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        files += save_figure(fig, fig_dir, f"fig14_15_e2e_{net}")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_args(p, "runs/e2e", "causal,lambda")
    p.add_argument("--msl", default="16384,32768,65536,131072", help="tokens per batch (= max sequence length)")
    p.add_argument("--batches", type=int, default=2, help="batches per point")
    p.add_argument("--networks", default="a100-p4d,h100-p5")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--dcp-block-sizes", default=None, help="DCP block sizes (default: per tokens per batch, "
                   "around the published best configurations)")
    return drive(p.parse_args(argv), simulate, plot, tables, "msl", lambda m: f"{m // 1024}K")


if __name__ == "__main__":
    sys.exit(main())
