"""Attention cost model: seconds of block-kernel work on one device, from a measured table or a roofline.

A *cost table* (JSON, ``dcp_backend/cost_tables/*.json``, written by ``tools/calibrate.py``) holds
measured forward and backward times of the block kernel on synthetic works (``points``: ``segments``
independent segments of ``q_len`` query rows against ``kv_len`` keys under a mask of a known kind, for
given heads / KV heads / head dim / dtype). From a work the model takes a few *features* that a tiled
attention kernel's time is linear in:

* ``calls``: kernel launches (1 per work for a one-call kernel; one per group of equal-shape segments
  for the CPU kernel, which batches those);
* ``segs``: segments x heads (per-sequence setup of a varlen kernel; the CPU kernel's per (batch, head)
  work item);
* ``rows``: query rows x heads, rows rounded up to whole query tiles (per-row loads, softmax epilogue);
* ``pairs_full``: (query, key) pairs the kernel computes in tiles that are fully visible, x heads;
* ``pairs_partial``: pairs computed in tiles that need the mask, x heads;
* ``pairs_causal``: pairs of square causal segments (the CPU kernel's ``is_causal`` path), x heads.

How a kernel visits tiles is the table's ``visit`` rule: ``"sparse"`` (FlexAttention / FlashAttention
style: only tiles with a visible pair, tiles of ``tile`` = [q, kv] rows, tiled per segment) or
``"dense_unless_causal"`` (ATen's CPU flash kernel: a masked or full segment computes every pair; a
square causal segment uses the causal path).

A table may be *derived* from another kernel's measurements (``pair_scale``: the pair coefficients of
each pass multiplied by a factor after fitting, :func:`derive_flash_table`): the flash-attn table
``h100_flash.json`` is the FlexAttention table with its per-pair cost scaled so a dense causal document
runs at the measured SDPA rate (no flash-attn kernel was measured).

For each (dtype, head_dim, pass) the model fits non-negative coefficients of the features (except those
the table pins in ``fixed``, e.g. a call overhead the points cannot separate from per-row cost) to the
table's points (least squares on relative error; with the table's ``outlier_factor``, points that far
off the first fit are dropped and listed in :attr:`CostModel.excluded`), then *interpolates the residual*: a segment's time
is multiplied by the measured/fitted ratio interpolated (inverse distance weighting in log2 q length,
log2 kv length, unmasked fraction and log2 heads) from the table's points, so the model reproduces the
measured points and varies smoothly between them; far from every point the ratio tends to the average.

Where no table fits (a dtype or head dim the table lacks, or no table at all) the model falls back to an
analytic roofline (:data:`ANALYTIC`): ``calls * call_s + max(flops / flops_per_s, bytes / bytes_per_s)``
per segment with ``flops = 4 * computed pairs * heads * head_dim`` (computed pairs from the same tile
visit rule) and backward ``2.5x`` forward, as in the published planner's model. Copies (packing,
reductions) cost ``ops * copy_overhead_s + bytes / copy_bytes_per_s``.

``load_cost_model("h100" | "cpu" | path | None)``: a shipped table, a table file, or (None) the analytic
H100-class roofline alone.
"""
from __future__ import annotations

import datetime
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from dcp_backend.kernels.work import KIND_CAUSAL, KIND_FULL, AttnWork
from dcp_backend.dtypes import dtype_name, element_size
from dcp_backend.errors import CPError

FEATURES = ("calls", "segs", "rows", "pairs_full", "pairs_partial", "pairs_causal")
TABLE_DIR = Path(__file__).resolve().parent / "cost_tables"
SHIPPED = {"h100": "h100.json", "h100_flash": "h100_flash.json", "cpu": "cpu.json"}
# The flash-attn table (full and causal segments) that goes with a table of another kernel, by table name
FLASH_COMPANION = {"h100": "h100_flash"}
PAIR_FEATURES = ("pairs_full", "pairs_partial", "pairs_causal")
# One measured dense causal rate on an H100 (bf16, 32 query / 8 KV heads, head dim 128, one 32K-token
# document): SDPA about 587-590 TFLOP/s forward (docs/research, shared DESIGN.md and data/README.md)
SDPA_CAUSAL_TFLOPS = 587.0

# Analytic fallback constants (documented assumptions, not measurements):
# h100: FlexAttention's measured plateau (~440 TFLOP/s forward, DESIGN.md) rounded down; HBM copy
#   bandwidth ~1.4 TB/s (read + write: the copy rows of the shipped H100 table, docs/SIMULATOR.md).
# a100: FlashAttention-2 forward ~70% of the 312 TFLOP/s bf16 peak; ~1.3 TB/s.
# cpu: one core of an AVX-512 class server (~60 GFLOP/s sustained in fp32 attention), ~5 GB/s copies.
ANALYTIC = {
    "h100": {"flops_per_s": 400e12, "bytes_per_s": 1.4e12, "call_s": 10e-6, "bwd_factor": 2.5,
             "tile": [128, 128], "visit": "sparse", "copy_bytes_per_s": 1.4e12, "copy_overhead_s": 5e-6},
    "a100": {"flops_per_s": 220e12, "bytes_per_s": 1.3e12, "call_s": 10e-6, "bwd_factor": 2.5,
             "tile": [128, 128], "visit": "sparse", "copy_bytes_per_s": 1.3e12, "copy_overhead_s": 5e-6},
    "cpu": {"flops_per_s": 60e9, "bytes_per_s": 5e9, "call_s": 50e-6, "bwd_factor": 2.5,
            "tile": [1, 1], "visit": "dense_unless_causal", "copy_bytes_per_s": 5e9, "copy_overhead_s": 5e-6},
}


# ----------------------------------------------------------------------------------------- features

def work_features(work: AttnWork, tile=(128, 128), visit: str = "sparse"):
    """Per-segment features of a work (heads not applied): returns (calls, seg) where ``seg`` is a dict
    of arrays over live segments: q_len, kv_len, pairs, rows, pairs_full, pairs_partial, pairs_causal."""
    ql, kl = work.q_lens, work.k_lens
    live = (ql > 0) & (kl > 0)
    per_row = work.row_visible if work.total_q else np.zeros(0)
    seg_ids = work.seg_ids()
    pairs = np.bincount(seg_ids, weights=per_row, minlength=work.num_segments)
    if visit == "dense_unless_causal":
        kinds = work.kinds()
        calls = 0
        if live.any():
            calls = int(np.unique(np.stack([kinds[live], ql[live], kl[live]], 1), axis=0).shape[0])
        dense = (ql * kl).astype(np.float64)
        seg = {
            "segs": np.ones(work.num_segments),
            "rows": ql.astype(np.float64),
            "pairs_full": np.where(kinds == KIND_FULL, dense, 0.0),
            "pairs_partial": np.where((kinds != KIND_FULL) & (kinds != KIND_CAUSAL), dense, 0.0),
            "pairs_causal": np.where(kinds == KIND_CAUSAL, dense, 0.0),
        }
    elif visit == "sparse":
        calls = 1 if live.any() else 0
        full_t, part_t, qtiles = _tile_counts(work, int(tile[0]), int(tile[1]))
        area = float(tile[0] * tile[1])
        seg = {"segs": np.ones(work.num_segments), "rows": qtiles * float(tile[0]), "pairs_full": full_t * area, "pairs_partial": part_t * area,
               "pairs_causal": np.zeros(work.num_segments)}
    else:
        raise CPError(f"unknown tile visit rule {visit!r}")
    seg = {k: v[live] for k, v in seg.items()}
    seg.update(q_len=ql[live].astype(np.float64), kv_len=kl[live].astype(np.float64), pairs=pairs[live])
    return calls, seg


def _tile_counts(work: AttnWork, tq: int, tk: int):
    """Per segment: (full kv tiles, partial kv tiles, q tiles), tiles counted per segment (tile 0 at the
    segment's first row / key). A q tile's visited kv tiles are taken from each range's envelope over the
    tile's rows, its full tiles from the ranges' common part (exact for the contiguous, monotone ranges
    of the masks here; an estimate for arbitrary ranges)."""
    n = work.num_segments
    full = np.zeros(n)
    part = np.zeros(n)
    qt = -(-work.q_lens // tq)
    if work.total_q == 0:
        return full, part, qt.astype(np.float64)
    seg = work.seg_ids()
    local = np.arange(work.total_q) - work.cu_q[seg]
    tile_start_row = (local % tq) == 0
    starts = np.nonzero(tile_start_row)[0]  # first row of each q tile (segments are contiguous)
    tile_seg = seg[starts]
    rows_in_tile = np.diff(np.concatenate([starts, [work.total_q]]))
    klen = work.k_lens[tile_seg]
    s, e = work.ranges[..., 0], work.ranges[..., 1]
    empty = e <= s
    big = np.iinfo(np.int64).max // 4
    lo = np.minimum.reduceat(np.where(empty, big, s), starts, axis=0)
    hi = np.maximum.reduceat(np.where(empty, -1, e), starts, axis=0)
    in_lo = np.maximum.reduceat(np.where(empty, big, s), starts, axis=0)
    in_hi = np.minimum.reduceat(np.where(empty, -1, e), starts, axis=0)
    R = work.ranges.shape[1]
    visited = np.zeros(starts.size)
    full_t = np.zeros(starts.size)
    run_hi = np.full(starts.size, -1, dtype=np.int64)  # union of per-range tile intervals
    order = np.argsort(np.where(hi > lo, lo, big), axis=1, kind="stable")
    lo_s = np.take_along_axis(lo, order, 1)
    hi_s = np.take_along_axis(hi, order, 1)
    for r in range(R):
        ok = hi_s[:, r] > lo_s[:, r]
        t0 = lo_s[:, r] // tk
        t1 = -(-hi_s[:, r] // tk)
        a = np.maximum(t0, run_hi)
        visited += np.where(ok, np.maximum(t1 - a, 0), 0)
        run_hi = np.where(ok, np.maximum(run_hi, t1), run_hi)
    for r in range(R):
        ok = in_hi[:, r] > in_lo[:, r]
        f0 = -(-in_lo[:, r] // tk)
        f1 = in_hi[:, r] // tk
        # a kv tile is full only if it has tk real keys and the q tile has tq real rows
        f1 = np.minimum(f1, klen // tk)
        full_t += np.where(ok & (rows_in_tile == tq), np.maximum(f1 - f0, 0), 0)
    full_t = np.minimum(full_t, visited)
    full += np.bincount(tile_seg, weights=full_t, minlength=n)
    part += np.bincount(tile_seg, weights=visited - full_t, minlength=n)
    return full, part, qt.astype(np.float64)


def segment_features(q_len, kv_len, pairs, tile=(128, 128), visit: str = "sparse", causal_square=None):
    """Features of standalone segments given only their shape and pair count (no per-row ranges).

    Sparse visit: a segment whose pairs fill it is all full tiles; otherwise one partial tile per q tile
    row (one mask boundary per row, as for causal, window and prefix masks) and the rest of its pairs in
    full tiles. Dense visit: every pair computed; ``causal_square`` marks segments on the causal path."""
    q = np.asarray(q_len, dtype=np.float64)
    k = np.asarray(kv_len, dtype=np.float64)
    p = np.asarray(pairs, dtype=np.float64)
    if visit == "dense_unless_causal":
        cs = np.zeros(q.shape, bool) if causal_square is None else np.asarray(causal_square, bool)
        dense = q * k
        is_full = p >= dense
        return {"segs": np.ones(q.shape), "rows": q, "pairs_full": np.where(is_full & ~cs, dense, 0.0),
                "pairs_partial": np.where(~is_full & ~cs, dense, 0.0), "pairs_causal": np.where(cs, dense, 0.0),
                "q_len": q, "kv_len": k, "pairs": p}
    tq, tk = float(tile[0]), float(tile[1])
    nq = np.ceil(q / tq)
    nk = np.ceil(k / tk)
    total = nq * nk
    aligned = (np.mod(q, tq) == 0) & (np.mod(k, tk) == 0)
    is_full = (p >= q * k) & aligned
    partial = np.where(is_full, 0.0, np.minimum(total, nq))
    full = np.where(is_full, total, np.clip(np.round(p / (tq * tk) - partial / 2), 0, total - partial))
    partial = np.where(p > 0, np.maximum(partial, np.where(full > 0, 0.0, 1.0)), 0.0)
    return {"segs": np.ones(q.shape), "rows": nq * tq, "pairs_full": full * tq * tk, "pairs_partial": partial * tq * tk,
            "pairs_causal": np.zeros(q.shape), "q_len": q, "kv_len": k, "pairs": p}


def calibration_work(segments: int, q_len: int, kv_len: int, mask: str, density: float | None = None,
                     vary: bool = False) -> AttnWork:
    """The synthetic work of one table point: ``segments`` segments of ``q_len`` x ``kv_len``.

    masks: ``full``; ``causal_last`` (bottom-right causal: row i sees [0, kv_len - q_len + i + 1)); ``band``
    (row i sees the ``density * kv_len`` keys ending at its causal end: a sliding-window-like sparse mask);
    ``causal_split`` (bottom-right causal given as two touching ranges, as zigzag chunks produce: kernels
    see a general mask, not the causal fast path).
    ``vary``: segment s is ``q_len + s`` x ``kv_len + s`` instead (distinct shapes: one CPU kernel call each).
    """
    if q_len < 1 or kv_len < 1 or segments < 1:
        raise CPError("calibration_work: segments, q_len and kv_len must be positive")
    if mask not in ("full", "causal_last", "band", "causal_split"):
        raise CPError(f"calibration_work: unknown mask {mask!r}")
    if mask != "full" and kv_len < q_len:
        raise CPError("calibration_work: causal masks need kv_len >= q_len")
    extra = np.arange(segments, dtype=np.int64) if vary else np.zeros(segments, np.int64)
    ql, kl = q_len + extra, kv_len + extra
    cu_q = np.concatenate([[0], np.cumsum(ql)])
    cu_k = np.concatenate([[0], np.cumsum(kl)])
    seg = np.repeat(np.arange(segments), ql)
    i = np.arange(int(cu_q[-1]), dtype=np.int64) - cu_q[seg]
    k = kl[seg]
    if mask == "full":
        r = np.stack([np.zeros_like(i), k], -1)
    elif mask == "causal_split":  # bottom-right causal as two touching ranges: not the causal fast path
        end = k - ql[seg] + i + 1
        mid = np.minimum(k // 2, end)
        r = np.stack([np.stack([np.zeros_like(i), mid], -1), np.stack([mid, end], -1)], 1)
        return AttnWork(cu_q, cu_k, r)
    else:
        end = k - ql[seg] + i + 1
        if mask == "band":
            w = np.maximum(1, np.round((density or 0.25) * k)).astype(np.int64)
            r = np.stack([np.maximum(0, end - w), end], -1)
        else:
            r = np.stack([np.zeros_like(i), end], -1)
    return AttnWork(cu_q, cu_k, r[:, None, :])


# ----------------------------------------------------------------------------------------- fitting

def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by enumerating active sets (a handful of features)."""
    n = A.shape[1]
    best, best_err = np.zeros(n), float(np.sum(b ** 2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub = A[:, cols]
            if not np.any(sub):
                continue
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((sub @ x - b) ** 2))
            if err < best_err - 1e-15:
                best, best_err = np.zeros(n), err
                best[list(cols)] = x
    return best


@dataclass
class KernelFit:
    """Fitted coefficients (seconds per feature unit) and the residual points of one (dtype, head_dim, pass)."""

    coef: np.ndarray
    coords: np.ndarray  # [points, 4] normalised coordinates of the residual points
    log_ratio: np.ndarray  # log(measured / fitted) at those points
    excluded: list = field(default_factory=list)

    def correction(self, coords: np.ndarray) -> np.ndarray:
        if self.coords.shape[0] == 0:
            return np.ones(coords.shape[0])
        d2 = ((coords[:, None, :] - self.coords[None, :, :]) ** 2).sum(-1)
        exact = d2 < 1e-12
        w = 1.0 / np.maximum(d2, 1e-12) ** 1.5
        w = np.where(exact.any(1, keepdims=True), exact.astype(float), w)
        return np.exp((w * self.log_ratio[None, :]).sum(1) / w.sum(1))


def _coords(q_len, kv_len, pairs, heads, seg: dict | None = None, visit: str = "sparse") -> np.ndarray:
    """Interpolation coordinates of segments: log2 q, log2 kv, a mask coordinate, log2 heads. The mask
    coordinate is the unmasked fraction for sparse kernels; for the dense CPU rule, whose cost does not
    depend on the fraction, it is the kernel path (causal 0, masked 0.5, full 1)."""
    q = np.maximum(np.atleast_1d(np.asarray(q_len, np.float64)), 1)
    k = np.maximum(np.atleast_1d(np.asarray(kv_len, np.float64)), 1)
    if visit == "dense_unless_causal" and seg is not None:
        dens = np.where(seg["pairs_causal"] > 0, 0.0, np.where(seg["pairs_partial"] > 0, 0.5, 1.0))
    else:
        dens = np.clip(np.atleast_1d(np.asarray(pairs, np.float64)) / (q * k), 0, 1)
    h = np.broadcast_to(np.asarray(heads, np.float64), q.shape)
    return np.stack([np.log2(q), np.log2(k), 3.0 * dens, np.log2(np.maximum(h, 1))], -1)


# ----------------------------------------------------------------------------------------- the model

class CostModel:
    """Seconds of attention work and copies on one device; see the module docstring."""

    def __init__(self, table: dict | None = None, analytic: str = "h100", name: str | None = None):
        self.table = table
        self.spec: str | None = None  # what load_cost_model was given (a DCPOptions.cost_model value)
        self.name = name or (table.get("name") if table else f"analytic-{analytic}")
        if analytic not in ANALYTIC:
            raise CPError(f"unknown analytic preset {analytic!r}; choose one of {sorted(ANALYTIC)}")
        self.analytic_name = analytic
        self.analytic = ANALYTIC[analytic]
        t = table or {}
        self.tile = tuple(t.get("tile", self.analytic["tile"]))
        self.visit = t.get("visit", self.analytic["visit"])
        self.network = t.get("network")
        copy = t.get("copy", {})
        self.copy_bytes_per_s = float(copy.get("bytes_per_s", self.analytic["copy_bytes_per_s"]))
        self.copy_overhead_s = float(copy.get("overhead_s", self.analytic["copy_overhead_s"]))
        self._fits: dict = {}
        self.excluded: list = []
        if table:
            self._fit_all()

    # ------------------------------------------------------------------ fitting
    def _point_features(self, pt: dict):
        w = calibration_work(int(pt["segments"]), int(pt["q_len"]), int(pt["kv_len"]), pt["mask"], pt.get("density"),
                             bool(pt.get("vary", False)))
        calls, seg = work_features(w, self.tile, self.visit)
        h = float(pt["heads"])
        x = np.array([calls] + [float(seg[f].sum()) * h for f in FEATURES[1:]])
        return x, seg

    def _fit_all(self) -> None:
        groups: dict = {}
        for pt in self.table.get("points", []):
            for pas in ("fwd", "bwd"):
                if pt.get(f"{pas}_s") is None:
                    continue
                groups.setdefault((dtype_name(pt["dtype"]), int(pt["head_dim"]), pas), []).append(pt)
        for key, pts in groups.items():
            X, y, coords = [], [], []
            for pt in pts:
                x, seg = self._point_features(pt)
                X.append(x)
                y.append(float(pt[f"{key[2]}_s"]))
                first = {f: v[:1] for f, v in seg.items()}
                coords.append(_coords(pt["q_len"], pt["kv_len"], float(seg["pairs"][0]), pt["heads"], first,
                                      self.visit)[0])
            X, y, coords = np.array(X), np.array(y), np.array(coords)
            keep = np.ones(len(y), bool)
            fixed = self.table.get("fixed", {}).get(key[2], {})  # coefficients the table pins (assumptions)
            fix = np.array([f in fixed for f in FEATURES])
            fixed_coef = np.array([float(fixed.get(f, 0.0)) for f in FEATURES])
            outlier = self.table.get("outlier_factor")  # None: keep every point
            for _ in range(2 if outlier else 1):  # fit, drop points more than outlier_factor off, refit
                rest = y[keep] - X[keep] @ fixed_coef
                A = X[keep][:, ~fix] / y[keep, None]
                coef = fixed_coef.copy()
                coef[~fix] = _nnls(A, rest / y[keep])
                pred = X @ coef
                if not outlier:
                    break
                bad = np.abs(np.log(np.maximum(pred, 1e-30) / y)) > math.log(float(outlier))
                if not (bad & keep).any():
                    break
                keep &= ~bad
            excluded = [dict(pts[i], reason=f"{key[2]} {y[i]:.3g}s is {pred[i] / y[i]:.2f}x the fit")
                        for i in np.nonzero(~keep)[0]]
            self.excluded.extend(excluded)
            ratio = np.log(y[keep] / np.maximum(pred[keep], 1e-30))
            scale = float(self.table.get("pair_scale", {}).get(key[2], 1.0))  # a derived kernel: per-pair cost x
            if scale != 1.0:
                coef = coef.copy()
                coef[[FEATURES.index(f) for f in PAIR_FEATURES]] *= scale
            self._fits[key] = KernelFit(coef, coords[keep], ratio, excluded)

    def fit_for(self, dtype, head_dim: int, backward: bool) -> KernelFit | None:
        return self._fits.get((dtype_name(dtype), int(head_dim), "bwd" if backward else "fwd"))

    def source(self, dtype, head_dim: int) -> str:
        """'table' when the table covers (dtype, head_dim), else 'analytic'."""
        return "table" if self.fit_for(dtype, head_dim, False) is not None else "analytic"

    # ------------------------------------------------------------------ evaluation
    def _per_segment(self, seg: dict, heads: int, head_dim: int, dtype, backward: bool) -> np.ndarray:
        """Seconds of each segment without the call overhead."""
        fit = self.fit_for(dtype, head_dim, backward)
        if fit is None:
            a = self.analytic
            computed = seg["pairs_full"] + seg["pairs_partial"] + seg["pairs_causal"]
            e = element_size(dtype)
            nbytes = (2 * seg["q_len"] * heads + 2 * seg["kv_len"] * max(1, heads // 4)) * head_dim * e
            t = np.maximum(4.0 * computed * heads * head_dim / a["flops_per_s"], nbytes / a["bytes_per_s"])
            return (a["bwd_factor"] if backward else 1.0) * t
        c = fit.coef
        t = heads * sum(c[i] * seg[f] for i, f in enumerate(FEATURES) if i > 0)
        if t.size:
            t = t * fit.correction(_coords(seg["q_len"], seg["kv_len"], seg["pairs"], heads, seg, self.visit))
        return t

    def call_seconds(self, dtype, head_dim: int, backward: bool) -> float:
        fit = self.fit_for(dtype, head_dim, backward)
        return float(fit.coef[0]) if fit is not None else self.analytic["call_s"]

    def work_seconds(self, work: AttnWork, heads: int, head_dim: int, dtype, backward: bool = False) -> float:
        """Seconds of one kernel call over ``work`` (``heads`` query heads per row)."""
        calls, seg = work_features(work, self.tile, self.visit)
        return float(calls * self.call_seconds(dtype, head_dim, backward)
                     + self._per_segment(seg, heads, head_dim, dtype, backward).sum())

    def segments_seconds(self, q_len, kv_len, pairs, heads: int, head_dim: int, dtype, backward: bool = False,
                         causal_square=None, calls: int | None = None) -> np.ndarray:
        """Seconds of each standalone segment (vectorised; no per-row ranges: see :func:`segment_features`).
        The call overhead is added once per segment, or ``calls`` times in total spread over the segments."""
        seg = segment_features(q_len, kv_len, pairs, self.tile, self.visit, causal_square)
        n = seg["q_len"].size
        if n == 0:
            return np.zeros(0)
        total_calls = n if calls is None else calls
        return (self._per_segment(seg, heads, head_dim, dtype, backward)
                + self.call_seconds(dtype, head_dim, backward) * total_calls / n)

    def attention_seconds(self, pairs: float, q_tokens: int, kv_tokens: int, heads: int, head_dim: int, dtype,
                          backward: bool = False) -> float:
        """Seconds of one segment of ``q_tokens`` x ``kv_tokens`` with ``pairs`` unmasked pairs, one call."""
        return float(self.segments_seconds([q_tokens], [kv_tokens], [pairs], heads, head_dim, dtype, backward)[0])

    def copy_seconds(self, nbytes: float, ops: int = 1) -> float:
        """Seconds to gather / scatter / pack ``nbytes`` (read + write counted once) in ``ops`` operations."""
        if nbytes <= 0 and ops <= 0:
            return 0.0
        return ops * self.copy_overhead_s + float(nbytes) / self.copy_bytes_per_s

    def block_seconds(self, bs, element_size: int = 2) -> np.ndarray:
        """Forward + backward seconds of every computation block of a :class:`~dcp_backend.dcp.blocks.BlockSet`
        (the planner's balance weight). A query block's per-row cost is shared by its kv blocks (as when they
        run in one segment); kernel-call overheads are not per block and are left out."""
        h, hd = bs.heads, bs.spec.head_dim
        dt = dtype_name(element_size)
        q_len = bs.tb_tokens[bs.pair_q].astype(np.float64)
        kv_len = bs.tb_tokens[bs.pair_kv].astype(np.float64)
        cs = (bs.pair_q == bs.pair_kv) & (bs.pair_count < q_len * kv_len)
        seg = segment_features(q_len, kv_len, bs.pair_count, self.tile, self.visit, cs)
        share = 1.0 / np.maximum(np.bincount(bs.pair_q, minlength=bs.n_tb)[bs.pair_q], 1)
        shared_rows = dict(seg, rows=seg["rows"] * share)
        per_pair = sum(self._per_segment(shared_rows, h.hb, hd, dt, b) for b in (False, True))
        return np.maximum(per_pair, 0.0)[bs.comp_pair(np.arange(bs.n_comp))]

    def describe(self) -> str:
        t = self.table or {}
        src = t.get("source", "analytic roofline") if self.table else f"analytic roofline ({self.analytic_name})"
        return f"{self.name}: {src}"


@lru_cache(maxsize=16)
def table_from_block_costs(path: str, command: str = "") -> dict:
    """A cost table from measured stage costs in the JSONL format of the shared H100 measurements (one row
    per stage shape: block, key blocks, q tokens, fwd_ms, fwdbwd_ms; copy rows: bandwidth). Backward =
    fwdbwd_ms - fwd_ms."""
    pts, copy = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "copy_block_tokens" in r:
                copy.append(r)
                continue
            pts.append({
                "dtype": "bf16", "head_dim": r["head_dim"], "heads": r["heads"], "kv_heads": r["kv_heads"],
                "segments": r["q_tokens"] // r["block"], "q_len": r["block"], "kv_len": r["block"] * r["kv_blocks"],
                "mask": "causal_last" if r["causal_last"] else "full",
                "fwd_s": r["fwd_ms"] * 1e-3, "bwd_s": (r["fwdbwd_ms"] - r["fwd_ms"]) * 1e-3,
                "pairs": r["pairs"],
            })
    bw = float(np.mean([c["GBps_read_plus_write"] for c in copy])) * 1e9 if copy else 1.4e12
    return {
        "format": "dcp-cost-table", "version": 1, "name": "h100",
        "device": "NVIDIA H100 80GB HBM3", "kernel": "flex", "tile": [128, 128], "visit": "sparse",
        "analytic": "h100", "network": "h100-p5",
        "source": (f"converted by tools/calibrate.py --from-jsonl from {os.path.basename(path)} (measured once on 2026-11-24: "
                   "torch.compile'd FlexAttention, BlockMask from block tables, triton.testing.do_bench medians; "
                   "backward = fwdbwd_ms - fwd_ms)"),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "statistic": "median",
        # Every row has 16384 query rows, so a per-call cost cannot be told apart from per-row cost; pin the
        # call overhead to a typical H100 kernel launch (GPU time) and fit the rest. An assumption.
        "fixed": {"fwd": {"calls": 1e-5}, "bwd": {"calls": 2e-5}},
        # one backward row (block 1024, one key block, full) is 4x its causal twin: a measurement glitch
        "outlier_factor": 2.0,
        # copy rows measure read+write bandwidth; the model charges bytes once per gather or scatter
        "copy": {"bytes_per_s": bw / 2, "overhead_s": 5e-6},
        "points": pts,
    }


def derive_flash_table(flex_table: dict, tflops: float = SDPA_CAUSAL_TFLOPS, doc_tokens: int = 32768,
                       heads: int = 32, head_dim: int = 128, dtype: str = "bf16", command: str = "") -> dict:
    """A flash-attn cost table derived from a FlexAttention table and one measured dense causal rate.

    No flash-attn kernel was measured; SDPA's dense causal forward (the same FlashAttention-class kernels)
    was: ``tflops`` on one ``doc_tokens`` causal document. The derived table keeps the FlexAttention
    points, fit and residual interpolation (shape effects), and multiplies the per-pair coefficients of
    both passes by one factor chosen so that the model gives exactly ``tflops`` on that document forward.
    Per-call, per-segment and per-row costs are kept (assumed kernel-independent), and the backward gets
    the forward's factor (assumed: no flash-attn backward rate was measured).
    """
    base = CostModel(flex_table, analytic=flex_table.get("analytic", "h100"))
    work = calibration_work(1, doc_tokens, doc_tokens, "causal_last")
    flops = 4.0 * work.num_pairs() * heads * head_dim
    t1 = base.work_seconds(work, heads, head_dim, dtype)
    t0 = CostModel(dict(flex_table, pair_scale={"fwd": 0.0, "bwd": 0.0}),
                   analytic=flex_table.get("analytic", "h100")).work_seconds(work, heads, head_dim, dtype)
    target = flops / (tflops * 1e12)
    if not t0 < target < t1:
        raise CPError(f"derive_flash_table: the measured rate {tflops} TFLOP/s is not faster than the base table's "
                      f"{flops / t1 / 1e12:.0f} on that document (or overheads alone exceed it)")
    rho = (target - t0) / (t1 - t0)
    out = dict(flex_table)
    out.update(
        name=f"{flex_table.get('name', 'table')}_flash", kernel="flash", pair_scale={"fwd": rho, "bwd": rho},
        date=datetime.date.today().isoformat(), command=command,
        source=(f"derived by tools/calibrate.py --derive-flash from the {flex_table.get('kernel', '?')} table "
                f"{flex_table.get('name', '?')!r} (its points, fit and interpolation) with every per-pair cost x "
                f"{rho:.4f}, so a dense causal {doc_tokens}-token document ({heads} heads, head dim {head_dim}, "
                f"{dtype}) runs at the measured SDPA rate of {tflops:g} TFLOP/s forward (base table: "
                f"{flops / t1 / 1e12:.0f}); backward scaled alike (no flash-attn backward was measured)"),
        derived={"from": flex_table.get("name"), "from_kernel": flex_table.get("kernel"), "sdpa_tflops": tflops,
                 "doc_tokens": doc_tokens, "heads": heads, "head_dim": head_dim, "dtype": dtype,
                 "base_tflops": flops / t1 / 1e12, "pair_scale": rho},
    )
    return out


def read_table(path: str) -> dict:
    """A cost table (JSON) as a dict."""
    with open(path) as f:
        return json.load(f)


def write_table(table: dict, path: str) -> None:
    """Write a cost table after checking that a cost model can be fitted to it."""
    CostModel(table, analytic=table["analytic"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def _load_cached(path: str, mtime: float) -> CostModel:
    with open(path) as f:
        table = json.load(f)
    if table.get("format") != "dcp-cost-table":
        raise CPError(f"{path} is not a dcp cost table (format field {table.get('format')!r})")
    return CostModel(table, analytic=table.get("analytic", "h100"), name=table.get("name", Path(path).stem))


def table_path(spec: str) -> Path:
    if spec in SHIPPED:
        return TABLE_DIR / SHIPPED[spec]
    return Path(spec)


def load_cost_model(spec: str | None = None) -> CostModel:
    """``"h100"`` / ``"cpu"``: a shipped table; a path: a table file; ``None``: the analytic H100 roofline;
    ``"analytic:<preset>"``: the roofline with another preset (``h100``, ``a100``, ``cpu``)."""
    if isinstance(spec, CostModel):
        return spec
    if spec is None:
        return CostModel(None, "h100")
    if not isinstance(spec, (str, os.PathLike)):
        raise CPError(f"cost model must be a name, a path or None, got {spec!r}")
    spec = str(spec)
    if spec.startswith("analytic:"):
        cm = CostModel(None, spec.split(":", 1)[1])
        cm.spec = spec
        return cm
    path = table_path(spec)
    if not path.is_file():
        raise CPError(f"cost model {spec!r}: no shipped table of that name ({', '.join(SHIPPED)}) and no such file")
    cm = _load_cached(str(path.resolve()), path.stat().st_mtime)
    cm.spec = spec
    return cm
