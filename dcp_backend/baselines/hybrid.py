"""`hybrid`: Megatron-Core's hybrid (dynamic) context parallelism, as a planning-only baseline.

megatron-core 0.16.1 ships ``megatron.core.pipeline_parallel.hybrid_cp_schedule.BalancedCPScheduler``:
every sample (here: every document of the packed batch) gets a CP group of a power-of-two size,
``gpus_needed(L) = 2 ** ceil(log2(L / max_seqlen_per_rank))`` (at least 1), and the samples are packed
into *groups* of the DP x CP ranks whose estimated work (``L**2 / cp_size`` per rank) is balanced. Each
such group is a *round* here: megatron's ``hybrid_context_parallel_forward_backward`` runs a rank's
samples of the round one after another, each as its own micro-batch (forward and backward over its CP
group with Transformer Engine's p2p ring, the sample cut into ``2 x cp`` DualChunkSwap chunks and padded
to a multiple of ``2 x cp``), and all ranks meet at a barrier before the next round.

The plan calls the scheduler itself (``get_groups_and_subsamples``) to form the rounds; nothing of it is
re-implemented. Its only use of the process group it is given is ``size()``, so it receives
:class:`_SizeOnlyGroup` (the CP size, no communicator): the grouping is pure CPU. A sample's CP group is
the set of ranks whose list holds it (what megatron calls ``partner_cp_size``); members of one group run
the same samples in the same order (checked).

Each sample is planned as a one-document :class:`~dcp_backend.baselines.te.TEPlan` (p2p) over its group
(for masks TE's CP refuses, the same schedule with range masks, as the published forked TE); statistics
and the simulator (:mod:`dcp_backend.sim.hybrid`) follow those per-sample plans on the group's global
ranks.

Running it is megatron's own schedule with TE on GPUs (a different training loop than this project's);
``get_backend("hybrid")`` says so. Planning, dry runs and simulation need neither TE nor a GPU.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dcp_backend.baselines.te import TEOptions, TEPlan
from dcp_backend.batch import PackedBatch
from dcp_backend.contract import BackendOptions, CPBackend, Executor, Plan, Planner, PlanStats, option, positive_int
from dcp_backend.errors import BackendUnavailableError, CPError
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology

_NOT_RUNNABLE = (
    "hybrid is a planning-only baseline: megatron-core's hybrid context parallelism runs inside its own "
    "training schedule (megatron.core.pipeline_parallel.hybrid_cp_schedule, with Transformer Engine on GPUs), "
    "not as an attention backend of this project. Plan and simulate it with get_planner('hybrid') and "
    "tools/simulate.py / tools/dry_run.py; to train, pick ring, zigzag, loongtrain, te or dcp."
)


@dataclass(frozen=True)
class HybridOptions(BackendOptions):
    max_seqlen_per_rank: int | None = option(
        None, "megatron-core's max_seqlen_per_dp_cp_rank: the most tokens of one sample a rank holds; a sample of "
              "L tokens gets a CP group of 2**ceil(log2(L / this)) ranks (default: ceil(batch tokens / CP size), "
              "megatron's suggested starting point, so ranks hold what the other backends hold)")

    def validate(self) -> None:
        super().validate()
        positive_int("hybrid", "max_seqlen_per_rank", self.max_seqlen_per_rank, allow_none=True)


class _SizeOnlyGroup:
    """What ``BalancedCPScheduler`` reads of its ``dp_cp_group``: the number of ranks (``size()``)."""

    def __init__(self, n: int):
        self._n = int(n)

    def size(self) -> int:
        return self._n


def megatron_rounds(seqlens, world_size: int, max_seqlen_per_rank: int) -> list[list[list[int]]]:
    """``[round][rank] -> [sample ids]`` from megatron-core's ``BalancedCPScheduler`` (sample id = index
    into ``seqlens``)."""
    with warnings.catch_warnings():  # megatron-core warns at import that TE / Apex are absent (not needed here)
        warnings.simplefilter("ignore")
        from megatron.core.pipeline_parallel.hybrid_cp_schedule import BalancedCPScheduler
    sched = BalancedCPScheduler(max_seq_len_per_rank=int(max_seqlen_per_rank), dp_cp_group=_SizeOnlyGroup(world_size))
    _, sample_id_groups = sched.get_groups_and_subsamples([(i, int(n)) for i, n in enumerate(seqlens)], None)
    return [[[int(s) for s in ids] for ids in rnd] for rnd in sample_id_groups]


@dataclass(frozen=True)
class SampleGroup:
    """Ranks that run ``docs`` together (in this order), one CP group per sample, in one round."""

    ranks: tuple[int, ...]
    docs: tuple[int, ...]


def groups_of_round(ids_per_rank: list[list[int]]) -> list[SampleGroup]:
    """The CP groups of one round: a sample's group is the ranks whose list holds it."""
    members: dict[int, list[int]] = {}
    for r, ids in enumerate(ids_per_rank):
        for s in ids:
            members.setdefault(s, []).append(r)
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, ranks in members.items():
        groups.setdefault(tuple(ranks), [])
    out = []
    for ranks in groups:
        order = ids_per_rank[ranks[0]]
        if any(ids_per_rank[r] != order for r in ranks):
            raise CPError(f"hybrid: megatron-core's scheduler gave the ranks {list(ranks)} of one CP group different "
                          "sample orders; this plan cannot run them in lockstep")
        out.append(SampleGroup(ranks, tuple(order)))
    seen = [r for g in out for r in g.ranks]
    if len(seen) != len(set(seen)):
        raise CPError("hybrid: a rank belongs to two CP groups of one round (overlapping sample groups)")
    return sorted(out, key=lambda g: g.ranks[0])


class HybridPlan(Plan):
    """Rounds of sample groups (megatron-core's schedule) and one TE p2p plan per (sample length, group size)."""

    def __init__(self, batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: HybridOptions, *,
                 max_seqlen_per_rank: int, rounds: list[list[SampleGroup]]):
        super().__init__("hybrid", batch, spec, topology, options)
        self.max_seqlen_per_rank = int(max_seqlen_per_rank)
        self.rounds = rounds
        self._sample_plans: dict[tuple[int, int], TEPlan] = {}

    def sample_plan(self, doc: int, group_size: int) -> TEPlan:
        """TE's p2p plan of document ``doc`` alone over ``group_size`` ranks (cached by length and size)."""
        key = (int(self.batch.seqlens[doc]), int(group_size))
        if key not in self._sample_plans:
            self._sample_plans[key] = TEPlan(PackedBatch.from_seqlens([key[0]]), self.spec, Topology(key[1]),
                                             TEOptions(), head_parallel=1, comm_type="p2p")
        return self._sample_plans[key]

    def samples(self):
        """(round, group, doc) in execution order."""
        for j, rnd in enumerate(self.rounds):
            for g in rnd:
                for d in g.docs:
                    yield j, g, d

    @cached_property
    def _indices(self) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in range(self.world_size)]
        cu = self.batch.cu_seqlens
        for _, g, d in self.samples():
            sub = self.sample_plan(d, len(g.ranks))
            for i, r in enumerate(g.ranks):
                parts[r].append(sub.layout.local_indices(i) + cu[d])
        return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]

    def _local_indices(self, rank: int) -> np.ndarray:
        return self._indices[rank]

    def model_tokens(self) -> np.ndarray:
        """Rows each rank runs through the model, padding included (summed over its micro-batches)."""
        out = np.zeros(self.world_size, dtype=np.int64)
        for _, g, d in self.samples():
            out[list(g.ranks)] += self.sample_plan(d, len(g.ranks)).layout.local_tokens
        return out

    def stats(self, element_size: int = 2) -> PlanStats:
        """Bytes (each sample's ring on its group's global ranks), compute (summed over a rank's samples),
        tokens, and memory (the largest micro-batch of a rank: samples run one at a time)."""
        n, dpn = self.world_size, self.devices_per_node
        fwd = np.zeros((n, 2))
        bwd = np.zeros((n, 2))
        compute = np.zeros(n, dtype=np.int64)
        memory = np.zeros(n, dtype=np.int64)
        sizes: dict[int, int] = {}
        for _, g, d in self.samples():
            k = len(g.ranks)
            sizes[k] = sizes.get(k, 0) + 1
            st = self.sample_plan(d, k).stats(element_size)
            for i, r in enumerate(g.ranks):
                dst = g.ranks[(i + 1) % k]
                inter = int(r // dpn != dst // dpn)
                fwd[r, inter] += st.extra["fwd_bytes_per_rank"][i]
                bwd[r, inter] += st.extra["bwd_bytes_per_rank"][i]
                compute[r] += st.compute_pair_heads[i]
                memory[r] = max(memory[r], st.memory_bytes[i])
        tokens = tuple(int(self.num_local_tokens(r)) for r in range(n))
        return PlanStats.from_traffic(
            "hybrid", n, dpn, fwd, bwd, compute, tokens, memory,
            extra={"max_seqlen_per_rank": self.max_seqlen_per_rank, "rounds": len(self.rounds),
                   "micro_batches_per_rank": [sum(len(g.docs) for rnd in self.rounds for g in rnd if r in g.ranks)
                                              for r in range(n)],
                   "group_sizes": {str(k): v for k, v in sorted(sizes.items())}})


class HybridPlanner(Planner):
    """Plans with megatron-core's scheduler (pure CPU: no process group, no TE)."""

    name = "hybrid"
    Options = HybridOptions

    def check_spec(self, spec: AttentionSpec, topology: Topology) -> None:
        n = topology.world_size
        if n & (n - 1):
            raise CPError(f"hybrid: megatron-core builds hybrid CP groups of power-of-two sizes, so the CP size must "
                          f"be a power of two, got {n}")

    def max_seqlen(self, batch: PackedBatch, topology: Topology) -> int:
        m = self.options.max_seqlen_per_rank
        return int(m) if m is not None else -(-batch.total_tokens // topology.world_size)

    def _make_plan(self, batch, spec, topology):
        n = topology.world_size
        m = self.max_seqlen(batch, topology)
        longest = int(batch.seqlens.max())
        need = max(1, 2 ** math.ceil(math.log2(longest / m)))
        if need > n:
            raise CPError(f"hybrid: a document of {longest} tokens needs a CP group of {need} ranks at "
                          f"max_seqlen_per_rank={m}, but there are {n}; raise max_seqlen_per_rank to at least "
                          f"{-(-longest // n)}")
        rounds = [groups_of_round(ids) for ids in megatron_rounds(batch.seqlens.tolist(), n, m)]
        placed = sorted(d for rnd in rounds for g in rnd for d in g.docs)
        if placed != list(range(batch.num_docs)):
            raise CPError("hybrid: megatron-core's scheduler did not place every document exactly once")
        return HybridPlan(batch, spec, topology, self.options, max_seqlen_per_rank=m, rounds=rounds)


class HybridExecutor(Executor):
    name = "hybrid"
    PlanType = HybridPlan

    def _attention(self, q, k, v, plan):
        raise CPError(_NOT_RUNNABLE)


class HybridBackend(CPBackend):
    name = "hybrid"
    Planner = HybridPlanner
    Executor = HybridExecutor

    @classmethod
    def check_available(cls) -> None:
        raise BackendUnavailableError(_NOT_RUNNABLE)
