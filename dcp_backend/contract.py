"""The contract every CP backend implements, in two layers, and the convenience layer over both.

* **Planning** (pure CPU: no process group, no GPU library): a :class:`Planner`, built from the backend's
  validated options, turns ``(seqlens, spec, Topology)`` into a deterministic :class:`Plan`. Data-loader
  workers, dry runs and the simulator use this layer (``get_planner(name, **options)``).
* **Running**: an :class:`Executor`, bound to a process group and a block kernel, runs a plan's attention
  for its rank, differentiably.
* :class:`CPBackend` (``get_backend(name, group=None, **options)``) holds one of each and the topology:
  ``backend.plan(seqlens, spec)`` and ``backend.attention(q, k, v, plan)``.

The base classes own every input check, so all backends fail the same way; subclasses fill
``Planner._make_plan`` and ``Executor._attention``. Options are frozen dataclasses validated at
construction (``__post_init__``), whose fields carry their help text (``option(...)``): the launcher turns
each field into a flag.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from dcp_backend import comm
from dcp_backend.batch import PackedBatch
from dcp_backend.errors import CPError
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology


# ------------------------------------------------------------------------------------------ options

def option(default, help: str, **kwargs):
    """A field of an options dataclass with its help text (which becomes the launcher flag's help)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options: frozen and validated at construction (``__post_init__`` calls
    :meth:`validate`), so neither direct construction nor ``dataclasses.replace`` can skip a check.
    Subclasses add fields with :func:`option` and extend :meth:`validate`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CPError` naming the bad option; subclasses call ``super().validate()``."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def help(cls, name: str) -> str:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}[name]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def positive_int(owner: str, name: str, value, allow_none: bool = False) -> None:
    """Raise unless ``value`` is a positive int (or None when allowed): the check most options need."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CPError(f"{owner} option {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class KernelOptions(BackendOptions):
    """Options of backends that run the library's block kernel."""

    kernel: str = option("auto", "block kernel: auto (cpu_flash on CPU; on CUDA flash where flash-attn is installed, "
                                 "else flex), cpu_flash, flex, flash (flash-attn for full and causal segments, flex "
                                 "for the rest) or reference (see dcp_backend.kernels)")

    def validate(self) -> None:
        super().validate()
        from dcp_backend.kernels import available_kernels

        if self.kernel != "auto" and self.kernel not in available_kernels():
            raise CPError(f"unknown kernel {self.kernel!r}; available: auto, {', '.join(available_kernels())}")


# ---------------------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class PlanStats:
    """Cost figures of a plan, comparable across backends (bytes, pairs, tokens per rank)."""

    backend_name: str
    world_size: int
    nodes: int
    devices_per_node: int
    fwd_inter_node_bytes: int
    fwd_intra_node_bytes: int
    bwd_inter_node_bytes: int
    bwd_intra_node_bytes: int
    compute_pair_heads: tuple[int, ...]  # per rank: unmasked (q, k) pairs x query heads it computes
    tokens: tuple[int, ...]  # tokens held per rank
    memory_bytes: tuple[int, ...]  # per rank: attention inputs/outputs held plus peak transfer buffers, the
    # larger of the forward and the backward pass (both in extra["fwd/bwd_memory_bytes_per_rank"] where known)
    extra: dict | None = None

    @classmethod
    def from_traffic(cls, backend_name: str, world_size: int, devices_per_node: int, fwd, bwd, compute, tokens,
                     memory, extra: dict | None = None) -> "PlanStats":
        """Statistics from the bytes each rank sends, ``fwd`` / ``bwd`` of shape [ranks, 2] (column 0 inside its
        node, column 1 across nodes); each rank's totals also go to ``extra["fwd/bwd_bytes_per_rank"]``."""
        fwd, bwd = np.asarray(fwd), np.asarray(bwd)
        extra = {**(extra or {}), "fwd_bytes_per_rank": fwd.sum(1).astype(np.int64).tolist(),
                 "bwd_bytes_per_rank": bwd.sum(1).astype(np.int64).tolist()}
        return cls(
            backend_name=backend_name, world_size=world_size, nodes=world_size // devices_per_node,
            devices_per_node=devices_per_node,
            fwd_inter_node_bytes=int(fwd[:, 1].sum()), fwd_intra_node_bytes=int(fwd[:, 0].sum()),
            bwd_inter_node_bytes=int(bwd[:, 1].sum()), bwd_intra_node_bytes=int(bwd[:, 0].sum()),
            compute_pair_heads=tuple(int(c) for c in compute), tokens=tuple(int(t) for t in tokens),
            memory_bytes=tuple(int(m) for m in memory), extra=extra)

    @property
    def compute_imbalance(self) -> float:
        c = np.asarray(self.compute_pair_heads, dtype=np.float64)
        return float(c.max() / c.mean()) if c.mean() > 0 else 1.0

    @property
    def memory_imbalance(self) -> float:
        t = np.asarray(self.tokens, dtype=np.float64)
        return float(t.max() / t.mean()) if t.mean() > 0 else 1.0

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["compute_pair_heads"] = list(self.compute_pair_heads)
        d["tokens"] = list(self.tokens)
        d["memory_bytes"] = list(self.memory_bytes)
        d["max_device_memory_bytes"] = max(self.memory_bytes)
        d["compute_imbalance"] = self.compute_imbalance
        d["memory_imbalance"] = self.memory_imbalance
        d.update(self.extra or {})
        return d


# ----------------------------------------------------------------------------------------------- plan

class Plan:
    """What a backend decided for one batch on one topology. Deterministic and rank-independent."""

    def __init__(self, backend_name: str, batch: PackedBatch, spec: AttentionSpec, topology: Topology,
                 options: BackendOptions):
        self.backend_name = backend_name
        self.batch = batch
        self.spec = spec
        self.topology = topology
        self.options = options

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def devices_per_node(self) -> int:
        return self.topology.devices_per_node

    @property
    def seqlens(self) -> np.ndarray:
        return self.batch.seqlens

    def local_indices(self, rank: int) -> torch.Tensor:
        """Global packed-token indices held by ``rank`` (1-D int64), in local storage order."""
        self._check_rank(rank)
        return torch.from_numpy(self._local_indices(rank))

    def num_local_tokens(self, rank: int) -> int:
        self._check_rank(rank)
        return int(self._local_indices(rank).size)

    def _local_indices(self, rank: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, rank: int, device: str = "cpu") -> "Plan":
        """Build ``rank``'s execution state on the host now (index tables, compiled programs, the block
        kernel's tables for a ``device`` of this type), so that a planning worker pays for it instead of
        the first attention layer, which then only uploads. Idempotent; returns the plan."""
        self._check_rank(rank)
        return self

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise CPError(f"rank must be in [0, {self.world_size}) for this plan, got {rank!r}")

    def stats(self, element_size: int = 2) -> PlanStats:  # pragma: no cover - interface
        raise NotImplementedError

    @cached_property
    def fingerprint(self) -> int:
        """Identity of (backend, lengths, spec, topology, options) and of what the backend decided from
        them (:meth:`_fingerprint_extra`); equal on every rank for one batch. ``attention`` compares it
        across ranks once per plan, so ranks that disagree fail at once instead of hanging."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.backend_name.encode())
        h.update(self.batch.seqlens.tobytes())
        h.update(repr(self.spec.key()).encode())
        h.update(repr((self.world_size, self.devices_per_node, sorted(self.options.as_dict().items()))).encode())
        h.update(self._fingerprint_extra())
        return int.from_bytes(h.digest(), "little")

    def _fingerprint_extra(self) -> bytes:
        """Bytes of the decisions a plan made beyond its inputs, for backends whose plan is not a pure
        function of the inputs' hash (a solver's placement): a rank that planned differently then fails
        the fingerprint check. Empty for plans that follow from the inputs by fixed rules."""
        return b""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(docs={self.batch.num_docs}, tokens={self.batch.total_tokens}, "
                f"world_size={self.world_size})")


# ---------------------------------------------------------------------------------------- planning

class Planner:
    """Plans batches for one backend: ``plan(seqlens, spec, topology)``, pure CPU."""

    name: ClassVar[str] = "abstract"
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: BackendOptions | None = None):
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise CPError(f"{self.name}: options must be {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    def plan(self, seqlens, spec: AttentionSpec, topology: Topology) -> Plan:
        if not isinstance(spec, AttentionSpec):
            raise CPError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
        if not isinstance(topology, Topology):
            raise CPError(f"topology must be a dcp_backend.Topology, got {type(topology).__name__}")
        batch = PackedBatch.from_seqlens(seqlens)
        self.check_spec(spec, topology)
        return self._make_plan(batch, spec, topology)

    def check_spec(self, spec: AttentionSpec, topology: Topology) -> None:
        """Backend-specific checks of a spec on a topology (heads divisible by a degree, masks, ...)."""

    def _make_plan(self, batch: PackedBatch, spec: AttentionSpec, topology: Topology) -> Plan:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- running

class Executor:
    """Runs plans of one backend for this rank of ``group`` (None = WORLD) with block kernel ``kernel``."""

    name: ClassVar[str] = "abstract"
    PlanType: ClassVar[type[Plan]] = Plan

    def __init__(self, group=None, kernel: str = "auto"):
        self.group = group
        self.kernel_name = kernel
        self._verified: set[int] = set()
        self.counters = comm.CommCounters()  # bytes this rank sent (per peer) and time spent waiting

    def kernel(self, device: torch.device):
        from dcp_backend.kernels import get_kernel

        return get_kernel(self.kernel_name, device)

    @property
    def world_size(self) -> int:
        self._require_group()
        return comm.group_size(self.group)

    @property
    def rank(self) -> int:
        self._require_group()
        return comm.group_rank(self.group)

    def _require_group(self) -> None:
        if not comm.is_initialized():
            raise CPError(f"{self.name}: attention needs an initialised torch.distributed process group")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
        self._check_inputs(q, k, v, plan)
        if plan.fingerprint not in self._verified:
            comm.check_same(plan.fingerprint, self.group, f"{self.name} plan", device=self._flag_device(q))
            self._verified.add(plan.fingerprint)
            if len(self._verified) > 4096:
                self._verified.clear()
        return self._attention(q, k, v, plan)

    def _attention(self, q, k, v, plan):  # pragma: no cover - interface
        raise NotImplementedError

    def _flag_device(self, q: torch.Tensor) -> torch.device:
        return q.device if comm.backend_name(self.group) == "nccl" else torch.device("cpu")

    def _check_inputs(self, q, k, v, plan) -> None:
        if not isinstance(plan, self.PlanType) or getattr(plan, "backend_name", None) != self.name:
            made_by = getattr(plan, "backend_name", type(plan).__name__)
            raise CPError(f"{self.name}: got a plan made by {made_by!r}; pass a plan made by this backend's plan()")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise CPError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise CPError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise CPError(f"{name} has dtype {t.dtype}; use float32 or bfloat16 (float64 for tests)")
        if not (q.dtype == k.dtype == v.dtype):
            raise CPError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise CPError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if plan.world_size != self.world_size:
            raise CPError(
                f"{self.name}: plan was made for {plan.world_size} ranks but the group has {self.world_size}"
            )
        rank = self.rank
        n = plan.num_local_tokens(rank)
        spec = plan.spec
        if q.shape != (n, spec.num_heads, spec.head_dim):
            raise CPError(
                f"{self.name} rank {rank}: q must be [{n}, {spec.num_heads}, {spec.head_dim}] "
                f"(len(plan.local_indices({rank})), num_heads, head_dim), got {tuple(q.shape)}"
            )
        for name, t in (("k", k), ("v", v)):
            if t.shape != (n, spec.num_kv_heads, spec.head_dim):
                raise CPError(
                    f"{self.name} rank {rank}: {name} must be [{n}, {spec.num_kv_heads}, {spec.head_dim}], "
                    f"got {tuple(t.shape)}"
                )
        if comm.backend_name(self.group) == "nccl" and q.device.type != "cuda":
            raise CPError(f"{self.name}: the process group uses NCCL but q is on {q.device}; move it to CUDA")


# ------------------------------------------------------------------------------------- convenience

class CPBackend:
    """A planner, an executor and a topology: what ``get_backend`` returns.

    The topology is the one given, else the process group's size (one node, or ``devices_per_node``);
    without a process group, ``world_size`` must be given (planning in a data-loader worker).
    """

    name: ClassVar[str] = "abstract"
    Planner: ClassVar[type[Planner]] = Planner
    Executor: ClassVar[type[Executor]] = Executor

    def __init__(self, group=None, options: BackendOptions | None = None, topology: Topology | None = None, *,
                 world_size: int | None = None, devices_per_node: int | None = None):
        self.group = group
        self.planner = self.Planner(options)
        self.executor = self.Executor(group, getattr(self.planner.options, "kernel", "auto"))
        if topology is not None and (world_size is not None or devices_per_node is not None):
            raise CPError("pass a topology or world_size/devices_per_node, not both")
        if topology is None and world_size is not None:
            topology = Topology(world_size, devices_per_node)
        elif devices_per_node is not None:
            Topology(devices_per_node, devices_per_node)  # validate the value now
        self._topology = topology
        self._devices_per_node = devices_per_node

    # the registry and the launcher read the options class from the backend class
    @classmethod
    def options_class(cls) -> type[BackendOptions]:
        return cls.Planner.Options

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`~dcp_backend.errors.BackendUnavailableError` if this backend cannot *run* here
        (planning always can)."""

    @property
    def options(self) -> BackendOptions:
        return self.planner.options

    @property
    def counters(self) -> comm.CommCounters:
        return self.executor.counters

    @property
    def topology(self) -> Topology:
        if comm.is_initialized():
            n = comm.group_size(self.group)
            if self._topology is not None:
                if self._topology.world_size != n:
                    raise CPError(
                        f"{self.name}: world_size={self._topology.world_size} does not match the process group size "
                        f"{n}; drop it or pass the right group"
                    )
                return self._topology
            return Topology(n, self._devices_per_node)
        if self._topology is None:
            raise CPError(
                f"{self.name}: no process group is initialised; pass world_size=N (or a Topology) to get_backend "
                "to plan without one"
            )
        return self._topology

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def rank(self) -> int:
        return self.executor.rank

    def plan(self, seqlens, spec: AttentionSpec) -> Plan:
        return self.planner.plan(seqlens, spec, self.topology)

    def check_spec(self, spec: AttentionSpec) -> None:
        self.planner.check_spec(spec, self.topology)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
        return self.executor.attention(q, k, v, plan)
