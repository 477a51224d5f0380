"""Where attention runs: ``world_size`` ranks in nodes of ``devices_per_node`` consecutive ranks.

One :class:`Topology` is the single source of these two facts for planners (placement, statistics,
LoongTrain's window, TE's statistics), executors and the simulator. Planning takes it explicitly
(``get_planner(name).plan(seqlens, spec, topology)``), so plans are made without a process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dcp_backend.errors import CPError


def _positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise CPError(f"topology: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Topology:
    """``devices_per_node=None`` means one node holding every rank."""

    world_size: int
    devices_per_node: int | None = None

    def __post_init__(self) -> None:
        _positive_int("world_size", self.world_size)
        if self.devices_per_node is None:
            object.__setattr__(self, "devices_per_node", int(self.world_size))
        _positive_int("devices_per_node", self.devices_per_node)
        object.__setattr__(self, "world_size", int(self.world_size))
        object.__setattr__(self, "devices_per_node", int(self.devices_per_node))
        if self.world_size % self.devices_per_node:
            raise CPError(
                f"world size {self.world_size} is not a multiple of devices_per_node={self.devices_per_node}: "
                "the world must be nodes x devices_per_node"
            )

    @classmethod
    def grid(cls, nodes: int, devices_per_node: int) -> "Topology":
        _positive_int("nodes", nodes)
        _positive_int("devices_per_node", devices_per_node)
        return cls(int(nodes) * int(devices_per_node), devices_per_node)

    @classmethod
    def of_ranks(cls, world_size: int, devices_per_node: int | None = None) -> "Topology":
        """A topology of ``world_size`` consecutive ranks. Without ``devices_per_node``: torchrun's
        ``LOCAL_WORLD_SIZE`` (ranks per node) when it divides the world, so a group larger than a node
        spans whole nodes and a smaller one sits inside one; else one node."""
        if devices_per_node is None:
            local = os.environ.get("LOCAL_WORLD_SIZE")
            if local and local.isdigit() and int(local) > 0:
                dpn = min(int(local), int(world_size))
                if world_size % dpn == 0:
                    devices_per_node = dpn
        return cls(world_size, devices_per_node)

    @classmethod
    def of_group(cls, global_ranks, ranks_per_node: int) -> "Topology":
        """The topology of a process group whose members are ``global_ranks`` (in group order) of a job
        with ``ranks_per_node`` ranks on every node (torchrun's ``LOCAL_WORLD_SIZE``). Group members on
        one node must be consecutive in group order, and every node must hold the same number of them
        (true of megatron's layouts, where a CP group is strided by the tensor-parallel size)."""
        ranks = [int(r) for r in global_ranks]
        _positive_int("ranks_per_node", ranks_per_node)
        if not ranks:
            raise CPError("topology: a group needs at least one rank")
        nodes = [r // int(ranks_per_node) for r in ranks]
        counts: list[int] = []
        for i, n in enumerate(nodes):
            if i and n == nodes[i - 1]:
                counts[-1] += 1
            elif n in nodes[:i]:
                raise CPError(f"topology: the group's ranks {ranks} return to node {n} after leaving it; the "
                              "ranks of a node must be consecutive in the group")
            else:
                counts.append(1)
        if len(set(counts)) != 1:
            raise CPError(f"topology: the group's ranks {ranks} are spread unevenly over nodes of {ranks_per_node} "
                          f"ranks ({counts} per node); every node must hold the same number")
        return cls(len(ranks), counts[0])

    @property
    def nodes(self) -> int:
        return self.world_size // self.devices_per_node

    def node(self, rank):
        """Node of a rank (or of an array of ranks)."""
        return rank // self.devices_per_node

    def same_node(self, a, b):
        return self.node(a) == self.node(b)
