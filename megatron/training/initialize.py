"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU), megatron-core's parallel state, and our
context-parallel (CP) and data-parallel (DP) groups. Every group gets the job's timeout, so a rank that
dies or hangs ends the others with an error instead of a hang.

Layout: CP groups are blocks of ``cp`` consecutive ranks (a CP group stays inside a node when ``cp``
divides the ranks per node); DP groups take one rank of each CP group. megatron-core itself runs with
tensor, pipeline and context parallel size 1: CP is done by our core attention, not by megatron.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cp_group: object
    cp_rank: int
    cp_size: int
    dp_group: object
    dp_rank: int
    dp_size: int
    owns_process_group: bool  # we initialised torch.distributed (and tear it down)

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1


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


def build_groups(cp_size: int, timeout_minutes: float, owns: bool) -> DistEnv:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cp_size:
        raise ValueError(f"context-parallel size {cp_size} does not divide the world size {world}")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
            distributed_timeout_minutes=max(1, math.ceil(timeout_minutes)))
    dp_size = world // cp_size
    cp_group = dp_group = None
    if dp_size == world:
        dp_group = dist.group.WORLD
    # Every rank must create every group, in the same order. Each CP group gets a second communicator
    # over the same ranks (registered with dcp_backend.comm), so transfers that must overlap each other
    # (LoongTrain's outer ring beside its inner ring) run on separate NCCL streams.
    from dcp_backend import comm

    for d in range(dp_size):
        ranks = list(range(d * cp_size, (d + 1) * cp_size))
        g = dist.group.WORLD if cp_size == world else dist.new_group(ranks, timeout=timeout)
        companion = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            cp_group = g
            comm.register_companion_group(g, companion)
    if dp_group is None:
        for c in range(cp_size):
            ranks = list(range(c, world, cp_size))
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group = g
    use_cuda = dist.get_backend() == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return DistEnv(rank, world, local_rank, device, cp_group, rank % cp_size, cp_size, dp_group,
                   rank // cp_size, dp_size, owns)


def teardown(env: DistEnv | None) -> None:
    from megatron.core import parallel_state

    from dcp_backend import comm

    comm.forget_companion_groups()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if env is not None and env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
