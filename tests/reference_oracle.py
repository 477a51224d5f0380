"""An exactness reference that shares no code with the library it checks.

``dcp_backend.dense_reference`` builds its visibility from ``dcp_backend.masks.build_ranges`` and takes the
library's ``spec.scale``, so a bug in either would move the reference together with the code under
test and go unseen. This module rebuilds both from DESIGN.md alone:

* visibility per query token from the mask table, written out token by token (:func:`visible_keys`,
  with the table's default mask arguments in :data:`MASK_DEFAULTS`);
* the softmax scale as ``1 / math.sqrt(head_dim)`` unless an explicit scale is given;
* plain float64 softmax attention, differentiated by autograd.

It imports nothing from ``dcp_backend``. It is O(tokens^2) in memory and loops over tokens in Python:
for test sizes only (hundreds of tokens).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# DESIGN.md, "Masks": the mask_args defaults of every built-in mask.
MASK_DEFAULTS = {
    "causal": {},
    "full": {},
    "sliding_window": {"window": 4096},
    "lambda": {"sink": 64, "window": 4096},
    "shared_question": {"question_fraction": 0.2, "num_answers": 4},
    "causal_blockwise": {"block": 256, "k_local": 2},
}


def mask_args_with_defaults(name: str, args) -> dict:
    if name not in MASK_DEFAULTS:
        raise KeyError(f"the oracle knows only DESIGN.md's masks, not {name!r}")
    unknown = set(args or {}) - set(MASK_DEFAULTS[name])
    if unknown:
        raise KeyError(f"mask {name!r} takes no argument(s) {sorted(unknown)}")
    return {**MASK_DEFAULTS[name], **(args or {})}


def visible_keys(name: str, args: dict, i: int, L: int) -> set[int]:
    """The keys query ``i`` (0-based in its document of length ``L``) sees, literally from DESIGN.md's
    table (``args`` complete, see :func:`mask_args_with_defaults`)."""
    if name == "causal":
        return set(range(0, i + 1))
    if name == "full":
        return set(range(0, L))
    if name == "sliding_window":
        return set(range(max(0, i - args["window"] + 1), i + 1))
    if name == "lambda":
        S, W = args["sink"], args["window"]
        return set(range(0, min(S, i + 1))) | set(range(max(0, i - W + 1), i + 1))
    if name == "shared_question":
        f, n = args["question_fraction"], args["num_answers"]
        Q = math.floor(f * L)
        P = (L - Q) // n
        if i < Q:
            return set(range(0, i + 1))
        if P > 0 and i < Q + P * (n - 1):
            start = Q + ((i - Q) // P) * P
        else:
            start = Q + (n - 1) * P
        return set(range(0, Q)) | set(range(start, i + 1))
    if name == "causal_blockwise":
        B, K = args["block"], args["k_local"]
        b, nb = i // B, -(-L // B)
        if b == 0 or b == nb - 1:
            return set(range(0, i + 1))
        return set(range(0, B)) | set(range(max(B, i - K * B), i + 1))
    raise KeyError(name)


def visibility(seqlens, mask: str, mask_args=None) -> np.ndarray:
    """Boolean ``[T, T]`` over the packed batch: query row t sees key column j. Documents never see each
    other."""
    args = mask_args_with_defaults(mask, mask_args)
    lens = [int(x) for x in seqlens]
    t = sum(lens)
    vis = np.zeros((t, t), dtype=bool)
    start = 0
    for L in lens:
        for i in range(L):
            keys = visible_keys(mask, args, i, L)
            if keys:
                vis[start + i, start + np.fromiter(keys, dtype=np.int64, count=len(keys))] = True
        start += L
    return vis


def softmax_scale(head_dim: int, explicit: float | None = None) -> float:
    """DESIGN.md: ``softmax_scale=None`` means ``1/sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if explicit is None else float(explicit)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens, mask: str, mask_args=None,
              scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale, masked) v`` over a packed batch; q [T,H,D], k/v [T,Hkv,D] (GQA: query head
    h reads KV head h // (H/Hkv)). A row with no visible key gives 0."""
    t, h, d = q.shape
    hkv = k.shape[1]
    s = softmax_scale(d, scale)
    vis = torch.from_numpy(visibility(seqlens, mask, mask_args))
    kv_head = torch.arange(h) // (h // hkv)
    kk, vv = k[:, kv_head], v[:, kv_head]  # [T, H, D]
    scores = torch.einsum("thd,shd->hts", q, kk) * s
    scores = scores.masked_fill(~vis, float("-inf"))
    empty = ~vis.any(dim=1)  # [T]
    scores = scores.masked_fill(empty[None, :, None], 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(empty[None, :, None], 0.0)
    return torch.einsum("hts,shd->thd", p, vv)
