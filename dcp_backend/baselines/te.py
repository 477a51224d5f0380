"""`te`: Transformer Engine's context-parallel attention (``DotProductAttention`` with ``cp_group``).

Layout, padding and the index mapping live in :mod:`.te_layout` (pure numpy). This module owns the plan
(layout + statistics) and the GPU path:

* ``cp_comm_type="p2p"``: THD format, ``attn_mask_type="padding_causal"`` (causal) or ``"padding"``
  (full), global ``cu_seqlens`` and ``cu_seqlens_padded`` and ``pad_between_seqs=True`` passed explicitly
  (TE #3331: its auto-detection looks only at ``cu_seqlens_padded[:-1]`` and silently takes a wrong fast
  path when the padding is at the tail).
* ``cp_comm_type="a2a+p2p"``: hierarchical CP, ``cp_group=[a2a_group, p2p_group]`` (head all-to-all of
  degree ``head_parallel`` inside groups of consecutive ranks, K/V ring between them). TE does not take
  THD there, so documents are grouped by padded length and each group runs as one BSHD batch with a
  ``causal`` mask (tail padding is never visible to a real query under causal masking). Each group is a
  full CP pass per layer, so the plan raises lengths to at most ``max_length_groups`` values (default 4)
  with the fewest extra causal pairs; ``stats().extra`` reports the passes and the padding.

Masks: TE's CP takes causal and full (no mask) under p2p and causal only under a2a+p2p here; sliding
windows only with its a2a/all_gather variants. Any other mask raises :class:`CPError` naming a backend
that takes it. TE runs only on CUDA with bf16/fp16; where it is not installed ``get_backend("te")``
raises :class:`BackendUnavailableError`. Plans and statistics need no TE (``get_planner("te")``).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import torch

from dcp_backend import comm
from dcp_backend.baselines.te_layout import TELayout
from dcp_backend.batch import PackedBatch
from dcp_backend.contract import BackendOptions, CPBackend, Executor, Plan, Planner, PlanStats, option, positive_int
from dcp_backend.dtypes import acc_element_size
from dcp_backend.errors import BackendUnavailableError, CPError
from dcp_backend.host_tables import HostTables
from dcp_backend.masks import build_ranges, range_lengths
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

COMM_TYPES = ("p2p", "a2a+p2p")
# Masks TE's context parallelism takes, per comm type, and the TE mask type used for each.
TE_MASKS = {"p2p": {"causal": "padding_causal", "full": "padding"}, "a2a+p2p": {"causal": "causal"}}


@dataclass(frozen=True)
class TEOptions(BackendOptions):
    cp_comm_type: str = option("p2p", "Transformer Engine CP communication: p2p (K/V ring, THD) or a2a+p2p (head "
                                      "all-to-all inside groups of head_parallel consecutive ranks, K/V ring between)")
    head_parallel: int | None = option(None, "a2a degree for a2a+p2p (default gcd(CP size, KV heads))")
    max_length_groups: int = option(4, "a2a+p2p only: most distinct padded lengths per batch (each is a full CP pass "
                                       "per layer); documents are raised to the chosen lengths with the fewest extra "
                                       "causal pairs")

    def validate(self) -> None:
        super().validate()
        if self.cp_comm_type not in COMM_TYPES:
            raise CPError(
                f"te: cp_comm_type must be one of {list(COMM_TYPES)}, got {self.cp_comm_type!r} "
                "(TE's 'a2a' and 'all_gather' variants are not offered by this backend)"
            )
        positive_int("te", "head_parallel", self.head_parallel, allow_none=True)
        positive_int("te", "max_length_groups", self.max_length_groups)
        if self.head_parallel is not None and self.cp_comm_type != "a2a+p2p":
            raise CPError("te: head_parallel applies only to cp_comm_type='a2a+p2p'; drop it or switch comm type")


def _unsupported_mask(spec: AttentionSpec, comm_type: str) -> CPError:
    ok = ", ".join(TE_MASKS[comm_type])
    return CPError(
        f"te: mask {spec.mask!r} is not supported by Transformer Engine context parallelism with "
        f"cp_comm_type={comm_type!r} (supported here: {ok}; TE takes 'causal' and 'full' under 'p2p', and "
        "sliding windows only with its 'a2a'/'all_gather' variants). Use the ring, zigzag, loongtrain or dcp "
        f"backend for {spec.mask!r}."
    )


class TEPlan(Plan):
    """The DualChunkSwap layout of one batch plus the comm type and a2a degree it runs with."""

    def __init__(self, batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: TEOptions, *,
                 head_parallel: int, comm_type: str | None = None):
        super().__init__("te", batch, spec, topology, options)
        self.comm_type = comm_type or options.cp_comm_type
        self.layout = TELayout(batch, topology.world_size,
                               options.max_length_groups if self.comm_type == "a2a+p2p" else None)
        self.head_parallel = head_parallel
        self._host: dict = {}  # rank -> host tables (see _tables)

    def _local_indices(self, rank: int) -> np.ndarray:
        return self.layout.local_indices(rank)

    # -------------------------------------------------------------- device tensors (uploaded once per plan)
    def _tables(self, rank: int):
        """Host tables of ``rank`` (built once, in the planning worker): TE's int32 offsets, and the int64
        length-group rows and buffer positions, each packed into one buffer."""
        cache = self._host
        if rank not in cache:
            lay = self.layout
            offsets = HostTables(np.int32)
            offsets.add(lay.cu_seqlens)
            offsets.add(lay.cu_seqlens_padded)
            rows = HostTables(np.int64)
            for _, _, r in lay.length_groups:
                rows.add(r)
            rows.add(lay.buffer_positions(rank))
            cache[rank] = (offsets, rows)
        return cache[rank]

    def prepare(self, rank: int, device: str = "cpu") -> "TEPlan":
        self._check_rank(rank)
        for t in self._tables(rank):
            t.host  # pack now
        return self

    def device_meta(self, rank: int, device: torch.device) -> dict:
        """TE's offsets, the length groups' rows and ``rank``'s buffer positions on ``device``."""
        offsets, rows = self._tables(rank)
        o, r = offsets.on(device), rows.on(device)
        groups = [(plen, docs.size, r[i]) for i, (plen, docs, _) in enumerate(self.layout.length_groups)]
        return {"cu_seqlens": o[0], "cu_seqlens_padded": o[1], "groups": groups, "positions": r[-1]}

    # -------------------------------------------------------------- statistics
    def stats(self, element_size: int = 2) -> PlanStats:
        """Bytes, compute and memory per rank of TE's schedule (K/V in ``element_size`` bytes).

        p2p ring over ``P = world / head_parallel`` ranks: the forward sends the rank's K/V buffer (padded,
        after the all-to-all when ``head_parallel > 1``) ``P - 1`` times; the backward sends K/V ``P - 1``
        times and the dK/dV accumulator ``P - 1`` times (in the input dtype). The all-to-alls move
        ``(A-1)/A`` of q, k, v and out forward and of dout, dq, dk, dv backward. Compute counts the
        unmasked (query, key) pairs of real tokens times the query heads a rank computes. Memory is the larger
        of the forward's and the backward's attention buffers (both per rank in ``extra``), as for the other
        backends.
        """
        spec, n, A = self.spec, self.world_size, self.head_parallel
        P = n // A
        dpn = self.devices_per_node
        lay = self.layout
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        local = lay.local_tokens  # padded rows per rank
        # After the all-to-all a rank holds its group's rows with 1/A of the heads: same byte count.
        kv_bytes = 2 * local * Hkv * D * element_size
        fwd = np.zeros((n, 2))
        bwd = np.zeros((n, 2))

        def add(arr, src, dst, nbytes):
            arr[src, int(src // dpn != dst // dpn)] += nbytes

        for r in range(n):
            nxt = (r + A) % n  # p2p group: ranks with the same slot in their a2a group
            if P > 1:
                add(fwd, r, nxt, (P - 1) * kv_bytes)
                add(bwd, r, nxt, 2 * (P - 1) * kv_bytes)
            if A > 1:
                g0 = (r // A) * A
                per_peer = local * (2 * H + 2 * Hkv) * D * element_size // A  # q,k,v,out (or their grads)
                for peer in range(g0, g0 + A):
                    if peer != r:
                        add(fwd, r, peer, per_peer)
                        add(bwd, r, peer, per_peer)
        per_token = range_lengths(build_ranges(self.batch, spec.mask, spec.mask_args))
        real_pairs = np.array([int(per_token[self.layout.local_indices(r)].sum()) for r in range(n)])
        compute = []
        for r in range(n):
            g0 = (r // A) * A
            compute.append(int(real_pairs[g0:g0 + A].sum()) * (H // A))
        tokens = tuple(int(x) for x in lay.real_tokens())
        acc_size = acc_element_size(element_size)
        act = local * (2 * H + 2 * Hkv) * D * element_size  # q, k, v, out (padded buffers)
        ring = 2 * kv_bytes + local * H * D * acc_size  # two K/V receive buffers + fp32 out accumulator
        fwd_mem = act + ring
        # backward (TE's AttnFuncWithCPAndKVP2P.backward): the saved q, K/V, out and fp32 lse; dout; dq and
        # each step's dq in the input dtype (q-sized); two ring buffers, each K/V plus dK/dV; each step's
        # dK/dV (K/V-sized). An all-to-all moves heads, not bytes.
        bwd_mem = (local * 5 * H * D * element_size + local * H * acc_size
                   + kv_bytes + 2 * 2 * kv_bytes + kv_bytes)
        memory = tuple(max(fwd_mem, bwd_mem) for _ in range(n))
        return PlanStats.from_traffic(
            "te", n, dpn, fwd, bwd, compute, tokens, memory,
            extra={"fwd_memory_bytes_per_rank": [fwd_mem] * n, "bwd_memory_bytes_per_rank": [bwd_mem] * n,
                   "cp_comm_type": self.comm_type, "head_parallel": A,
                   "passes_per_layer": len(lay.length_groups) if self.comm_type == "a2a+p2p" else 1,
                   "padded_tokens": int(lay.cu_seqlens_padded[-1]),
                   "padding_fraction": 1.0 - self.batch.total_tokens / float(lay.cu_seqlens_padded[-1])})


class TEPlanner(Planner):
    """Plans TE's layout and statistics; needs no Transformer Engine."""

    name = "te"
    Options = TEOptions

    def resolve_head_parallel(self, spec: AttentionSpec, world_size: int) -> int:
        o = self.options
        if o.cp_comm_type != "a2a+p2p":
            return 1
        hp = o.head_parallel if o.head_parallel is not None else math.gcd(world_size, spec.num_kv_heads)
        if world_size % hp:
            raise CPError(f"te: head_parallel={hp} must divide the world size {world_size}")
        if spec.num_heads % hp or spec.num_kv_heads % hp:
            raise CPError(
                f"te: a2a+p2p splits heads over head_parallel={hp} ranks, so num_heads ({spec.num_heads}) and "
                f"num_kv_heads ({spec.num_kv_heads}) must both be divisible by it; pick a head_parallel that "
                "divides both"
            )
        return hp

    def check_spec(self, spec: AttentionSpec, topology: Topology) -> None:
        if spec.mask not in TE_MASKS[self.options.cp_comm_type]:
            raise _unsupported_mask(spec, self.options.cp_comm_type)
        self.resolve_head_parallel(spec, topology.world_size)

    def _make_plan(self, batch, spec, topology):
        return TEPlan(batch, spec, topology, self.options,
                      head_parallel=self.resolve_head_parallel(spec, topology.world_size))


class TEExecutor(Executor):
    name = "te"
    PlanType = TEPlan

    def __init__(self, group=None, kernel: str = "auto"):
        super().__init__(group, kernel)
        self._dpa: dict = {}
        self._groups = None
        self._stream = None

    # -------------------------------------------------------------- execution (CUDA + TE)
    def _check_device(self, q: torch.Tensor) -> None:
        if q.device.type != "cuda":
            raise CPError(f"te: Transformer Engine runs on CUDA tensors only, got {q.device}")
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise CPError(f"te: Transformer Engine's context-parallel attention needs bf16 or fp16, got {q.dtype}")
        if comm.backend_name(self.group) != "nccl":
            raise CPError("te: Transformer Engine's context parallelism needs an NCCL process group")

    def _cp_groups(self, plan: TEPlan, device: torch.device):
        """(cp_group, cp_global_ranks): the group itself for p2p, [a2a, p2p] subgroups for a2a+p2p."""
        import torch.distributed as dist

        n = plan.world_size
        ranks = [comm.global_rank(self.group, r) for r in range(n)]
        if plan.comm_type == "p2p":
            return (self.group if self.group is not None else dist.group.WORLD), ranks
        A = plan.head_parallel
        if self._groups is None or self._groups[0] != A:
            me = self.rank
            timeout = comm.group_timeout(self.group, device)
            a2a = [ranks[i] for i in range((me // A) * A, (me // A + 1) * A)]
            p2p = [ranks[i] for i in range(me % A, n, A)]
            # Only the members create each group (local synchronisation), so the CP group may be a
            # subgroup of WORLD and other replicas build theirs at the same time.
            g_a2a = dist.new_group(a2a, timeout=timeout, use_local_synchronization=True)
            g_p2p = dist.new_group(p2p, timeout=timeout, use_local_synchronization=True)
            self._groups = (A, [g_a2a, g_p2p])
        return self._groups[1], ranks

    def _module(self, plan: TEPlan, device: torch.device):
        spec = plan.spec
        key = (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.scale, plan.comm_type, plan.head_parallel,
               TE_MASKS[plan.comm_type][spec.mask])
        if key not in self._dpa:
            from transformer_engine.pytorch import DotProductAttention

            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            cp_group, cp_ranks = self._cp_groups(plan, device)
            self._dpa[key] = DotProductAttention(
                spec.num_heads, spec.head_dim, num_gqa_groups=spec.num_kv_heads, attention_dropout=0.0,
                qkv_format="thd" if plan.comm_type == "p2p" else "bshd",
                attn_mask_type=TE_MASKS[plan.comm_type][spec.mask], softmax_scale=spec.scale,
                cp_group=cp_group, cp_global_ranks=cp_ranks, cp_stream=self._stream,
                cp_comm_type=plan.comm_type,
            )
        return self._dpa[key]

    def _attention(self, q, k, v, plan: TEPlan):
        self._check_device(q)
        rank = self.rank
        lay = plan.layout
        dpa = self._module(plan, q.device)
        meta = plan.device_meta(rank, q.device)
        pos = meta["positions"]
        H, D = plan.spec.num_heads, plan.spec.head_dim

        def padded(x):
            return x.new_zeros((lay.local_tokens,) + tuple(x.shape[1:])).index_copy(0, pos, x)

        qb, kb, vb = padded(q), padded(k), padded(v)
        if plan.comm_type == "p2p":
            out = dpa(
                qb, kb, vb, qkv_format="thd",
                cu_seqlens_q=meta["cu_seqlens"], cu_seqlens_kv=meta["cu_seqlens"],
                cu_seqlens_q_padded=meta["cu_seqlens_padded"], cu_seqlens_kv_padded=meta["cu_seqlens_padded"],
                max_seqlen_q=lay.max_seqlen, max_seqlen_kv=lay.max_seqlen,
                attn_mask_type=TE_MASKS["p2p"][plan.spec.mask], pad_between_seqs=True,
            )
            return out.reshape(lay.local_tokens, H, D).index_select(0, pos)
        # a2a+p2p: one BSHD batch per padded length; rows of every group are a permutation of the buffer.
        outs, rows = [], []
        for plen, ndocs, grow in meta["groups"]:
            s = plen // plan.world_size

            def bshd(x):
                return x.index_select(0, grow).view(ndocs, s, x.shape[1], D)

            o = dpa(bshd(qb), bshd(kb), bshd(vb), qkv_format="bshd", attn_mask_type="causal")
            outs.append(o.reshape(ndocs * s, H, D))
            rows.append(grow)
        out_rows = torch.cat(outs)
        inverse = torch.empty_like(torch.cat(rows))
        inverse[torch.cat(rows)] = torch.arange(inverse.numel(), device=inverse.device)
        return out_rows.index_select(0, inverse.index_select(0, pos))


class TEBackend(CPBackend):
    name = "te"
    Planner = TEPlanner
    Executor = TEExecutor

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("transformer_engine") is None:
            raise BackendUnavailableError(
                "Transformer Engine is not installed; install the `gpu` extra or use the Dockerfile "
                "(TE needs CUDA; on CPU use the ring, zigzag, loongtrain or dcp backend). Plans and "
                "statistics work without it: get_planner('te').plan(seqlens, spec, Topology(N))."
            )
