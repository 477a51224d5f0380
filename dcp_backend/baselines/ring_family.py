"""Plan and backend base shared by the ring-family baselines (ring, zigzag, LoongTrain).

A ring-family plan is a static token layout over ``C`` ring positions (see :mod:`.layout`), a window
size for the double ring, and a head-parallel degree ``hp`` (LoongTrain; 1 otherwise). Group rank
``r`` is ring position ``r // hp`` and head slot ``r % hp`` (head groups are consecutive ranks, so the
all-to-all stays inside a node; ring neighbours are ``hp`` ranks apart). A position's tokens are split
into ``hp`` contiguous near-equal parts, one per head slot.

Statistics (bytes moved inter/intra node, compute, memory) are derived from the same schedule the
executor runs, so dry runs can compare baselines with DCP without executing anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dcp_backend.dtypes import acc_element_size

from dcp_backend.contract import Executor, KernelOptions, Plan, Planner, PlanStats
from dcp_backend.baselines.layout import ChunkLayout, PairWorkBuilder
from dcp_backend import comm
from dcp_backend.baselines.ring_core import RingAttentionFn, RingGeometry, RingGroups, RingRankWork
from dcp_backend.batch import PackedBatch
from dcp_backend.kernels import get_kernel
from dcp_backend.masks import build_ranges, range_lengths
from dcp_backend.spec import AttentionSpec
from dcp_backend.errors import CPError
from dcp_backend.topology import Topology


@dataclass(frozen=True)
class RingFamilyOptions(KernelOptions):
    """Options of ring and zigzag: the block kernel only (the topology comes with the plan)."""


class RingFamilyPlan(Plan):
    def __init__(self, backend_name: str, batch: PackedBatch, spec: AttentionSpec, topology: Topology, options, *,
                 layout: ChunkLayout, window: int, head_parallel: int):
        super().__init__(backend_name, batch, spec, topology, options)
        self.layout = layout
        self.window = window
        self.head_parallel = head_parallel
        self.num_positions = layout.num_positions
        self._rank_work: dict[int, RingRankWork] = {}

    # -------------------------------------------------------------- placement
    def position_of(self, rank: int) -> int:
        return rank // self.head_parallel

    def rank_of_position(self, c: int, slot: int = 0) -> int:
        return c * self.head_parallel + slot

    @cached_property
    def slot_bounds(self) -> np.ndarray:
        """[C, hp+1]: each position's buffer split into hp contiguous parts."""
        tok = self.layout.tokens_per_position
        k = np.arange(self.head_parallel + 1)
        return (tok[:, None] * k[None, :]) // self.head_parallel

    def slot_tokens(self, c: int) -> np.ndarray:
        return np.diff(self.slot_bounds[c])

    def _local_indices(self, rank: int) -> np.ndarray:
        c, slot = divmod(rank, self.head_parallel)
        idx = self.layout.global_indices(c)
        b = self.slot_bounds[c]
        return idx[b[slot]:b[slot + 1]]

    def geometry(self, rank: int) -> RingGeometry:
        slot = rank % self.head_parallel
        return RingGeometry(
            self.num_positions, self.window, self.position_of(rank),
            tuple(self.rank_of_position(c, slot) for c in range(self.num_positions)),
        )

    @cached_property
    def _builder(self) -> PairWorkBuilder:
        return PairWorkBuilder(self.layout, self.spec.mask, self.spec.mask_args)

    def prepare(self, rank: int, device: str = "cpu") -> "RingFamilyPlan":
        rw = self.rank_work(rank)
        rw.prepare_kernel(get_kernel(self.options.kernel, device))
        return self

    def rank_work(self, rank: int) -> RingRankWork:
        """The (cached) per-source attention work of ``rank``'s ring position."""
        if rank not in self._rank_work:
            c = self.position_of(rank)
            works = {src: self._builder.build(c, src) for src in range(self.num_positions)}
            self._rank_work[rank] = RingRankWork(self.geometry(rank), works, self.layout.tokens_per_position)
        return self._rank_work[rank]

    # -------------------------------------------------------------- statistics
    def stats(self, element_size: int = 2) -> PlanStats:
        """Bytes, compute and memory per rank for this schedule (K/V in ``element_size`` bytes)."""
        spec, hp, n = self.spec, self.head_parallel, self.world_size
        C, w = self.num_positions, self.window
        nw = C // w
        dpn = self.devices_per_node
        acc_size = acc_element_size(element_size)
        kv_heads = max(spec.num_kv_heads // hp, 1)
        kv_tok = 2 * kv_heads * spec.head_dim  # K and V elements per token per rank
        tokens_c = self.layout.tokens_per_position
        fwd = np.zeros((n, 2))  # [rank, intra/inter]
        bwd = np.zeros((n, 2))

        def add(arr, src_rank, dst_rank, nbytes):
            arr[src_rank, int(src_rank // dpn != dst_rank // dpn)] += nbytes

        for r in range(n):
            geo = self.geometry(r)
            for o in range(nw):
                if o < nw - 1:
                    b = tokens_c[geo.source(o, 0)] * kv_tok * element_size
                    add(fwd, r, geo.outer_next, b)
                    add(bwd, r, geo.outer_next, b)
                if nw > 1:  # outer dK/dV accumulator
                    add(bwd, r, geo.outer_next, tokens_c[geo.source(o, 0)] * kv_tok * acc_size)
                for t in range(w):
                    if t < w - 1:
                        b = tokens_c[geo.source(o, t)] * kv_tok * element_size
                        add(fwd, r, geo.inner_next, b)
                        add(bwd, r, geo.inner_next, b)
                    if w > 1:
                        add(bwd, r, geo.inner_next, tokens_c[geo.source(o, t)] * kv_tok * acc_size)
            if hp > 1:  # head-parallel all-to-alls (q, k, v in; out back; and their gradients)
                c, slot = divmod(r, hp)
                mine = self.slot_tokens(c)[slot]
                q_tok, kv_tok_a2a = spec.num_heads // hp * spec.head_dim, kv_heads * spec.head_dim
                for peer_slot in range(hp):
                    if peer_slot == slot:
                        continue
                    peer = self.rank_of_position(c, peer_slot)
                    theirs = self.slot_tokens(c)[peer_slot]
                    add(fwd, r, peer, mine * (q_tok + 2 * kv_tok_a2a) * element_size + theirs * q_tok * element_size)
                    add(bwd, r, peer, theirs * (q_tok + 2 * kv_tok_a2a) * element_size + mine * q_tok * element_size)
        ranges = build_ranges(self.batch, spec.mask, spec.mask_args)
        per_token = range_lengths(ranges)
        compute, tokens, memory, fwd_mem, bwd_mem = [], [], [], [], []
        for r in range(n):
            c = self.position_of(r)
            idx_c = self.layout.global_indices(c)
            compute.append(int(per_token[idx_c].sum()) * (spec.num_heads // hp))
            local = self.num_local_tokens(r)
            tokens.append(local)
            held = int(tokens_c[c])
            biggest = int(tokens_c.max())
            d, heads = spec.head_dim, spec.num_heads
            # forward: q, out, k, v; K/V in flight (own + two blocks) and the fp32 output accumulator
            act = local * (2 * heads + 2 * spec.num_kv_heads) * d * element_size
            ring_bufs = (held + 2 * biggest) * kv_tok * element_size + held * (heads // hp) * d * acc_size
            # backward (ring_core.ring_backward): q, out, dout, k, v and lse; the same K/V blocks, the fp32 dq
            # accumulator and three fp32 dK/dV blocks (this step's partial, the one received, the one passed
            # on), two more with an outer ring
            act_b = local * (3 * heads + 2 * spec.num_kv_heads) * d * element_size + local * heads * acc_size
            bufs_b = ((held + 2 * biggest) * kv_tok * element_size + held * (heads // hp) * d * acc_size
                      + (3 + 2 * (nw > 1)) * biggest * kv_tok * acc_size)
            fwd_mem.append(act + ring_bufs)
            bwd_mem.append(act_b + bufs_b)
            memory.append(max(act + ring_bufs, act_b + bufs_b))
        return PlanStats.from_traffic(
            self.backend_name, n, dpn, fwd, bwd, compute, tokens, memory,
            extra={"window": w, "head_parallel": hp, "fwd_memory_bytes_per_rank": fwd_mem,
                   "bwd_memory_bytes_per_rank": bwd_mem})


class RingFamilyPlanner(Planner):
    """Shared by ring, zigzag and LoongTrain: subclasses choose the layout, window and head-parallel degree."""

    Options = RingFamilyOptions

    def _kv_heads_check(self, spec: AttentionSpec, hp: int) -> None:
        if spec.num_heads % hp:
            raise CPError(
                f"{self.name}: num_heads ({spec.num_heads}) must be divisible by the head-parallel degree ({hp})"
            )
        if spec.num_kv_heads % hp and hp % spec.num_kv_heads:
            raise CPError(
                f"{self.name}: num_kv_heads ({spec.num_kv_heads}) and the head-parallel degree ({hp}) must "
                "divide one another (KV heads are split, or replicated when there are fewer than hp)"
            )


class RingFamilyExecutor(Executor):
    """Shared attention path: (optional head all-to-all, LoongTrain) + double ring over the block kernel."""

    PlanType = RingFamilyPlan

    def ring_groups(self, plan: RingFamilyPlan) -> RingGroups:
        """The inner ring on the executor's group; the outer ring (several windows) on a second communicator
        over the same ranks (:func:`dcp_backend.comm.companion_group`), so the two overlap under NCCL."""
        multi = plan.num_positions // plan.window > 1
        return RingGroups(self.group, comm.companion_group(self.group) if multi else self.group)

    def _attention(self, q, k, v, plan: RingFamilyPlan):
        rw = plan.rank_work(self.rank)
        return RingAttentionFn.apply(q, k, v, rw, self.kernel(q.device), plan.spec.scale, self.ring_groups(plan),
                                     self.counters)
