#!/usr/bin/env python
"""Figures and a summary table from the training logs of several runs.

    python tools/parse_logs.py runs/ring runs/zigzag runs/dcp --out docs/figures --warmup 2

Each RUN is a run directory (``pretrain_gpt.py --log-dir``: ``train_log.jsonl``, else a text log such as
``stdout.log`` next to ``args.json``), a ``.jsonl`` sidecar, or a text log of Megatron per-iteration lines.
Writes, PNG and PDF:

* ``iteration_time``: end-to-end iteration time per backend and mask (bars, mean +- std after dropping
  ``--warmup`` iterations; one panel per dataset), as in the DCP paper's figures 14-15. Times are
  averaged over the iterations that every run of the same dataset and mask has, so backends are
  compared on the same batches (the speedup column too);
* ``loss_curves``: lm loss per iteration, one line per backend, one panel per (dataset, mask) (figure 20);
* ``summary.md``: one row per run (iteration time, tokens/s, TFLOP/s/GPU, losses, plan wait), with the
  speedup over ``ring`` where a ring run of the same dataset and mask exists.

Text logs are parsed by field name (``key: value |`` segments), so optional or reordered fields and both
timestamp formats are fine. Their values are interval averages (one per logged line), not per-iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

FIELDS = {  # text-log key -> record key
    "consumed samples": "consumed_samples",
    "elapsed time per iteration (ms)": "elapsed_ms",
    "throughput per GPU (TFLOP/s/GPU)": "tflops_per_gpu",
    "tokens per second": "tokens_per_second",
    "learning rate": "learning_rate",
    "global batch size": "global_batch_size",
    "lm loss": "lm_loss",
    "loss scale": "loss_scale",
    "grad norm": "grad_norm",
    "number of skipped iterations": "skipped",
    "number of nan iterations": "nan",
}
_ITER = re.compile(r"iteration\s+(\d+)\s*/\s*(\d+)")
BACKEND_ORDER = ["ring", "zigzag", "loongtrain", "te", "dcp"]


def parse_line(line: str) -> dict | None:
    """One Megatron per-iteration line -> record (None for other lines)."""
    m = _ITER.search(line)
    if m is None or "elapsed time per iteration" not in line:
        return None
    rec: dict = {"iteration": int(m.group(1)), "train_iters": int(m.group(2))}
    for segment in line[m.end():].split("|"):
        if ":" not in segment:
            continue
        key, _, value = segment.rpartition(":")
        key = key.strip()
        if key in FIELDS:
            try:
                rec[FIELDS[key]] = float(value.strip())
            except ValueError:
                pass
    return rec


@dataclass
class Run:
    source: str
    backend: str = "unknown"
    mask: str = "unknown"
    dataset: str = "unknown"
    world_size: int | None = None
    records: list = field(default_factory=list)  # training iterations
    evaluations: list = field(default_factory=list)  # validation / test records ({"split": ...})

    @property
    def label(self) -> str:
        return self.backend

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["iteration"], r[key]) for r in self.records if r.get(key) is not None]
        if not pts:
            return np.zeros(0), np.zeros(0)
        it, val = zip(*pts)
        return np.asarray(it), np.asarray(val, dtype=np.float64)

    def steady(self, key: str, warmup: int, iterations: set | None = None) -> np.ndarray:
        """Values after the first ``warmup`` iterations (only ``iterations``, if given)."""
        it, val = self.series(key)
        keep = it > warmup
        if iterations is not None:
            keep &= np.isin(it, sorted(iterations))
        return val[keep] if keep.any() else val


def common_iterations(runs: list[Run]) -> set:
    """Iterations every run has: backends are compared on the same batches."""
    sets = [{r["iteration"] for r in run.records} for run in runs]
    return set.intersection(*sets) if sets else set()


def _meta_from_args(run: Run, folder: str) -> None:
    path = os.path.join(folder, "args.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        a = json.load(f)
    run.backend = a.get("cp_backend", run.backend)
    run.mask = a.get("attention_mask", run.mask)
    run.dataset = a.get("dataset_name", run.dataset)
    run.world_size = a.get("world_size", run.world_size)


def load_run(path: str) -> Run:
    if os.path.isdir(path):
        jsonl = os.path.join(path, "train_log.jsonl")
        if os.path.isfile(jsonl):
            return load_run(jsonl)
        logs = sorted(f for f in os.listdir(path) if f.endswith(".log"))
        if not logs:
            raise FileNotFoundError(f"{path}: no train_log.jsonl and no *.log file")
        return load_run(os.path.join(path, logs[0]))
    run = Run(path)
    if path.endswith(".jsonl"):
        run.records = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    run.records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON record ({exc.msg}); a run killed while writing "
                                     "leaves a partial last line: delete that line") from None
        # Validation and test results (Megatron's validation line) carry a "split"; the rest are iterations.
        run.evaluations = [r for r in run.records if "split" in r]
        run.records = [r for r in run.records if "split" not in r]
        if run.records:
            last = run.records[-1]
            run.backend = last.get("backend", run.backend)
            run.mask = last.get("mask", run.mask)
            run.dataset = last.get("dataset", run.dataset)
            run.world_size = last.get("world_size")
        # A resumed run appends: keep the last record of each iteration.
        run.records = list(OrderedDict((r["iteration"], r) for r in run.records).values())
        run.records.sort(key=lambda r: r["iteration"])
    else:
        with open(path, errors="replace") as f:
            run.records = [r for r in map(parse_line, f) if r is not None]
        _meta_from_args(run, os.path.dirname(os.path.abspath(path)))
    if not run.records:
        raise ValueError(f"{path}: no per-iteration records found")
    return run


def _three_digits(v: float) -> str:
    """Three significant digits, never in exponent form (1111.1 -> '1110', 0.012345 -> '0.0123')."""
    return f"{float(f'{v:.3g}'):g}" if abs(v) < 1e6 else f"{v:.3g}"


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "x")


def _order(backends) -> list[str]:
    return sorted(backends, key=lambda b: (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), b))


def _save(fig, out: str, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = os.path.join(out, f"{name}.{ext}")
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    return paths


def warmup_note(runs: list[Run], warmup: int) -> str | None:
    """The runs whose every iteration the warmup would drop (they are averaged over all iterations)."""
    short = [r for r in runs if max(r["iteration"] for r in r.records) <= warmup]
    if not short:
        return None
    names = ", ".join(f"{os.path.basename(os.path.dirname(r.source)) or r.source} ({len(r.records)} iterations)"
                      for r in short)
    return f"--warmup {warmup} would drop every iteration of {names}: those runs are averaged over all iterations"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_iteration_time(runs: list[Run], out: str, warmup: int) -> list[str]:
    fig = iteration_time_figure(runs, warmup)
    paths = _save(fig, out, "iteration_time")
    _pyplot().close(fig)
    return paths


def iteration_time_figure(runs: list[Run], warmup: int):
    plt = _pyplot()

    datasets = sorted({r.dataset for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(5.0, 4.5 * len(datasets)), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = [r for r in runs if r.dataset == ds]
        masks = sorted({r.mask for r in sub})
        common = {mk: common_iterations([r for r in sub if r.mask == mk]) for mk in masks}
        backends = _order({r.label for r in sub})
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            means, stds = [], []
            for mk in masks:
                t = np.concatenate([r.steady("elapsed_ms", warmup, common[mk]) for r in sub
                                    if r.mask == mk and r.label == b]
                                   or [np.zeros(0)])
                means.append(t.mean() if t.size else np.nan)
                stds.append(t.std() if t.size else 0.0)
            x = np.arange(len(masks)) + (j - (len(backends) - 1) / 2) * width
            bars = ax.bar(x, means, width, yerr=stds, capsize=2, label=b)
            for rect, v in zip(bars, means):
                if np.isfinite(v):
                    ax.annotate(_three_digits(v), (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(np.arange(len(masks)))
        ax.set_xticklabels(masks, rotation=15)
        ax.set_ylabel("iteration time (ms)")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    if warmup_note(runs, warmup):
        what = f"some runs have no iteration after the first {warmup}: all their iterations averaged"
    else:
        what = f"first {warmup} iterations dropped"
    fig.suptitle(f"End-to-end iteration time (mean +- std, {what})", fontsize=9)
    return fig


def plot_loss_curves(runs: list[Run], out: str) -> list[str]:
    fig = loss_curves_figure(runs)
    paths = _save(fig, out, "loss_curves")
    _pyplot().close(fig)
    return paths


def loss_curves_figure(runs: list[Run]):
    plt = _pyplot()

    groups = sorted({(r.dataset, r.mask) for r in runs})
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (ds, mk) in zip(axes.flat, groups):
        sub = [r for r in runs if (r.dataset, r.mask) == (ds, mk)]
        for j, b in enumerate(_order({r.label for r in sub})):
            for r in sub:
                if r.label == b:  # identical curves (every backend is exact) stay distinguishable
                    it, loss = r.series("lm_loss")
                    ax.plot(it, loss, label=b, linewidth=1.2, alpha=0.85, linestyle=LINE_STYLES[j % len(LINE_STYLES)],
                            marker=MARKERS[j % len(MARKERS)], markevery=max(1, len(it) // 8), markersize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel("lm loss")
        ax.set_title(f"{ds} / {mk}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return fig


def summary_table(runs: list[Run], warmup: int) -> str:
    lines = ["| dataset | mask | backend | ranks | iterations | iteration time (ms) | speedup vs ring | tokens/s | "
             "TFLOP/s/GPU | first loss | last loss | validation loss | plan wait (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {(r.dataset, r.mask) for r in runs}
    common = {g: common_iterations([r for r in runs if (r.dataset, r.mask) == g]) for g in groups}
    ring = {}
    for r in runs:
        if r.label == "ring":
            ring[(r.dataset, r.mask)] = r.steady("elapsed_ms", warmup, common[(r.dataset, r.mask)]).mean()
    for r in sorted(runs, key=lambda r: (r.dataset, r.mask, _order([r.label, "ring"]).index(r.label), r.source)):
        t = r.steady("elapsed_ms", warmup, common[(r.dataset, r.mask)])
        tok = r.steady("tokens_per_second", warmup, common[(r.dataset, r.mask)])
        tf = r.steady("tflops_per_gpu", warmup, common[(r.dataset, r.mask)])
        wait = r.steady("plan_wait_ms", warmup, common[(r.dataset, r.mask)])
        _, loss = r.series("lm_loss")
        base = ring.get((r.dataset, r.mask))
        speed = f"{base / t.mean():.2f}x" if base is not None and t.size else ""
        wait_ms = f"{wait.mean():.1f}" if wait.size else ""
        valid = [e["lm_loss"] for e in r.evaluations if e.get("split") == "validation" and "lm_loss" in e]
        valid_loss = f"{valid[-1]:.4f}" if valid else ""
        lines.append(
            f"| {r.dataset} | {r.mask} | {r.label} | {r.world_size or ''} | {len(r.records)} | "
            f"{t.mean():.1f} +- {t.std():.1f} | {speed} | {tok.mean():.0f} | {tf.mean():.4f} | "
            f"{loss[0]:.4f} | {loss[-1]:.4f} | {valid_loss} | {wait_ms} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, train_log.jsonl files or text logs")
    p.add_argument("--out", required=True, help="output folder for the figures and summary.md")
    p.add_argument("--warmup", type=int, default=2, help="iterations dropped before averaging times")
    a = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in a.runs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"parse_logs.py: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    note = warmup_note(runs, a.warmup)
    if note:
        print(f"parse_logs.py: warning: {note}", file=sys.stderr)
    written = plot_iteration_time(runs, a.out, a.warmup) + plot_loss_curves(runs, a.out)
    table = summary_table(runs, a.warmup)
    md = os.path.join(a.out, "summary.md")
    with open(md, "w") as f:
        f.write(table)
    written.append(md)
    print(table)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
