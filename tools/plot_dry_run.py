#!/usr/bin/env python
"""Draw the four dry-run figures (PNG and PDF) from the CSV of ``tools/dry_run.py --sweep``.

    python tools/plot_dry_run.py dry_run_ldc.csv [dry_run_longalign.csv ...] --out-dir docs/figures

Every point is the mean over the batches of one configuration (rows with status "ok"); one panel per
dataset found in the CSVs. Volumes are forward inter-node bytes of the whole plan, in MB (10^6 bytes).

1. ``dry_run_block_size_volume``: block size vs DCP inter-node volume, one line per mask, with the
   static baselines' volume (zigzag; TE where it takes the mask) as reference lines;
2. ``dry_run_block_size_planning_time``: block size vs planning seconds (all devices compiled), one
   line per mask, with the partition phase alone dashed;
3. ``dry_run_sparsity_volume``: mask sparsity (unmasked / causal pairs) vs volume for the lambda window,
   shared-question answers and causal-blockwise k_local sweeps, with causal DCP and zigzag as reference
   lines;
4. ``dry_run_imbalance_volume``: achieved compute imbalance (max/mean) vs volume for causal masks, one
   line per compute-imbalance limit, points over the inter-node factor (labelled).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

import numpy as np

FIGURES = ("dry_run_block_size_volume", "dry_run_block_size_planning_time", "dry_run_sparsity_volume",
           "dry_run_imbalance_volume")
MASK_LABELS = {"causal": "causal", "lambda": "lambda", "shared_question": "shared question",
               "causal_blockwise": "causal blockwise"}
SPARSE_SWEEPS = (("lambda_window", "lambda", "lambda_window", "window"),
                 ("shared_question", "shared_question", "num_answers", "answers"),
                 ("causal_blockwise", "causal_blockwise", "k_local", "k"))


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    if not rows:
        raise SystemExit(f"no successful rows in {', '.join(paths)}")
    return rows


def _f(row: dict, key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else float("nan")


def mean_by(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        acc[tuple(r[k] for k in keys)].append(_f(r, value))
    return {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in acc.items()}


def _label(row: dict) -> str:
    return f"{row['dataset']} ({int(row['tokens_per_batch']) // 1024}K tokens/batch)"


def _panels(plt, n: int, title: str):
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _save(fig, out_dir: str, name: str) -> list[str]:
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    datasets = list(dict.fromkeys(_label(r) for r in rows))
    by_ds = {d: [r for r in rows if _label(r) == d] for d in datasets}
    written = []

    # 1 and 2: block size sweeps
    for name, value, ylabel, title in (
            (FIGURES[0], "fwd_inter_node_bytes", "forward inter-node volume (MB)", "Block size vs inter-node volume"),
            (FIGURES[1], "planning_seconds", "planning time (s)", "Block size vs planning time")):
        fig, axes = _panels(plt, len(datasets), title)
        for ax, ds in zip(axes, datasets):
            sub = [r for r in by_ds[ds] if r["grid"] == "block_size"]
            masks = list(dict.fromkeys(r["mask"] for r in sub))
            for i, mask in enumerate(masks):
                ms = [r for r in sub if r["mask"] == mask]
                m = mean_by(ms, ("block_size",), value)
                xs = sorted(m, key=lambda k: int(k[0]))
                color = f"C{i}"
                scale = 1e-6 if value.endswith("bytes") else 1.0
                ax.plot([int(x[0]) for x in xs], [m[x] * scale for x in xs], "o-", color=color,
                        label=MASK_LABELS.get(mask, mask))
                if value == "planning_seconds":
                    p = mean_by(ms, ("block_size",), "partition_seconds")
                    ax.plot([int(x[0]) for x in xs], [p[x] for x in xs], "--", color=color, alpha=0.6,
                            label=f"{MASK_LABELS.get(mask, mask)} (partition)")
            if value.endswith("bytes") and sub:
                for base, style in (("zigzag", "--"), ("te", ":")):
                    v = [_f(r, f"{base}_fwd_inter_node_bytes") for r in sub if r["mask"] == "causal"]
                    v = [x for x in v if not np.isnan(x)]
                    if v:
                        ax.axhline(np.mean(v) * 1e-6, color="k", linestyle=style, linewidth=1,
                                   label=f"{base} (static baseline)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("DCP block size (tokens)")
            ax.set_ylabel(ylabel)
            if value == "planning_seconds":
                ax.set_yscale("log")
            ax.set_title(ds)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        written += _save(fig, out_dir, name)
        plt.close(fig)

    # 3: mask sparsity vs volume
    fig, axes = _panels(plt, len(datasets), "Mask sparsity vs inter-node volume")
    for ax, ds in zip(axes, datasets):
        rs = by_ds[ds]
        for i, (grid, mask, param, short) in enumerate(SPARSE_SWEEPS):
            sub = [r for r in rs if r["grid"] == grid]
            if not sub:
                continue
            vol = mean_by(sub, (param,), "fwd_inter_node_bytes")
            sp = mean_by(sub, (param,), "mask_sparsity")
            keys = sorted(vol, key=lambda k: float(k[0]))
            xs, ys = [sp[k] for k in keys], [vol[k] * 1e-6 for k in keys]
            ax.plot(xs, ys, "o-", color=f"C{i + 1}", label=f"{MASK_LABELS[mask]} ({short})")
            for k, x, y in zip(keys, xs, ys):
                ax.annotate(f"{short}={k[0]}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        block = next((r["block_size"] for r in rs if r["grid"] in ("lambda_window", "shared_question")), None)
        causal = [r for r in rs if r["grid"] == "block_size" and r["mask"] == "causal" and r["block_size"] == block]
        if causal:
            ax.axhline(np.mean([_f(r, "fwd_inter_node_bytes") for r in causal]) * 1e-6, color="C0", linestyle="--",
                       linewidth=1, label=f"causal, DCP (block {block})")
            z = [_f(r, "zigzag_fwd_inter_node_bytes") for r in causal]
            if not np.all(np.isnan(z)):
                ax.axhline(np.nanmean(z) * 1e-6, color="k", linestyle=":", linewidth=1, label="zigzag (any mask)")
        ax.set_xlabel("mask sparsity: unmasked pairs / causal pairs")
        ax.set_ylabel("forward inter-node volume (MB)")
        ax.set_title(ds)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    written += _save(fig, out_dir, FIGURES[2])
    plt.close(fig)

    # 4: achieved compute imbalance vs volume
    fig, axes = _panels(plt, len(datasets), "Compute imbalance vs inter-node volume (causal)")
    for ax, ds in zip(axes, datasets):
        sub = [r for r in by_ds[ds] if r["grid"] == "imbalance"]
        limits = sorted(set(r["compute_imbalance_limit"] for r in sub), key=float)
        for i, lim in enumerate(limits):
            ls = [r for r in sub if r["compute_imbalance_limit"] == lim]
            imb = mean_by(ls, ("inter_node_factor",), "compute_imbalance")
            vol = mean_by(ls, ("inter_node_factor",), "fwd_inter_node_bytes")
            keys = sorted(imb, key=lambda k: float(k[0]))
            xs, ys = [imb[k] for k in keys], [vol[k] * 1e-6 for k in keys]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=f"compute imbalance limit {lim}")
            for k, x, y in zip(keys, xs, ys):
                ax.annotate(f"f={float(k[0]):g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("achieved compute imbalance (max / mean per device)")
        ax.set_ylabel("forward inter-node volume (MB)")
        ax.set_title(ds)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    written += _save(fig, out_dir, FIGURES[3])
    plt.close(fig)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="CSV file(s) written by tools/dry_run.py --sweep")
    p.add_argument("--out-dir", default="figures", help="where the PNG and PDF files go (default figures/)")
    args = p.parse_args(argv)
    for path in args.csv:
        if not os.path.exists(path):
            p.error(f"no such file: {path}")
    for path in plot(read_rows(args.csv), args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
