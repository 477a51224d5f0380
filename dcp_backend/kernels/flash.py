"""FlashAttention (flash-attn's varlen API) for full and causal segments, FlexAttention for the rest.

The published baselines and a user's own runs use flash-attn's varlen kernels (or TE's cuDNN kernels):
about 590 TFLOP/s dense causal forward on an H100 against FlexAttention's 370-440 (DESIGN.md's
measurements). Most segments of every backend's works are one of the two shapes flash-attn computes
natively: *full* (every row sees every key of its segment) or *causal* (row ``i`` of ``q`` rows sees the
first ``k - q + i + 1`` of ``k`` keys: flash-attn's causal mask, aligned to the bottom-right corner since
flash-attn 2.1; square segments are the usual case). This kernel routes them there and everything else
(sliding windows, sinks, multi-range rows) to a general kernel (FlexAttention by default), so a DCP stage,
a ring step or a LoongTrain step uses flash-attn exactly where flash-attn applies, without knowing it.

:func:`split_work` (pure numpy, CPU-testable) groups a work's live segments into at most two flash parts
(full, causal), each a varlen batch with its own ``cu_seqlens`` and the work rows it gathers, and one
general sub-work (the other segments with their ranges). Every query row belongs to exactly one segment,
so the parts' results are disjoint rows: forward scatters (out, lse) into place, backward scatters dq and
adds dk/dv (no log-sum-exp merge is needed). Rows of segments without keys get out 0 and lse -inf.

The flash functions are injected through the constructor (``flash_forward``, ``flash_backward``); the
defaults call flash-attn: ``flash_attn_varlen_func(..., return_attn_probs=True)`` (whose second output
is the log-sum-exp, ``[heads, tokens]``) and flash-attn's varlen backward with the *final* (merged) out
and lse, as the block-kernel contract requires (the same call ring-flash-attn makes; its keyword
arguments are matched to the installed flash-attn's signature). flash-attn takes fp16/bf16 on CUDA only;
works in other dtypes go whole to the general kernel. **The flash-attn path has not run here** (no GPU,
and flash-attn's source distribution needs CUDA to build); its CPU-tested core is the splitting and the
recombination, exercised with stand-in flash functions. ``tools/gpu_verify.py`` checks the real one.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from dcp_backend.batch import concat_aranges
from dcp_backend.errors import CPError
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels.base import BlockKernel, acc_dtype
from dcp_backend.kernels.work import KIND_CAUSAL, KIND_CAUSAL_BR, KIND_FULL, AttnWork

FLASH_DTYPES = (torch.float16, torch.bfloat16)
_MISSING = ("kernel 'flash' needs flash-attn (pip install flash-attn>=2.6.3, CUDA only: the `gpu` extra or the "
            "Dockerfile); it is not installed here. Use kernel='flex' (or 'auto', which picks flash only where "
            "flash-attn is installed)")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# ----------------------------------------------------------------------------------------- the split

@dataclass(eq=False)
class FlashPart:
    """Segments of one flash-attn call: a varlen batch over rows ``q_rows`` / ``k_rows`` of the work."""

    causal: bool
    segments: np.ndarray  # segment ids of the work, in order
    q_rows: np.ndarray
    k_rows: np.ndarray
    cu_q: np.ndarray  # int32, flash-attn's cu_seqlens_q of the gathered rows
    cu_k: np.ndarray
    max_q: int
    max_k: int
    whole: bool  # the part is the whole work (no gather or scatter needed)


@dataclass(eq=False)
class FlashSplit:
    flash: list  # [FlashPart] (full first, then causal)
    general: AttnWork | None  # the remaining live segments, rows compacted
    general_q_rows: np.ndarray
    general_k_rows: np.ndarray
    keyless_rows: np.ndarray  # rows of segments without keys (out 0, lse -inf)


def _rows(cu: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Rows of segments ``segs`` (cumulative offsets ``cu``), in order."""
    return concat_aranges(cu[segs], cu[segs + 1] - cu[segs])


def split_work(work: AttnWork) -> FlashSplit:
    """Route each live segment: full -> flash (causal=False), causal -> flash (causal=True), else general."""
    kinds = work.kinds()
    ql, kl = work.q_lens, work.k_lens
    live = (ql > 0) & (kl > 0)
    parts = []
    for causal, sel in ((False, live & (kinds == KIND_FULL)),
                        (True, live & ((kinds == KIND_CAUSAL) | (kinds == KIND_CAUSAL_BR)))):
        segs = np.nonzero(sel)[0]
        if not segs.size:
            continue
        q_rows, k_rows = _rows(work.cu_q, segs), _rows(work.cu_k, segs)
        cu_q = np.concatenate([[0], np.cumsum(ql[segs])]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(kl[segs])]).astype(np.int32)
        whole = segs.size == work.num_segments and q_rows.size == work.total_q and k_rows.size == work.total_k
        parts.append(FlashPart(causal, segs, q_rows, k_rows, cu_q, cu_k, int(ql[segs].max()), int(kl[segs].max()),
                               whole))
    routed = np.zeros(work.num_segments, bool)
    for p in parts:
        routed[p.segments] = True
    gsegs = np.nonzero(live & ~routed)[0]
    general, gq, gk = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
    if gsegs.size:
        gq, gk = _rows(work.cu_q, gsegs), _rows(work.cu_k, gsegs)
        general = AttnWork(np.concatenate([[0], np.cumsum(ql[gsegs])]), np.concatenate([[0], np.cumsum(kl[gsegs])]),
                           work.ranges[gq])
    keyless = _rows(work.cu_q, np.nonzero((ql > 0) & (kl == 0))[0])
    return FlashSplit(parts, general, gq, gk, keyless)


def split_works(work: AttnWork) -> tuple[list, AttnWork | None]:
    """``([(causal, AttnWork)] of the flash parts, the general sub-work)``: the calls this kernel makes for
    ``work`` (the simulator's cost model prices each). Cached with the kernel's state."""
    st = flash_state(work)
    if st.part_works is None:
        st.part_works = [(p.causal, AttnWork(p.cu_q, p.cu_k, work.ranges[p.q_rows])) for p in st.split.flash]
    return st.part_works, st.split.general


@dataclass(eq=False)
class FlashState:
    """The kernel's entry of ``AttnWork.kernel_state``: the split and its row tables (one upload each)."""

    split: FlashSplit
    rows: HostTables  # int64: per part q rows, k rows; general q rows, k rows; keyless rows
    cu: HostTables  # int32: per part cu_q, cu_k
    part_works: list | None = None  # the flash parts as works (for the cost model), built on demand


def flash_state(work: AttnWork) -> FlashState:
    state = work.kernel_state.get("flash")
    if state is None:
        split = split_work(work)
        rows, cu = HostTables(np.int64), HostTables(np.int32)
        for p in split.flash:
            rows.add(p.q_rows)
            rows.add(p.k_rows)
            cu.add(p.cu_q)
            cu.add(p.cu_k)
        rows.add(split.general_q_rows)
        rows.add(split.general_k_rows)
        rows.add(split.keyless_rows)
        rows.host, cu.host  # pack now (in the planning worker)
        state = work.kernel_state["flash"] = FlashState(split, rows, cu)
    return state


# ----------------------------------------------------------------------------------------- flash-attn

def flash_attn_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """flash-attn varlen forward -> (out [T, H, D], lse [T, H] fp32). GPU only; not run here."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
                                         causal=causal, return_attn_probs=True)
    if lse.dim() != 2 or lse.shape[1] != q.shape[0]:
        raise CPError(f"kernel 'flash': flash-attn returned a log-sum-exp of shape {tuple(lse.shape)}; this kernel "
                      "needs the varlen layout [heads, tokens] (flash-attn >= 2.4)")
    return out, lse.transpose(0, 1).contiguous()


def _varlen_backward_fn():
    from flash_attn import flash_attn_interface as fa

    fn = fa._flash_attn_varlen_backward
    for f in (fn, getattr(fn, "_init_fn", None), getattr(fn, "__wrapped__", None)):
        if f is None:
            continue
        try:
            return fn, inspect.signature(f).parameters
        except (TypeError, ValueError):
            continue
    raise CPError("kernel 'flash': cannot read the signature of flash-attn's varlen backward; use kernel='flex'")


def flash_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """flash-attn varlen backward with the given (final) out and lse -> (dq, dk, dv) in q's dtype. GPU only."""
    fn, params = _varlen_backward_fn()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse.transpose(0, 1).contiguous(), dq=dq, dk=dk,
                dv=dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0,
                softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
                softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
    missing = [n for n, p in params.items() if n not in args and p.default is inspect.Parameter.empty]
    if missing:
        raise CPError(f"kernel 'flash': flash-attn's varlen backward wants {missing}, which this kernel does not "
                      "know; use kernel='flex' or a flash-attn 2.6-2.8")
    fn(**{n: a for n, a in args.items() if n in params})
    return dq, dk, dv


# ----------------------------------------------------------------------------------------- the kernel

class FlashKernel(BlockKernel):
    """flash-attn for full and causal segments, ``general`` (FlexAttention) for the rest; see the module
    docstring. ``flash_forward`` / ``flash_backward`` / ``dtypes`` replace flash-attn (tests inject stand-ins).
    Only the general segments' backward recomputes a forward (flex); :attr:`backward_recompute` is 0."""

    name = "flash"

    def __init__(self, general: BlockKernel | None = None, flash_forward=None, flash_backward=None,
                 dtypes=FLASH_DTYPES, device_types=("cuda",)):
        if flash_forward is None:
            if not flash_attn_installed():
                raise CPError(_MISSING)
            try:
                importlib.import_module("flash_attn")  # a broken build fails here, not in the first call
            except Exception as exc:  # noqa: BLE001 - any import failure (missing CUDA symbols, ...)
                raise CPError(f"kernel 'flash': flash-attn is installed but does not import ({exc}); use "
                              "kernel='flex'") from exc
        if general is None:
            from dcp_backend.kernels.flex import FlexKernel

            general = FlexKernel()
        self.general = general
        self._fwd = flash_forward or flash_attn_forward
        self._bwd = flash_backward or flash_attn_backward
        self.dtypes = tuple(dtypes)
        self.device_types = tuple(device_types)

    def supports(self, device, dtype):
        return self.general.supports(device, dtype)

    def _flash_ok(self, x: torch.Tensor) -> bool:
        return x.dtype in self.dtypes and x.device.type in self.device_types

    def prepare(self, work: AttnWork):
        st = flash_state(work)
        if st.split.general is not None:
            self.general.prepare(st.split.general)
        return st

    @staticmethod
    def _views(st: FlashState, device):
        rows, cu = st.rows.on(device), st.cu.on(device)
        parts = [(p, rows[2 * i], rows[2 * i + 1], cu[2 * i], cu[2 * i + 1]) for i, p in enumerate(st.split.flash)]
        n = 2 * len(st.split.flash)
        return parts, rows[n], rows[n + 1], rows[n + 2]

    def forward(self, q, k, v, work: AttnWork, scale: float):
        if not self._flash_ok(q):
            return self.general.forward(q, k, v, work, scale)
        st = self.prepare(work)
        parts, gq, gk, keyless = self._views(st, q.device)
        acc = acc_dtype(q.dtype)
        if len(parts) == 1 and parts[0][0].whole:
            p, _, _, cu_q, cu_k = parts[0]
            out, lse = self._fwd(q, k, v, cu_q, cu_k, p.max_q, p.max_k, scale, p.causal)
            return out, lse.to(acc)
        tq, h, d = q.shape
        out = torch.zeros(tq, h, d, dtype=q.dtype, device=q.device)
        lse = torch.full((tq, h), float("-inf"), dtype=acc, device=q.device)
        for p, qr, kr, cu_q, cu_k in parts:
            o, l = self._fwd(q.index_select(0, qr), k.index_select(0, kr), v.index_select(0, kr), cu_q, cu_k,
                             p.max_q, p.max_k, scale, p.causal)
            out.index_copy_(0, qr, o.to(q.dtype))
            lse.index_copy_(0, qr, l.to(acc))
        if st.split.general is not None:
            o, l = self.general.forward(q.index_select(0, gq), k.index_select(0, gk), v.index_select(0, gk),
                                        st.split.general, scale)
            out.index_copy_(0, gq, o.to(q.dtype))
            lse.index_copy_(0, gq, l.to(acc))
        return out, lse  # keyless rows stay 0 / -inf

    def backward(self, dout, q, k, v, out, lse, work: AttnWork, scale: float):
        if not self._flash_ok(q):
            return self.general.backward(dout, q, k, v, out, lse, work, scale)
        st = self.prepare(work)
        parts, gq, gk, _ = self._views(st, q.device)
        acc = acc_dtype(q.dtype)
        if len(parts) == 1 and parts[0][0].whole:
            p, _, _, cu_q, cu_k = parts[0]
            dq, dk, dv = self._bwd(dout, q, k, v, out, lse.float(), cu_q, cu_k, p.max_q, p.max_k, scale, p.causal)
            return dq.to(q.dtype), dk.to(acc), dv.to(acc)
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for p, qr, kr, cu_q, cu_k in parts:
            g = self._bwd(dout.index_select(0, qr), q.index_select(0, qr), k.index_select(0, kr),
                          v.index_select(0, kr), out.index_select(0, qr), lse.index_select(0, qr).float(), cu_q, cu_k,
                          p.max_q, p.max_k, scale, p.causal)
            dq.index_copy_(0, qr, g[0].to(q.dtype))
            dk.index_add_(0, kr, g[1].to(acc))
            dv.index_add_(0, kr, g[2].to(acc))
        if st.split.general is not None:
            g = self.general.backward(dout.index_select(0, gq), q.index_select(0, gq), k.index_select(0, gk),
                                      v.index_select(0, gk), out.index_select(0, gq), lse.index_select(0, gq),
                                      st.split.general, scale)
            dq.index_copy_(0, gq, g[0].to(q.dtype))
            dk.index_add_(0, gk, g[1].to(acc))
            dv.index_add_(0, gk, g[2].to(acc))
        return dq, dk, dv
