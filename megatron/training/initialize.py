"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU) and megatron-core's parallel state, which
is the one source of the layout (tensor x context x data x pipeline parallel, Megatron-LM's rank order
``tp-cp-ep-dp-pp``: tensor-parallel ranks are innermost, so a context-parallel group is strided by the
tensor-parallel size). Every group gets the job's timeout, so a rank that dies or hangs ends the others
with an error instead of a hang.

The CP backend of a rank runs over megatron's context-parallel group of that rank
(``parallel_state.get_context_parallel_group()``) on the rank's local heads; its :class:`Topology`
(nodes of consecutive group members) comes from the group's global ranks and torchrun's
``LOCAL_WORLD_SIZE`` (:func:`cp_group_ranks`, :func:`cp_topology`), and every CP group gets a companion
communicator over the same ranks (``dcp_backend.comm.register_companion_group``), so transfers that must
overlap (LoongTrain's outer ring beside its inner ring) run on separate NCCL streams.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import dcp_backend as cp

ORDER = "tp-cp-ep-dp-pp"  # megatron-core's default rank order (Megatron-LM's too)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_group: object
    cp_rank: int
    cp_size: int
    cp_ranks: list  # global ranks of this rank's CP group, in group order
    dp_rank: int  # data-parallel replica (the data shard); CP ranks of a replica share it
    dp_size: int
    dp_cp_group: object  # gradients are reduced over data x context parallel ranks
    owns_process_group: bool  # we initialised torch.distributed (and tear it down)

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1


def _rank_generator(world: int, tp: int, pp: int, cp_size: int):
    from megatron.core.parallel_state import RankGenerator

    return RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp_size), pp=pp, cp=cp_size, order=ORDER)


def cp_group_ranks(world: int, tp: int, pp: int, cp_size: int, rank: int = 0) -> list[int]:
    """Global ranks of the context-parallel group that holds ``rank`` (megatron's layout; no process
    group needed)."""
    for ranks in _rank_generator(world, tp, pp, cp_size).get_ranks("cp"):
        if rank in ranks:
            return list(ranks)
    raise ValueError(f"rank {rank} is not in a world of {world} ranks")


def ranks_per_node(world: int) -> int:
    """torchrun's ``LOCAL_WORLD_SIZE`` (ranks per node); the whole world when unset or not a divisor."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0 and world % int(local) == 0:
        return int(local)
    return world


def cp_topology(world: int, tp: int, pp: int, cp_size: int, devices_per_node: int | None = None) -> cp.Topology:
    """The CP topology: ``devices_per_node`` when given (--cp-devices-per-node), else the nodes of a CP
    group's members in a job of ``ranks_per_node(world)`` ranks per node. Every CP group has the same
    shape in megatron's layout, so the group of rank 0 stands for all."""
    if devices_per_node is not None:
        return cp.Topology(cp_size, devices_per_node)
    return cp.Topology.of_group(cp_group_ranks(world, tp, pp, cp_size), ranks_per_node(world))


def init_process_group(backend: str, timeout_minutes: float) -> bool:
    """Initialise torch.distributed from the torchrun environment; False if it already was."""
    if dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("--distributed-backend nccl needs CUDA; this machine has none (use gloo)")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.setdefault(var, {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": "29500"}[var])
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def build_groups(tp: int, pp: int, cp_size: int, timeout_minutes: float, owns: bool) -> DistEnv:
    """megatron-core's parallel state for this layout, plus a companion communicator per CP group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % (tp * pp * cp_size):
        raise ValueError(f"tensor ({tp}) x pipeline ({pp}) x context ({cp_size}) parallel sizes do not divide "
                         f"the world size {world}")
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp_size,
            distributed_timeout_minutes=max(1, math.ceil(timeout_minutes)), order=ORDER,
            create_gloo_process_groups=False)
    # Every rank creates every companion group, in the same order.
    from dcp_backend import comm

    timeout = datetime.timedelta(minutes=timeout_minutes)
    cp_group = ps.get_context_parallel_group()
    if cp_size > 1:
        for ranks in _rank_generator(world, tp, pp, cp_size).get_ranks("cp"):
            companion = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                comm.register_companion_group(cp_group, companion)
    use_cuda = dist.get_backend() == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp,
        cp_group=cp_group, cp_rank=ps.get_context_parallel_rank(), cp_size=cp_size,
        cp_ranks=list(ps.get_context_parallel_global_ranks()),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True), owns_process_group=owns)


def layout_line(env: DistEnv, topology: cp.Topology) -> str:
    return (f"> parallel layout: world {env.world_size} = tensor {env.tp_size} x context {env.cp_size} x "
            f"data {env.dp_size} x pipeline {env.pp_size} (megatron-core order {ORDER}); this rank's CP group "
            f"{env.cp_ranks} = {topology.nodes} node(s) x {topology.devices_per_node}")


def teardown(env: DistEnv | None) -> None:
    from megatron.core import parallel_state

    from dcp_backend import comm

    comm.forget_companion_groups()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if env is not None and env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
