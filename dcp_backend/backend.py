"""The contract every CP backend implements: `CPBackend`, `Plan`, common options and input checks.

A backend turns the document lengths of a batch into a deterministic :class:`Plan` (pure CPU work, no
process group needed, so data-loader workers can plan ahead), and runs attention for one rank's share
of the tokens, differentiably. Subclasses implement ``_make_plan`` and ``_attention``; this base class
owns option handling, world-size resolution and every input check, so all backends fail the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from dcp_backend import comm
from dcp_backend.batch import PackedBatch
from dcp_backend.spec import AttentionSpec
from dcp_backend.errors import CPError


@dataclass(frozen=True)
class BackendOptions:
    """Options every backend accepts. Subclasses add their own fields and extend :meth:`validate`.

    world_size: ranks to plan for when no process group exists (planning in data-loader workers);
        when a group exists it must equal the group size.
    kernel: block kernel name (``auto`` picks by device; see :mod:`dcp_backend.kernels`).
    """

    world_size: int | None = None
    kernel: str = "auto"

    def validate(self) -> None:
        if self.world_size is not None and (not isinstance(self.world_size, int) or self.world_size < 1):
            raise CPError(f"world_size must be a positive int, got {self.world_size!r}")
        from dcp_backend.kernels import available_kernels

        if self.kernel != "auto" and self.kernel not in available_kernels():
            raise CPError(f"unknown kernel {self.kernel!r}; available: auto, {', '.join(available_kernels())}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class PlanStats:
    """Cost figures of a plan, comparable across backends (bytes, pairs, tokens per rank)."""

    backend: str
    world_size: int
    nodes: int
    devices_per_node: int
    fwd_inter_node_bytes: int
    fwd_intra_node_bytes: int
    bwd_inter_node_bytes: int
    bwd_intra_node_bytes: int
    compute_pair_heads: tuple[int, ...]  # per rank: unmasked (q, k) pairs x query heads it computes
    tokens: tuple[int, ...]  # tokens held per rank
    memory_bytes: tuple[int, ...]  # per rank: attention inputs/outputs held plus peak transfer buffers
    extra: dict | None = None

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


class Plan:
    """What a backend decided for one batch. Deterministic and rank-independent."""

    backend: str = "abstract"

    def __init__(self, batch: PackedBatch, spec: AttentionSpec, world_size: int, options: BackendOptions):
        self.batch = batch
        self.spec = spec
        self.world_size = world_size
        self.options = options

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

    def stats(self) -> PlanStats:  # pragma: no cover - interface
        raise NotImplementedError

    @cached_property
    def fingerprint(self) -> int:
        """Identity of (backend, lengths, spec, world size, options) and of what the backend decided from
        them (:meth:`_fingerprint_extra`); equal on every rank for one batch. ``attention`` compares it
        across ranks once per plan, so ranks that disagree fail at once instead of hanging."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.backend.encode())
        h.update(self.batch.seqlens.tobytes())
        h.update(repr(self.spec.key()).encode())
        h.update(repr((self.world_size, sorted(vars(self.options).items()))).encode())
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


class CPBackend:
    """Base class of all backends. ``Options`` is the backend's options dataclass."""

    name: ClassVar[str] = "abstract"
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    PlanType: ClassVar[type[Plan]] = Plan

    def __init__(self, group=None, options: BackendOptions | None = None):
        self.group = group
        self.options = options if options is not None else self.Options()
        self.options.validate()
        self._verified: set[int] = set()
        self.counters = comm.CommCounters()  # bytes this rank sent (per peer) and time spent waiting

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`~dcp_backend.spec.BackendUnavailableError` if this backend cannot run here."""

    # ------------------------------------------------------------------ topology
    @property
    def world_size(self) -> int:
        if comm.is_initialized():
            n = comm.group_size(self.group)
            if self.options.world_size is not None and self.options.world_size != n:
                raise CPError(
                    f"{self.name}: option world_size={self.options.world_size} does not match the process "
                    f"group size {n}; drop the option or pass the right group"
                )
            return n
        if self.options.world_size is None:
            raise CPError(
                f"{self.name}: no process group is initialised; pass world_size=N to get_backend to plan "
                "without one"
            )
        return self.options.world_size

    @property
    def rank(self) -> int:
        if not comm.is_initialized():
            raise CPError(f"{self.name}: attention needs an initialised torch.distributed process group")
        return comm.group_rank(self.group)

    # ------------------------------------------------------------------ contract
    def plan(self, seqlens, spec: AttentionSpec) -> Plan:
        if not isinstance(spec, AttentionSpec):
            raise CPError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
        batch = PackedBatch.from_seqlens(seqlens)
        self.check_spec(spec)
        return self._make_plan(batch, spec, self.world_size)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
        self._check_inputs(q, k, v, plan)
        if plan.fingerprint not in self._verified:
            comm.check_same(plan.fingerprint, self.group, f"{self.name} plan", device=self._flag_device(q))
            self._verified.add(plan.fingerprint)
            if len(self._verified) > 4096:
                self._verified.clear()
        return self._attention(q, k, v, plan)

    # ------------------------------------------------------------------ hooks
    def check_spec(self, spec: AttentionSpec) -> None:
        """Backend-specific spec checks (heads divisible by a degree, supported masks, ...)."""

    def _make_plan(self, batch: PackedBatch, spec: AttentionSpec, world_size: int) -> Plan:  # pragma: no cover
        raise NotImplementedError

    def _attention(self, q, k, v, plan):  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def _flag_device(self, q: torch.Tensor) -> torch.device:
        return q.device if comm.backend_name(self.group) == "nccl" else torch.device("cpu")

    def _check_inputs(self, q, k, v, plan) -> None:
        if not isinstance(plan, self.PlanType) or getattr(plan, "backend", None) != self.name:
            made_by = getattr(plan, "backend", type(plan).__name__)
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
