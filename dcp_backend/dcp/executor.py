"""The DCP executor: runs one device's compiled forward and backward programs over torch.distributed.

Preparation is split: :class:`PreparedProgram` (host, once per plan, in the planning worker) lays out
the messages (one op per block of a store group: k/v, q/o/do, dk/dv and an fp32 output with its lse are
each one tensor, and a block is a run of its rows, so inputs go straight from and into the stores; only
partial results converted to the model dtype pass through a buffer) and packs every index array of the
program into one buffer; :class:`ProgramRunner` (once
per plan, device and dtype) uploads that buffer once and allocates the stores, which every layer of the
iteration reuses (only their result rows are reset per call). Each stage's inputs are launched (``batch_isend_irecv``) before
the previous stage computes; attention runs as one block-kernel call per stage; partial results are
merged (log-sum-exp) or summed into their owners' rows.

On CUDA, NCCL runs transfers on its own streams; PyTorch orders them after the work already queued on
the current stream at launch and makes the current stream wait at ``wait()``, so stage s's attention
overlaps stage s+1's transfers with correct ordering; rows sent or received in place are not written
between a launch and its wait (the plan verifier checks it). On CPU (gloo) transfers proceed in gloo's
threads while the kernel computes.
"""
from __future__ import annotations

import torch

from dcp_backend.comm import CommCounters, Exchange
from dcp_backend.contract import Executor
from dcp_backend.dcp.instructions import ACC, MODEL, store_groups
from dcp_backend.dcp.plan import DCPPlan
from dcp_backend.dcp.prepared import Message, PreparedProgram
from dcp_backend.kernels import BlockKernel, acc_dtype, merge_into_

TAGS = {MODEL: 31, ACC: 32}


class ProgramRunner:
    """Executes one prepared program (one pass of one device) for a given device and dtype: the stores are
    allocated and the index tables uploaded once, here; every layer then only runs the steps."""

    def __init__(self, prepared: PreparedProgram, device: torch.device, dtype: torch.dtype):
        program = prepared.program
        self.program = program
        self.device = device
        self.dtype = dtype
        self.acc = acc_dtype(dtype)
        self.head_dim = head_dim = prepared.head_dim
        self.stores = {}
        grouped = {}
        for gname, (layout, members) in store_groups(program.stores).items():
            spec = program.stores[members[0]]
            dt = self._dtype_of(spec.dtype)
            if layout == "stack":  # [rows, members, heads, head_dim]; member i is [:, i]
                t = torch.empty((spec.rows, len(members), spec.heads, head_dim), dtype=dt, device=device)
                for i, m in enumerate(members):
                    grouped[m] = t[:, i]
            else:  # an output with its lse as one more column: [rows, heads, head_dim + 1]
                t = torch.empty((spec.rows, spec.heads, head_dim + 1), dtype=dt, device=device)
                grouped[members[0]], grouped[members[1]] = t[..., :head_dim], t[..., head_dim]
            self.stores[gname] = t
        for name, spec in program.stores.items():
            if name in grouped:
                self.stores[name] = grouped[name]
                continue
            shape = (spec.rows, spec.heads, head_dim) if spec.with_dim else (spec.rows, spec.heads)
            self.stores[name] = torch.empty(shape, dtype=self._dtype_of(spec.dtype), device=device)
        views = prepared.tables.on(device)

        def msg(m: Message) -> Message:
            return Message(m.peer, [(c, n, a, r if a is not None else views[r], k) for c, n, a, r, k in m.segments])

        steps = []
        for step in prepared.steps:
            kind = step[0]
            if kind == "comm":
                steps.append(("comm", step[1], [msg(m) for m in step[2]], [msg(m) for m in step[3]]))
            elif kind == "attn":
                fresh = step[5] if not step[5] else tuple(views[x] for x in step[5])
                steps.append(("attn", step[1], views[step[2]], views[step[3]], step[4], fresh, views[step[6]],
                              views[step[7]]))
            elif kind == "fill":
                steps.append(("fill", step[1], views[step[2]]))
            elif kind == "reduce":
                steps.append(("reduce", step[1], step[2], step[3], views[step[4]], views[step[5]]))
            else:
                steps.append(step)
        self.steps = steps

    # ------------------------------------------------------------------ running
    def _dtype_of(self, cls: str) -> torch.dtype:
        return self.dtype if cls == MODEL else self.acc

    def _wire(self, cls: str, name: str, start, rows, numel: int) -> torch.Tensor:
        """The tensor a segment travels in: its rows of the store itself (``start`` given, in place), else a
        new buffer of ``numel`` elements of its wire class."""
        if start is not None:
            return self.stores[name][start:start + rows]
        return torch.empty(numel, dtype=self._dtype_of(cls), device=self.device)

    def run(self, kernel: BlockKernel, scale: float, group, counters: CommCounters | None):
        pending: dict[str, tuple] = {}
        S = self.stores
        for step in self.steps:
            kind = step[0]
            if kind == "comm":
                _, key, sends, recvs = step
                x = Exchange(group, f"DCP transfer {key}", counters=counters)
                for m in sends:
                    for cls, name, start, rows, numel in m.segments:
                        t = self._wire(cls, name, start, rows, numel)
                        if start is None:  # gathered into its buffer (a partial held in fp32: converted)
                            st = S[name]
                            view = t.view((rows.numel(),) + tuple(st.shape[1:]))
                            if st.dtype == t.dtype:
                                torch.index_select(st, 0, rows, out=view)
                            else:
                                view.copy_(st.index_select(0, rows))
                        x.send(t, m.peer, TAGS[cls])
                bufs = []
                for m in recvs:
                    for cls, name, start, rows, numel in m.segments:
                        t = self._wire(cls, name, start, rows, numel)
                        x.recv(t, m.peer, TAGS[cls])
                        if start is None:  # copied into the store after the wait
                            bufs.append((t, name, rows))
                pending[key] = (x.launch(), bufs)
            elif kind == "wait":
                x, bufs = pending.pop(step[1])
                x.wait()
                for buf, name, rows in bufs:
                    st = S[name]
                    st.index_copy_(0, rows, buf.view((rows.numel(),) + tuple(st.shape[1:])).to(st.dtype))
            elif kind == "attn":
                _, backward, qr, kr, work, fresh, qo, ko = step  # input rows, then result rows
                if not backward:
                    o, l = kernel.forward(S["q"].index_select(0, qr), S["k"].index_select(0, kr),
                                          S["v"].index_select(0, kr), work, scale)
                    if fresh is None:  # every row merged
                        merge_into_(S["o"], S["lse"], o, l, rows=qo)
                    elif not fresh:  # every row written
                        S["o"].index_copy_(0, qo, o.to(S["o"].dtype))
                        S["lse"].index_copy_(0, qo, l.to(S["lse"].dtype))
                    else:
                        fp, fr, mp, mr = fresh
                        S["o"].index_copy_(0, fr, o.index_select(0, fp).to(S["o"].dtype))
                        S["lse"].index_copy_(0, fr, l.index_select(0, fp).to(S["lse"].dtype))
                        merge_into_(S["o"], S["lse"], o.index_select(0, mp), l.index_select(0, mp), rows=mr)
                else:
                    dq, dk, dv = kernel.backward(
                        S["do"].index_select(0, qr), S["q"].index_select(0, qr), S["k"].index_select(0, kr),
                        S["v"].index_select(0, kr), S["o"].index_select(0, qr), S["lse"].index_select(0, qr),
                        work, scale,
                    )
                    S["dq"].index_add_(0, qo, dq.to(self.acc))
                    S["dk"].index_add_(0, ko, dk.to(self.acc))
                    S["dv"].index_add_(0, ko, dv.to(self.acc))
            elif kind == "fill":
                _, names, rows = step
                for n in names:
                    S[n].index_fill_(0, rows, float("-inf") if n == "lse" else 0.0)
            elif kind == "reduce":
                _, op, src, dst, sr, dr = step
                if op == "merge":
                    merge_into_(S[dst[0]], S[dst[1]], S[src[0]].index_select(0, sr), S[src[1]].index_select(0, sr),
                                rows=dr)
                else:
                    for s_name, d_name in zip(src, dst):
                        S[d_name].index_add_(0, dr, S[s_name].index_select(0, sr).to(S[d_name].dtype))
        if pending:  # pragma: no cover - compiled programs always wait what they launch
            raise RuntimeError(f"DCP program ended with unfinished transfers {sorted(pending)}")

    # ------------------------------------------------------------------ passes
    def forward(self, q, k, v, kernel, scale, group, counters):
        S = self.stores
        for name, t in (("q", q), ("k", k), ("v", v)):
            _own_in(S[name], t)
        S["o"].zero_()
        S["lse"].fill_(float("-inf"))
        self.run(kernel, scale, group, counters)
        # copies: the stores are reused by the next layer, autograd keeps these
        return _own_out(S["o"], q.shape, q.dtype), _own_out(S["lse"], q.shape[:2], S["lse"].dtype)

    def backward(self, dout, q, k, v, out, lse, kernel, scale, group, counters):
        S = self.stores
        for name, t in (("q", q), ("o", out), ("do", dout), ("lse", lse), ("k", k), ("v", v)):
            _own_in(S[name], t)
        for name in ("dq", "dk", "dv"):
            S[name].zero_()
        self.run(kernel, scale, group, counters)
        return _own_out(S["dq"], q.shape, q.dtype), _own_out(S["dk"], k.shape, k.dtype), _own_out(S["dv"], v.shape, v.dtype)


def _own_in(store: torch.Tensor, t: torch.Tensor) -> None:
    """Copy a local tensor [tokens, heads(, head_dim)] into a store's own rows, which hold the tokens head block
    by head block (row ``k * tokens + t``, :mod:`dcp_backend.dcp.instructions`)."""
    n, per = t.shape[0], t.shape[1] // store.shape[1]
    store[:n * per].unflatten(0, (per, n)).copy_(t.unflatten(1, (per, store.shape[1])).transpose(0, 1))


def _own_out(store: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor [tokens, heads(, head_dim)] of ``dtype`` from a store's own rows (see :func:`_own_in`)."""
    n, per = shape[0], shape[1] // store.shape[1]
    out = torch.empty(tuple(shape), dtype=dtype, device=store.device)
    out.unflatten(1, (per, store.shape[1])).copy_(store[:n * per].unflatten(0, (per, n)).transpose(0, 1))
    return out


class DCPAttentionFn(torch.autograd.Function):
    """Differentiable DCP attention of one rank: forward and backward programs of a plan."""

    @staticmethod
    def forward(ctx, q, k, v, fwd_runner, bwd_runner, kernel, scale, group, counters):
        with torch.no_grad():
            out, lse = fwd_runner.forward(q, k, v, kernel, scale, group, counters)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rest = (bwd_runner, kernel, scale, group, counters)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        bwd_runner, kernel, scale, group, counters = ctx.rest
        with torch.no_grad():
            dq, dk, dv = bwd_runner.backward(dout.contiguous(), q, k, v, out, lse, kernel, scale, group, counters)
        return dq, dk, dv, None, None, None, None, None, None


class DCPExecutor(Executor):
    """Runs a DCP plan's programs for this rank: runners prepared once per plan, device and dtype."""

    name = "dcp"
    PlanType = DCPPlan

    def runners(self, plan: DCPPlan, rank: int, device: torch.device, dtype: torch.dtype):
        """Forward/backward runners of ``rank`` (kept in ``plan.runners``: once per plan, all layers)."""
        key = (rank, str(device), dtype)
        if key not in plan.runners:
            fwd, bwd = plan.prepared_programs(rank)
            plan.runners[key] = (ProgramRunner(fwd, device, dtype), ProgramRunner(bwd, device, dtype))
        return plan.runners[key]

    def _attention(self, q, k, v, plan: DCPPlan):
        fwd, bwd = self.runners(plan, self.rank, q.device, q.dtype)
        return DCPAttentionFn.apply(q, k, v, fwd, bwd, self.kernel(q.device), plan.spec.scale, self.group,
                                    self.counters)
