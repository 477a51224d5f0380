#!/usr/bin/env python
"""The published attention microbenchmark, measured: every backend on LongAlign- and LDC-shaped batches
at several length scales and masks, then the two figures (causal forward/backward bars per backend and
scale; DCP's speed-up over the best baseline per mask).

Runs ``tools/bench_attention.py`` once per (dataset, scale, mask) and gathers its CSV rows (plus the
dataset, scale and mask) into one CSV; ``--plot-only`` redraws the figures from an existing CSV.
DCP is measured at every ``--block-size`` and its best row kept (as the published study does), and
LoongTrain at its defaults. On a CPU machine use small batches (``--tokens-per-batch``, ``--base-scale``);
on a GPU cluster launch under torchrun with the published sizes (131072 tokens, scales 0.5-4).

    python tools/microbenchmark.py --spawn 4 --tokens-per-batch 4096 --base-scale 0.03 --out runs/micro
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ["ring", "zigzag", "loongtrain", "te"]
LABELS = {"ring": "Ring", "zigzag": "Zigzag", "loongtrain": "LoongTrain", "te": "TE", "dcp": "DCP"}
MASK_ARGS = {  # published mask settings, shrunk with the tokens per batch
    "causal": [],
    "lambda": ["--mask-arg", "sink=64", "--mask-arg", "window={w}"],
    "shared_question": [],
    "causal_blockwise": ["--mask-arg", "block={b}", "--mask-arg", "k_local=2"],
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/microbenchmark", help="folder for the CSV and the figures")
    p.add_argument("--datasets", default="ldc,longalign")
    p.add_argument("--scales", default="0.5,1,2,4")
    p.add_argument("--base-scale", type=float, default=1.0, help="multiplies every scale (machine size)")
    p.add_argument("--masks", default="causal,lambda,shared_question,causal_blockwise")
    p.add_argument("--backends", default="ring,zigzag,loongtrain,te,dcp")
    p.add_argument("--block-size", default="auto", help="dcp block sizes, comma-separated (best kept)")
    p.add_argument("--tokens-per-batch", type=int, default=131072)
    p.add_argument("--num-batches", type=int, default=1)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--devices-per-node", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spawn", type=int, help="gloo ranks to spawn (CPU); without it run under torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", action="store_true", help="redraw the figures from <out>/microbenchmark.csv")
    return p.parse_args(argv)


def run_all(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    out_csv = os.path.join(args.out, "microbenchmark.csv")
    rows = []
    window = max(16, args.tokens_per_batch // 32)  # published: window 4096 at 131072 tokens
    block = max(8, args.tokens_per_batch // 512)  # published: block 256 at 131072 tokens
    for ds in args.datasets.split(","):
        for scale in (float(s) for s in args.scales.split(",")):
            for mask in args.masks.split(","):
                part = os.path.join(args.out, f"{ds}_{scale:g}_{mask}.csv")
                cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_attention.py"),
                       "--dataset", ds, "--scale", str(scale * args.base_scale), "--seed", str(args.seed),
                       "--num-batches", str(args.num_batches), "--tokens-per-batch", str(args.tokens_per_batch),
                       "--backends", args.backends, "--block-size", args.block_size, "--mask", mask,
                       "--num-heads", str(args.num_heads), "--num-kv-heads", str(args.num_kv_heads),
                       "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--warmup", str(args.warmup),
                       "--repeats", str(args.repeats), "--csv", part]
                cmd += [a.format(w=window, b=block) for a in MASK_ARGS.get(mask, [])]
                if args.devices_per_node:
                    cmd += ["--devices-per-node", str(args.devices_per_node)]
                if args.spawn:
                    cmd += ["--spawn", str(args.spawn)]
                print(f"[microbenchmark] {ds} scale {scale:g} {mask}", flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
                with open(part) as f:
                    for r in csv.DictReader(f):
                        rows.append({"dataset": ds, "scale": scale, **r})
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out_csv


def load(path: str) -> list[dict]:
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    for r in rows:
        r["scale"] = float(r["scale"])
        r["family"] = r["backend"].split("(")[0]  # "dcp(block=256)" -> "dcp"
        for k in ("fwd_ms", "bwd_ms"):
            r[k] = float(r[k])
    return rows


def best_ms(rows, ds, scale, mask, family, which) -> float | None:
    """Mean over batches of the family's best configuration (min over dcp block sizes)."""
    sel = [r for r in rows if r["dataset"] == ds and r["scale"] == scale and r["mask"] == mask and r["family"] == family]
    if not sel:
        return None
    by_batch: dict = {}
    for r in sel:
        by_batch.setdefault(r["batch"], []).append(r[f"{which}_ms"])
    return sum(min(v) for v in by_batch.values()) / len(by_batch)


def speedups(rows) -> list[dict]:
    """DCP speed-up over the best baseline per (dataset, scale, mask, pass)."""
    out = []
    keys = sorted({(r["dataset"], r["scale"], r["mask"]) for r in rows})
    for ds, scale, mask in keys:
        for which in ("fwd", "bwd"):
            dcp = best_ms(rows, ds, scale, mask, "dcp", which)
            base = {b: best_ms(rows, ds, scale, mask, b, which) for b in BASELINES}
            base = {b: v for b, v in base.items() if v is not None}
            if dcp is None or not base:
                continue
            best = min(base, key=base.get)
            out.append({"dataset": ds, "scale": scale, "mask": mask, "pass": which, "dcp_ms": dcp,
                        "best_baseline": best, "best_ms": base[best], "speedup": base[best] / dcp})
    return out


def plot(rows, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    datasets = [d for d in ("ldc", "longalign") if any(r["dataset"] == d for r in rows)]
    scales = sorted({r["scale"] for r in rows})
    fams = [f for f in BASELINES + ["dcp"] if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 6.5), squeeze=False)
    x = np.arange(len(scales))
    wdt = 0.8 / max(len(fams), 1)
    for j, ds in enumerate(datasets):
        for i, which in enumerate(("fwd", "bwd")):
            ax = axes[i, j]
            for k, fam in enumerate(fams):
                vals = [best_ms(rows, ds, s, "causal", fam, which) or 0.0 for s in scales]
                ax.bar(x + (k - (len(fams) - 1) / 2) * wdt, vals, wdt, label=LABELS[fam])
            ax.set_xticks(x)
            ax.set_xticklabels([f"x{s:g}" for s in scales])
            ax.set_ylabel(f"{which} ms (max over ranks)")
            ax.set_title(f"{'LDC' if ds == 'ldc' else 'LongAlign'}-shaped, causal, {which.upper()}")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        files.append(os.path.join(out_dir, f"microbenchmark_causal.{ext}"))
        fig.savefig(files[-1], dpi=150)
    plt.close(fig)

    ups = speedups(rows)
    masks = [m for m in MASK_ARGS if any(u["mask"] == m for u in ups)]
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 6.5), squeeze=False, sharey="row")
    wdt = 0.8 / max(len(masks), 1)
    for j, ds in enumerate(datasets):
        for i, which in enumerate(("fwd", "bwd")):
            ax = axes[i, j]
            for k, m in enumerate(masks):
                vals = [next((u["speedup"] for u in ups if (u["dataset"], u["scale"], u["mask"], u["pass"])
                              == (ds, s, m, which)), 0.0) for s in scales]
                ax.bar(x + (k - (len(masks) - 1) / 2) * wdt, vals, wdt, label=m)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(x)
            ax.set_xticklabels([f"x{s:g}" for s in scales])
            ax.set_ylabel("DCP speed-up over best baseline")
            ax.set_title(f"{'LDC' if ds == 'ldc' else 'LongAlign'}-shaped, {which.upper()}")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        files.append(os.path.join(out_dir, f"microbenchmark_masks.{ext}"))
        fig.savefig(files[-1], dpi=150)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    args = parse(argv)
    path = os.path.join(args.out, "microbenchmark.csv") if args.plot_only else run_all(args)
    rows = load(path)
    for f in plot(rows, args.out):
        print(f"[microbenchmark] wrote {f}")
    print("| dataset | scale | mask | pass | dcp ms | best baseline | its ms | speed-up |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    for u in speedups(rows):
        print(f"| {u['dataset']} | {u['scale']:g} | {u['mask']} | {u['pass']} | {u['dcp_ms']:.1f} | "
              f"{u['best_baseline']} | {u['best_ms']:.1f} | {u['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
