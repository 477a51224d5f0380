"""Attention masks as per-token key ranges, built vectorised, and the registry of named masks.

A mask function maps the in-document position ``i`` of each query token and the length ``L`` of its
document (two int64 arrays of the same shape) to key ranges ``[n, R, 2]`` (``[start, end)``, document
local). Attention never crosses documents, so ranges are always inside ``[0, L)``. Ranges returned by
:func:`build_ranges` are *canonical*: sorted, disjoint, clipped to the document, and an empty range is
``(0, 0)``. Users add masks with :func:`register_mask`.

The six built-in masks follow DESIGN.md (per query token ``i`` of a document of length ``L``):

* ``causal``: ``[0, i+1)``; ``full``: ``[0, L)``
* ``sliding_window`` (window): ``[max(0, i-W+1), i+1)``
* ``lambda`` (sink, window): ``[0, min(S, i+1)) U [max(0, i-W+1), i+1)``
* ``shared_question`` (question_fraction, num_answers): question tokens causal; answer tokens see the
  question and a causal prefix of their own answer
* ``causal_blockwise`` (block, k_local): first and last block causal; middle blocks see the first block
  and a window of ``k_local`` blocks
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.errors import CPError

MaskFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class MaskDef:
    name: str
    fn: MaskFn
    defaults: Mapping[str, Any]
    validate: Callable[[Mapping[str, Any]], None] | None = None


_MASKS: dict[str, MaskDef] = {}


def register_mask(
    name: str,
    fn: MaskFn,
    defaults: Mapping[str, Any] | None = None,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Register ``fn(pos, length, **args) -> int ranges [n, R, 2]`` under ``name``.

    ``pos`` and ``length`` are int64 arrays of shape ``[n]``; the function must be vectorised. Ranges may
    overlap or be empty (``end <= start``); they are clipped to ``[0, length)`` and made canonical.
    """
    if not isinstance(name, str) or not name:
        raise CPError(f"mask name must be a non-empty string, got {name!r}")
    if name in _MASKS and not overwrite:
        raise CPError(f"mask {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise CPError(f"mask function for {name!r} must be callable")
    _MASKS[name] = MaskDef(name, fn, dict(defaults or {}), validate)


def available_masks() -> list[str]:
    return sorted(_MASKS)


def resolve_mask_args(name: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``args`` over the mask's defaults; unknown names and bad values raise :class:`CPError`."""
    if name not in _MASKS:
        raise CPError(f"unknown mask {name!r}; available: {', '.join(available_masks())} (or register_mask)")
    mdef = _MASKS[name]
    args = dict(args or {})
    unknown = sorted(set(args) - set(mdef.defaults))
    if unknown:
        raise CPError(
            f"mask {name!r} got unknown argument(s) {unknown}; it accepts {sorted(mdef.defaults) or 'none'}"
        )
    merged = {**mdef.defaults, **args}
    if mdef.validate is not None:
        mdef.validate(merged)
    return merged


def _canonical(ranges: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Clip to [0, L), sort by start, make disjoint; empty ranges become (0, 0) and sort last."""
    r = np.asarray(ranges, dtype=np.int64)
    if r.ndim != 3 or r.shape[-1] != 2:
        raise CPError(f"a mask function must return ranges of shape [n, R, 2], got {r.shape}")
    L = length.reshape(-1, 1)
    start = np.clip(r[..., 0], 0, L)
    end = np.clip(r[..., 1], 0, L)
    empty = end <= start
    # Sort by start with empty ranges last.
    key = np.where(empty, np.iinfo(np.int64).max, start)
    order = np.argsort(key, axis=1, kind="stable")
    start = np.take_along_axis(start, order, 1)
    end = np.take_along_axis(end, order, 1)
    empty = np.take_along_axis(empty, order, 1)
    end = np.where(empty, start, end)
    # Sweep: each range starts after the furthest end so far.
    prev_end = np.maximum.accumulate(end, axis=1)
    prev_end = np.concatenate([np.zeros_like(prev_end[:, :1]), prev_end[:, :-1]], axis=1)
    start = np.maximum(start, prev_end)
    end = np.maximum(end, start)
    empty = end <= start
    start = np.where(empty, 0, start)
    end = np.where(empty, 0, end)
    # Re-sort so empties go last again (a range may have been swallowed by an earlier one).
    key = np.where(empty, np.iinfo(np.int64).max, start)
    order = np.argsort(key, axis=1, kind="stable")
    return np.stack([np.take_along_axis(start, order, 1), np.take_along_axis(end, order, 1)], axis=-1)


def mask_ranges(name: str, args: Mapping[str, Any], pos: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Canonical ranges ``[n, R, 2]`` of mask ``name`` for query positions ``pos`` in documents of ``length``."""
    mdef = _MASKS[name]
    pos = np.asarray(pos, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    raw = mdef.fn(pos, length, **resolve_mask_args(name, args))
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[-1] == 2:
        raw = raw[:, None, :]
    if raw.shape[0] != pos.shape[0]:
        raise CPError(f"mask {name!r} returned {raw.shape[0]} rows for {pos.shape[0]} query tokens")
    return _canonical(raw, length)


def build_ranges(batch: PackedBatch, name: str, args: Mapping[str, Any] | None = None) -> np.ndarray:
    """Document-local key ranges ``[total_tokens, R, 2]`` of every token of a packed batch."""
    return mask_ranges(name, resolve_mask_args(name, args), batch.positions, batch.token_seqlens)


def range_lengths(ranges: np.ndarray) -> np.ndarray:
    """Number of visible keys per query row (ranges must be canonical)."""
    return (ranges[..., 1] - ranges[..., 0]).sum(axis=-1)


def count_pairs(batch: PackedBatch, name: str, args: Mapping[str, Any] | None = None) -> int:
    """Unmasked (query, key) pairs of a packed batch, per head: the attention work it really has."""
    return int(range_lengths(build_ranges(batch, name, args)).astype(np.int64).sum())


def clip_ranges(ranges: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
    """Intersect canonical ranges with ``[lo, hi)`` and shift them to start at ``lo``.

    ``lo``/``hi`` broadcast over rows. Empty results become ``(0, 0)``; the ranges stay canonical.
    """
    lo = np.asarray(lo, dtype=np.int64).reshape(-1, 1) if np.ndim(lo) else np.int64(lo)
    hi = np.asarray(hi, dtype=np.int64).reshape(-1, 1) if np.ndim(hi) else np.int64(hi)
    start = np.maximum(ranges[..., 0], lo)
    end = np.minimum(ranges[..., 1], hi)
    empty = end <= start
    start = np.where(empty, 0, start - lo)
    end = np.where(empty, 0, end - lo)
    out = np.stack([start, end], axis=-1)
    if out.shape[1] > 1 and empty.any():
        key = np.where(empty, np.iinfo(np.int64).max, start)
        order = np.argsort(key, axis=1, kind="stable")
        out = np.take_along_axis(out, order[..., None], 1)
    return out


# ----------------------------------------------------------------------------------------- built-ins


def _causal(pos, length):
    return np.stack([np.zeros_like(pos), pos + 1], axis=-1)[:, None, :]


def _full(pos, length):
    return np.stack([np.zeros_like(pos), length], axis=-1)[:, None, :]


def _sliding_window(pos, length, window):
    return np.stack([np.maximum(0, pos - window + 1), pos + 1], axis=-1)[:, None, :]


def _lambda(pos, length, sink, window):
    sink_r = np.stack([np.zeros_like(pos), np.minimum(sink, pos + 1)], axis=-1)
    win_r = np.stack([np.maximum(0, pos - window + 1), pos + 1], axis=-1)
    return np.stack([sink_r, win_r], axis=1)


def _shared_question(pos, length, question_fraction, num_answers):
    q = np.floor(question_fraction * length).astype(np.int64)
    n = num_answers
    p = (length - q) // n
    in_question = pos < q
    safe_p = np.maximum(p, 1)
    answer_start = np.where(
        (p > 0) & (pos < q + p * (n - 1)),
        q + ((pos - q) // safe_p) * p,
        q + (n - 1) * p,
    )
    first = np.stack([np.zeros_like(pos), np.where(in_question, pos + 1, q)], axis=-1)
    second = np.stack([np.where(in_question, 0, answer_start), np.where(in_question, 0, pos + 1)], axis=-1)
    return np.stack([first, second], axis=1)


def _causal_blockwise(pos, length, block, k_local):
    b = pos // block
    nb = -(-length // block)
    edge = (b == 0) | (b == nb - 1)
    first = np.stack([np.zeros_like(pos), np.where(edge, pos + 1, block)], axis=-1)
    second = np.stack(
        [np.where(edge, 0, np.maximum(block, pos - k_local * block)), np.where(edge, 0, pos + 1)], axis=-1
    )
    return np.stack([first, second], axis=1)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise CPError(f"mask argument {name} must be a positive int, got {value!r}")


def _check_window(a):
    _positive_int("window", a["window"])


def _check_lambda(a):
    _positive_int("window", a["window"])
    if not isinstance(a["sink"], (int, np.integer)) or a["sink"] < 0:
        raise CPError(f"mask argument sink must be a non-negative int, got {a['sink']!r}")


def _check_shared_question(a):
    f = a["question_fraction"]
    if not isinstance(f, (int, float)) or not (0.0 <= f <= 1.0):
        raise CPError(f"mask argument question_fraction must be in [0, 1], got {f!r}")
    _positive_int("num_answers", a["num_answers"])


def _check_blockwise(a):
    _positive_int("block", a["block"])
    _positive_int("k_local", a["k_local"])


register_mask("causal", _causal)
register_mask("full", _full)
register_mask("sliding_window", _sliding_window, {"window": 4096}, _check_window)
register_mask("lambda", _lambda, {"sink": 64, "window": 4096}, _check_lambda)
register_mask(
    "shared_question", _shared_question, {"question_fraction": 0.2, "num_answers": 4}, _check_shared_question
)
register_mask("causal_blockwise", _causal_blockwise, {"block": 256, "k_local": 2}, _check_blockwise)


def parse_key_values(items, what: str = "arguments") -> dict[str, Any]:
    """``["window=512", "question_fraction=0.25"]`` -> ``{"window": 512, "question_fraction": 0.25}``
    (ints, then floats, then true/false, else the string; dashes in keys become underscores); raises :class:`CPError` naming
    ``what`` for an item without ``=``. Mask arguments and tools' ``--dcp-option`` use it."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise CPError(f"{what} take KEY=VALUE, got {item!r}")
        key, value = (x.strip() for x in item.split("=", 1))
        key = key.replace("-", "_")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def parse_mask_args(items) -> dict[str, Any]:
    """Mask arguments from ``KEY=VALUE`` strings (:func:`parse_key_values`)."""
    return parse_key_values(items, "mask arguments")


def mask_arg_names(name: str) -> list[str]:
    """The argument names a registered mask accepts (for CLI help)."""
    if name not in _MASKS:
        raise CPError(f"unknown mask {name!r}")
    return sorted(_MASKS[name].defaults)
