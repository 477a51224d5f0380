"""Communication helpers over ``torch.distributed``: group-local ranks, batched point-to-point exchange,
all-to-all, a cross-rank consistency check, and error wrapping so a dead or diverged peer surfaces as a
:class:`~dcp_backend.spec.CommunicationError` naming the operation (never a silent hang: every wait is
bounded by the process group's timeout).

Every transfer of the library goes through this module, so it can also *record* them: inside
:func:`record_trace` each launch (a batch of point-to-point operations or a collective) and each wait is
appended to a per-rank :class:`CommTrace`, which :mod:`dcp_backend.comm_order` replays under NCCL's
ordering rules. :func:`companion_group` gives a second communicator over a group's ranks for transfers
that must overlap another stream of transfers (LoongTrain's outer ring).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dcp_backend.errors import CommunicationError, CPError


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


# ------------------------------------------------------------------------------------ tracing

@dataclass
class CommTrace:
    """One rank's communication in program order. Events (plain tuples, picklable):

    * ``("p2p", call, group, what, ops)``: a launched batch; ``ops`` = ``[(kind, peer, tag, nbytes)]`` with
      kind ``"send"``/``"recv"`` and ``peer`` a *global* rank;
    * ``("collective", call, group, what, op)``: a collective (``op`` e.g. ``"all_reduce"``);
    * ``("wait", call)``: the host (or, under NCCL, the current stream) waits for call ``call``.

    ``group`` is ``(name, global ranks)``: the same string on every member of one process group.
    """

    rank: int
    events: list = field(default_factory=list)
    _calls: int = 0

    def new_call(self) -> int:
        self._calls += 1
        return self._calls - 1


_TRACE: CommTrace | None = None


@contextlib.contextmanager
def record_trace():
    """Record this rank's communication inside the ``with`` block; yields the :class:`CommTrace`."""
    global _TRACE
    previous = _TRACE
    _TRACE = CommTrace(dist.get_rank() if is_initialized() else 0)
    try:
        yield _TRACE
    finally:
        _TRACE = previous


def group_key(group=None) -> tuple:
    """``(name, global ranks)`` of a process group, equal on all its members."""
    pg = group if group is not None else dist.group.WORLD
    return (str(getattr(pg, "group_name", "")), tuple(dist.get_process_group_ranks(pg)))


def _record_collective(group, what: str, op: str) -> None:
    if _TRACE is not None:
        call = _TRACE.new_call()
        _TRACE.events.append(("collective", call, group_key(group), what, op))
        _TRACE.events.append(("wait", call))


# ------------------------------------------------------------------------- second communicators

_COMPANIONS: dict = {}


def register_companion_group(group, companion) -> None:
    """Declare ``companion`` a second process group over exactly the ranks of ``group`` (created by the
    caller on every rank, in the same order, e.g. next to the CP groups at start-up)."""
    if group_key(group)[1] != group_key(companion)[1]:
        raise CPError("a companion group must have exactly the ranks of its group")
    _COMPANIONS[group_key(group)] = companion


def forget_companion_groups() -> None:
    """Drop every registered or created companion (call when the process groups are torn down)."""
    _COMPANIONS.clear()


def companion_group(group=None):
    """A second communicator over the ranks of ``group``, so that two streams of transfers overlap under
    NCCL (one stream per communicator). A registered companion if there is one; for WORLD, one created
    here on first use (every rank is a member and reaches this call at the same point of the same
    backend call); otherwise ``group`` itself, which is correct but serialises both streams."""
    key = group_key(group)
    if key not in _COMPANIONS:
        if group is not None and group is not dist.group.WORLD:
            return group
        try:
            _COMPANIONS[key] = dist.new_group(timeout=group_timeout(None))
        except RuntimeError as exc:
            raise _fail("creating a second communicator over WORLD", exc) from exc
    return _COMPANIONS[key]


# ------------------------------------------------------------------------------------ counters

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
    _desc: list = field(default_factory=list)  # (kind, global peer, tag, nbytes) per op, for traces
    _call: int | None = None

    def send(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        peer_g = global_rank(self.group, peer)
        self.ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer_g, self.group, tag))
        nbytes = tensor.numel() * tensor.element_size()
        self._desc.append(("send", peer_g, tag, nbytes))
        self.bytes_sent += nbytes
        if self.counters is not None:
            self.counters.add_send(peer, nbytes)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        if not tensor.is_contiguous():
            raise CPError("receive buffers must be contiguous")
        peer_g = global_rank(self.group, peer)
        self.ops.append(dist.P2POp(dist.irecv, tensor, peer_g, self.group, tag))
        self._desc.append(("recv", peer_g, tag, tensor.numel() * tensor.element_size()))

    def launch(self) -> "Exchange":
        if self.ops:
            if _TRACE is not None:
                self._call = _TRACE.new_call()
                _TRACE.events.append(("p2p", self._call, group_key(self.group), self.what, list(self._desc)))
            try:
                self._works = dist.batch_isend_irecv(self.ops)
            except RuntimeError as exc:
                raise _fail(self.what, exc) from exc
        return self

    def wait(self) -> None:
        if self._call is not None and _TRACE is not None:
            _TRACE.events.append(("wait", self._call))
            self._call = None
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
    _record_collective(group, what, "all_to_all")
    try:
        dist.all_to_all_single(output, input, list(out_splits), list(in_splits), group=group)
    except RuntimeError as exc:
        raise _fail(what, exc) from exc


def check_same(value: int, group=None, what: str = "value", device: torch.device | str = "cpu") -> None:
    """Raise :class:`CPError` unless every rank of ``group`` passes the same int (one tiny all-reduce)."""
    v = int(value) & ((1 << 62) - 1)
    t = torch.tensor([v, -v], dtype=torch.int64, device=device)
    _record_collective(group, f"consistency check of {what}", "all_reduce")
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
