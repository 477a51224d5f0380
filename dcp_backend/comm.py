"""Communication helpers over ``torch.distributed``: group-local ranks, batched point-to-point exchange,
all-to-all, a cross-rank consistency check, and error wrapping so a dead or diverged peer surfaces as a
:class:`~dcp_backend.spec.CommunicationError` naming the operation (never a silent hang: every wait is
bounded by the process group's timeout).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dcp_backend.spec import CommunicationError, CPError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def backend_name(group=None) -> str:
    return str(dist.get_backend(group)).lower()


def group_timeout(group=None, device: torch.device | str = "cpu"):
    """The timeout of ``group`` (a ``timedelta``), or None when torch does not expose it (then subgroups
    created with it fall back to torch's default)."""
    pg = group if group is not None else dist.group.WORLD
    try:
        return pg._get_backend(torch.device(device)).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _fail(what: str, exc: BaseException) -> CommunicationError:
    rank = dist.get_rank() if is_initialized() else -1
    return CommunicationError(
        f"rank {rank}: {what} failed: a peer died, diverged or timed out "
        f"(process-group timeout). Original error: {type(exc).__name__}: {exc}"
    )


@dataclass
class CommCounters:
    """Bytes this rank sent, per destination (group rank), and seconds spent waiting on transfers."""

    sent_bytes: dict = field(default_factory=dict)
    wait_seconds: float = 0.0

    def add_send(self, peer: int, nbytes: int) -> None:
        self.sent_bytes[peer] = self.sent_bytes.get(peer, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.sent_bytes.values())

    def split(self, my_rank: int, devices_per_node: int) -> tuple[int, int]:
        """(intra-node, inter-node) bytes, nodes being blocks of ``devices_per_node`` consecutive ranks."""
        intra = inter = 0
        for peer, b in self.sent_bytes.items():
            if peer // devices_per_node == my_rank // devices_per_node:
                intra += b
            else:
                inter += b
        return intra, inter

    def reset(self) -> None:
        self.sent_bytes.clear()
        self.wait_seconds = 0.0


@dataclass
class Exchange:
    """A batch of sends and receives launched together with ``batch_isend_irecv``.

    ``peer`` values are ranks *inside* ``group``. Call :meth:`launch` once, then :meth:`wait`.
    """

    group: object = None
    what: str = "point-to-point exchange"
    ops: list = field(default_factory=list)
    _works: list = field(default_factory=list)
    bytes_sent: int = 0
    wait_seconds: float = 0.0

    counters: "CommCounters | None" = None

    def send(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        self.ops.append(dist.P2POp(dist.isend, tensor.contiguous(), global_rank(self.group, peer), self.group, tag))
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_sent += nbytes
        if self.counters is not None:
            self.counters.add_send(peer, nbytes)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        if not tensor.is_contiguous():
            raise CPError("receive buffers must be contiguous")
        self.ops.append(dist.P2POp(dist.irecv, tensor, global_rank(self.group, peer), self.group, tag))

    def launch(self) -> "Exchange":
        if self.ops:
            try:
                self._works = dist.batch_isend_irecv(self.ops)
            except RuntimeError as exc:
                raise _fail(self.what, exc) from exc
        return self

    def wait(self) -> None:
        t0 = time.perf_counter()
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as exc:
            raise _fail(self.what, exc) from exc
        finally:
            dt = time.perf_counter() - t0
            self.wait_seconds += dt
            if self.counters is not None:
                self.counters.wait_seconds += dt
        self._works = []


def all_to_all(output: torch.Tensor, input: torch.Tensor, out_splits, in_splits, group=None,
               what: str = "all-to-all") -> None:
    try:
        dist.all_to_all_single(output, input, list(out_splits), list(in_splits), group=group)
    except RuntimeError as exc:
        raise _fail(what, exc) from exc


def check_same(value: int, group=None, what: str = "value", device: torch.device | str = "cpu") -> None:
    """Raise :class:`CPError` unless every rank of ``group`` passes the same int (one tiny all-reduce)."""
    v = int(value) & ((1 << 62) - 1)
    t = torch.tensor([v, -v], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as exc:
        raise _fail(f"consistency check of {what}", exc) from exc
    if int(t[0]) != v or int(-t[1]) != v:
        raise CPError(
            f"rank {group_rank(group)}: ranks disagree on the {what}; every rank of the group must pass the "
            "same sequence lengths, spec and options, and plans must be deterministic (the inputs differ, or a "
            "rank's planner decided differently, e.g. another DCP placement)"
        )
