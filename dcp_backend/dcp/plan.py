"""The DCP plan type and how a placement becomes one: blocks + placement -> schedules -> programs.

:func:`plan_from_placement` is the one path from a placement (any strategy's) to a :class:`DCPPlan`;
:func:`pair_cost` is the planner's balance weight of every computation block.
"""
from __future__ import annotations

import time

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.contract import Plan, PlanStats
from dcp_backend.errors import CPError
from dcp_backend.dcp.blocks import BlockSet, block_bytes
from dcp_backend.dcp.compile import (DeviceLayout, compile_programs, own_memory_bytes, pass_buffer_bytes,
                                     pass_memory_bytes, result_send_hold, row_bytes)
from dcp_backend.dcp.config import DCPOptions, own_rows_factor
from dcp_backend.dcp.instructions import ACC, MODEL, DeviceProgram
from dcp_backend.dcp.partition import Placement
from dcp_backend.dcp.prepared import PreparedProgram
from dcp_backend.dcp.ring_schedule import ring_schedule
from dcp_backend.dcp.schedule import KIND_KV, KIND_Q, PassSchedule, PassScheduler
from dcp_backend.kernels import get_kernel
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology


def partial_wire(options: DCPOptions) -> str:
    """The dtype class partial results travel in (``DCPOptions.partial_dtype``)."""
    return MODEL if options.partial_dtype == "model" else ACC


def pair_cost(bs: BlockSet, cost_model: str | None = None, element_size: int = 2) -> np.ndarray:
    """Cost of every computation block: unmasked pairs x query heads of its head block; with a cost model
    (``DCPOptions.cost_model``, see :mod:`dcp_backend.cost_model`) its forward + backward seconds instead."""
    if cost_model is not None:
        from dcp_backend.cost_model import load_cost_model

        return load_cost_model(cost_model).block_seconds(bs, element_size)
    return (bs.pair_count[bs.comp_pair(np.arange(bs.n_comp))] * bs.heads.hb).astype(np.float64)


class DCPPlan(Plan):
    """A compiled DCP plan (see :mod:`dcp_backend.dcp`).

    Declared state besides the plan itself: ``runners`` (the executor's per-(rank, device, dtype) program
    runners, filled by :class:`~dcp_backend.dcp.executor.DCPExecutor`), ``candidates`` (the simulated
    times of every candidate when ``placement="auto"`` chose this plan) and the planning times by phase.
    """

    def __init__(self, batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: DCPOptions, *,
                 blocks: BlockSet, placement: Placement, fwd: PassSchedule, bwd: PassSchedule,
                 layouts: list[DeviceLayout], fwd_programs: list[DeviceProgram],
                 bwd_programs: list[DeviceProgram], timings: dict[str, float], comp_cost: np.ndarray):
        super().__init__("dcp", batch, spec, topology, options)
        self.blocks = blocks
        self.placement = placement
        self.fwd = fwd
        self.bwd = bwd
        self.layouts = layouts
        self.fwd_programs = fwd_programs
        self.bwd_programs = bwd_programs
        self.phase_seconds: dict[str, float] = dict(timings)
        self.comp_cost = comp_cost
        self.candidates: dict | None = None
        self.runners: dict = {}
        self._prepared: dict = {}

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_stages(self) -> int:
        return self.fwd.num_stages

    def _local_indices(self, rank: int) -> np.ndarray:
        return self.layouts[rank].global_indices()

    def compile_for(self, rank: int) -> "DCPPlan":
        """Compile ``rank``'s forward and backward programs now (planning workers call this so the
        training process never compiles)."""
        self._check_rank(rank)
        self.fwd_programs[rank], self.bwd_programs[rank]
        return self

    def prepared_programs(self, rank: int):
        """``rank``'s forward and backward programs with their index tables packed (host side, cached)."""
        if rank not in self._prepared:
            self.compile_for(rank)
            d = self.spec.head_dim
            self._prepared[rank] = (PreparedProgram(self.fwd_programs[rank], d),
                                    PreparedProgram(self.bwd_programs[rank], d))
        return self._prepared[rank]

    def prepare(self, rank: int, device: str = "cpu") -> "DCPPlan":
        kernel = get_kernel(self.options.kernel, device)
        for prepared in self.prepared_programs(rank):
            prepared.prepare_kernel(kernel)
        return self

    def compile_all(self) -> "DCPPlan":
        for r in range(self.world_size):
            self.compile_for(r)
        return self

    @property
    def planning_seconds(self) -> float:
        """Seconds spent planning so far: blocks, partition, schedules, and compiling the programs
        compiled up to now (all of them after ``compile_all``)."""
        return float(sum(self.timings.values()))

    @property
    def rank_planning_seconds(self) -> float:
        """What one training rank spends on this plan: blocks, partition and schedules, plus compiling its
        own programs (the slowest rank among those compiled; a rank's loader worker compiles only its own)."""
        per = [getattr(p, "device_seconds", None) for p in (self.fwd_programs, self.bwd_programs)]
        own = [f + b for f, b in zip(*per)] if all(x is not None for x in per) else []
        return float(sum(self.phase_seconds.values()) + max(own, default=0.0))

    @property
    def timings(self) -> dict[str, float]:
        t = dict(self.phase_seconds)
        progs = (self.fwd_programs, self.bwd_programs)
        if all(hasattr(p, "compile_seconds") for p in progs):
            t["compile"] = t.get("compile", 0.0) + sum(p.compile_seconds for p in progs)
        return t

    def _fingerprint_extra(self) -> bytes:
        """The placement (token-block owners, computation-block devices) and block size: a partitioner
        that placed differently on two ranks makes them disagree here, at the first attention call,
        rather than deadlock on mismatched transfers."""
        pl = self.placement
        return b"".join([np.int64(self.block_size).tobytes(), np.ascontiguousarray(pl.owner, np.int64).tobytes(),
                         np.ascontiguousarray(pl.comp_device, np.int64).tobytes()])

    def stats(self, element_size: int = 2) -> PlanStats:
        from dcp_backend.dcp.stats import plan_stats

        return plan_stats(self, element_size)


AUTO_MEMORY_FACTOR = 2.0  # memory_limit="auto": every device's stores and buffers at most this times the mean own rows


def memory_limit_is_strict(options: DCPOptions) -> bool:
    """An explicit limit in MB is met or refused; "auto" and "Nx" are best effort."""
    return options.memory_limit != "auto" and own_rows_factor(options.memory_limit) is None


def memory_limits(options: DCPOptions, own: np.ndarray) -> np.ndarray | None:
    """Per-device byte limit of one pass (``DCPOptions.memory_limit``), or None."""
    if options.memory_limit == "none":
        return None
    factor = AUTO_MEMORY_FACTOR if options.memory_limit == "auto" else own_rows_factor(options.memory_limit)
    if factor is not None:  # the same cap on every device (the GPUs of a job have equal memory)
        return np.full(own.size, factor * own.mean())
    return np.full(own.size, float(options.memory_limit) * 1e6)


def pass_total_bytes(bs: BlockSet, pl: Placement, sched: PassSchedule, backward: bool, element_size: int,
                     options: DCPOptions) -> np.ndarray:
    """Every device's memory in one pass from its schedule alone: stores and transfer buffers, as
    ``plan.stats()`` counts them from the compiled programs."""
    return (pass_memory_bytes(bs, pl, sched, backward, element_size, partial_wire(options))
            + pass_buffer_bytes(bs, pl, sched, backward, element_size, options.partial_dtype))


def over_memory_limit(plan: "DCPPlan", element_size: int = 2, stats: PlanStats | None = None) -> bool:
    """Whether a plan's largest device needs more than its ``memory_limit`` (best-effort limits, "auto" and
    "Nx", may be exceeded; the plan searches prefer the plans within them). ``stats``: the plan's statistics
    at ``element_size`` when the caller has them (else computed)."""
    limit = memory_limits(plan.options, own_memory_bytes(plan.blocks, plan.placement, True, element_size))
    if limit is None:
        return False
    stats = stats if stats is not None else plan.stats(element_size)
    return max(stats.memory_bytes) > float(limit.max()) * (1 + 1e-9)


def schedule_within_memory(scheduler: PassScheduler, options: DCPOptions, backward: bool, element_size: int,
                           floor: float = 0.0) -> tuple[PassSchedule, float]:
    """Schedule a pass with ``options.num_stages`` stages; under a memory limit, give the devices over it a
    slot budget (the slot bytes busy at once: a received block is held from the stage before it is needed
    until its result's send completes, :meth:`PassScheduler.schedule`), tightened until every device fits,
    and receive their partial results over more keys (at most two
    blocks' rows per key); if that cannot fit, the same again with re-fetch (a device may hold one side of its
    remote x remote pairs in groups and receive the other side again for every group, :class:`PassScheduler`);
    of schedules that do not fit, the one with the lowest peak is kept. Memory is the stores and the transfer
    buffers. An explicit limit that cannot be met raises :class:`CPError` naming the device; "auto" and "Nx"
    keep that schedule.
    ``floor``: a pass need not fit in less than this (the other pass's peak: a device needs that much anyway).
    Returns the schedule and its largest device's memory (0.0 without a limit, where it is not computed).
    """
    bs, pl = scheduler.bs, scheduler.pl
    n = pl.num_devices
    stages = np.full(n, options.num_stages, dtype=np.int64)
    sched = scheduler.schedule(stages)
    own = own_memory_bytes(bs, pl, backward, element_size)
    limit = memory_limits(options, own)
    if limit is None:
        return sched, 0.0
    limit = np.maximum(limit, floor)
    smallest = min(scheduler.slot_bytes.values())  # a budget under one slot changes nothing

    measured: dict = {}  # id(schedule) -> (schedule, its memory): each schedule is measured once

    def pass_memory(sched: PassSchedule) -> np.ndarray:
        if id(sched) not in measured:
            measured[id(sched)] = (sched, pass_total_bytes(bs, pl, sched, backward, element_size, options))
        return measured[id(sched)][1]

    best, best_peak, first = sched, np.inf, sched
    for refetch in (False, True)[:1 + options.refetch]:  # slot budgets alone, then also blocks received again
        budget = np.full(n, np.inf)
        cap = np.full(n, np.inf)  # rows of partial results a device receives under one key
        for _ in range(12):
            mem = pass_memory(sched)
            if float(mem.max()) < best_peak:
                best, best_peak = sched, float(mem.max())
            over = mem > limit * (1 + 1e-9)
            if not over.any():
                return sched, float(mem.max())
            room = np.maximum(limit - own, 1.0)
            shrink = np.minimum(budget, room) * np.minimum(0.8, room / np.maximum(mem - own, 1.0))
            new = np.where(over, np.maximum(shrink, smallest), budget)
            new_cap = np.where(over, np.minimum(cap, 2.0 * bs.block_size), cap)
            if np.array_equal(new, budget) and np.array_equal(new_cap, cap):
                break
            budget, cap = new, new_cap
            sched = scheduler.schedule(stages, cap, budget, refetch)
        else:  # the last schedule of the loop, not yet measured
            if float(pass_memory(sched).max()) < best_peak:
                best, best_peak = sched, float(pass_memory(sched).max())
        sched = first  # the re-fetch round starts from the unbudgeted schedule again (already measured)
    mem = pass_memory(best)
    over = mem > limit * (1 + 1e-9)
    if over.any() and memory_limit_is_strict(options):
        d = int(np.argmax(mem - limit))
        raise CPError(f"dcp: memory_limit={options.memory_limit} MB cannot be met: device {d} needs "
                      f"{mem[d] / 1e6:.1f} MB in the {'backward' if backward else 'forward'} pass with "
                      f"{best.num_stages} stages (its own rows alone take {own[d] / 1e6:.1f} MB); raise "
                      f"memory_limit, use a smaller block_size or more devices")
    return best, float(mem.max())


def staged_passes(bs: BlockSet, pl: Placement, cost: np.ndarray, options: DCPOptions, element_size: int) -> dict:
    """{backward: schedule} of ``schedule="stages"`` (:class:`PassScheduler`), each within the memory limit
    (:func:`schedule_within_memory`)."""
    b = block_bytes(bs, element_size, options.partial_dtype)
    hier = options.communication == "hierarchical"
    passes = {}
    peak = 0.0  # the backward pass (larger rows) first; the forward need not fit in less than its peak
    for backward, q_in, outs in ((True, b["q_bwd"], {KIND_Q: b["dq"], KIND_KV: b["dkv"]}),
                                 (False, b["q_fwd"], {KIND_Q: b["out_fwd"]})):
        row = row_bytes(bs, backward, element_size)
        scheduler = PassScheduler(bs, pl, cost, q_in, b["kv"], options.inter_node_cost, kv_outputs=backward,
                                  out_bytes=outs, hierarchical=hier,
                                  slot_bytes={kind: bs.block_size * row[kind] for kind in (KIND_Q, KIND_KV)},
                                  result_hold=result_send_hold(partial_wire(options)))
        passes[backward], pass_peak = schedule_within_memory(scheduler, options, backward, element_size, peak)
        if backward:
            peak = pass_peak
    return passes


def ring_passes(bs: BlockSet, pl: Placement, spec: AttentionSpec, topology: Topology, options: DCPOptions,
                element_size: int) -> dict:
    """{backward: schedule} of ``schedule="ring"`` (:mod:`dcp_backend.dcp.ring_schedule`): ring positions are the
    2D zigzag placement's head groups, single devices otherwise. Under a memory limit that the ring with
    crossings received a whole inner sweep early does not meet, crossings are received the stage before they
    are needed; an explicit limit that is still exceeded raises :class:`CPError` ("auto" and "Nx" keep the
    lower peak)."""
    from dcp_backend.dcp.candidates import head_parallel_degree

    group = head_parallel_degree(spec, options, topology) if pl.source == "zigzag2d" else 1
    limit = memory_limits(options, own_memory_bytes(bs, pl, True, element_size))
    best, best_peak, best_mem = None, np.inf, None
    for lead in (None, 1):  # crossings received a whole sweep early, else (over a memory limit) a stage early
        passes = {backward: ring_schedule(bs, pl, backward, group, lead) for backward in (False, True)}
        if limit is None:
            return passes
        mem = np.maximum(*(pass_total_bytes(bs, pl, passes[bw], bw, element_size, options) for bw in (False, True)))
        if float(mem.max()) < best_peak:
            best, best_peak, best_mem = passes, float(mem.max()), mem
        if (mem <= limit * (1 + 1e-9)).all():
            return passes
    if memory_limit_is_strict(options):
        d = int(np.argmax(best_mem - limit))
        raise CPError(f"dcp: memory_limit={options.memory_limit} MB cannot be met with schedule=ring: device "
                      f"{d} needs {best_mem[d] / 1e6:.4g} MB; raise memory_limit or use schedule=stages")
    return best


def plan_from_placement(batch: PackedBatch, spec: AttentionSpec, topology: Topology, options: DCPOptions,
                        bs: BlockSet, cost: np.ndarray, pl: Placement, timings: dict, element_size: int = 2,
                        compile_all: bool = False) -> DCPPlan:
    """Schedule both passes of a placement and wrap it as a plan (programs compiled lazily unless
    ``compile_all``); every placement strategy ends here."""
    t0 = time.perf_counter()
    wire = partial_wire(options)
    if options.schedule == "ring":
        passes = ring_passes(bs, pl, spec, topology, options, element_size)
    else:
        passes = staged_passes(bs, pl, cost, options, element_size)
    fwd, bwd = passes[False], passes[True]
    timings["schedule"] = time.perf_counter() - t0
    layouts, fp, bp = compile_programs(bs, pl, fwd, bwd, eager=compile_all, partial_wire=wire)
    return DCPPlan(batch, spec, topology, options, blocks=bs, placement=pl, fwd=fwd, bwd=bwd, layouts=layouts,
                   fwd_programs=fp, bwd_programs=bp, timings=timings,
                   comp_cost=cost if options.cost_model is None else pair_cost(bs))  # stats: pair-heads
