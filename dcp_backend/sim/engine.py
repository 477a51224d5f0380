"""The simulator's discrete-event engine: per-rank programs of compute, message launches and waits.

A rank runs its ops in order on one compute stream:

* ``Compute(seconds)`` keeps the rank busy (on a shared CPU host, ranks computing at once share the
  host's cores with each other and with other jobs: each progresses at
  ``min(1, cores / (computing ranks + background threads))``);
* ``Launch(handle, sends, recvs)`` posts messages without blocking (a batched isend/irecv);
* ``Wait(handle)`` blocks until every message of that launch (sent or received) has arrived.

A message starts when both its sender and its receiver have posted it. Each link (a device's intra-node
egress/ingress port, a NIC's egress/ingress) serves messages first come, first served at its bandwidth;
a message arrives when its last link has carried it, plus the path latency. Links are work conserving,
so a burst of messages sharing a link takes its total bytes over the bandwidth, as under fair sharing,
while each message's own finish time is known when it starts (no later message can delay it).

Every op's start and end are recorded per rank; :meth:`Result.critical_path` walks back from the rank
that finishes last through computes, waits and the messages (and the posts that started them) that
ended each wait.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from dcp_backend.sim.network import Links
from dcp_backend.errors import CPError


@dataclass(eq=False)
class Compute:
    seconds: float
    label: str = "compute"


@dataclass(eq=False)
class Launch:
    handle: object
    sends: list  # [(flow id, dst rank, bytes)]
    recvs: list  # [(flow id, src rank)]


@dataclass(eq=False)
class Wait:
    handle: object
    label: str = "wait"


@dataclass(eq=False)
class _Flow:
    fid: object
    src: int
    dst: int
    nbytes: float | None = None
    post: dict = field(default_factory=dict)  # rank -> post time
    start: float | None = None
    finish: float | None = None
    queued: float = 0.0  # time spent waiting for busy links


@dataclass
class Span:
    kind: str  # "compute" or "wait"
    label: str
    start: float
    end: float
    cause: object = None  # wait: the flow whose arrival ended it (None: ended at once)


@dataclass
class Result:
    """Timeline of one simulated pass."""

    world_size: int
    finish: np.ndarray  # per rank
    compute: np.ndarray  # seconds of compute per rank (at full speed)
    waited: np.ndarray  # seconds blocked in waits per rank
    spans: list  # per rank: [Span]
    flows: dict
    bytes_sent: np.ndarray

    @property
    def time(self) -> float:
        return float(self.finish.max()) if self.finish.size else 0.0

    def critical_path(self) -> list[tuple]:
        """[(rank, kind, label, start, end)], latest first: the chain that sets :attr:`time`."""
        if not self.finish.size:
            return []
        r = int(np.argmax(self.finish))
        path = []
        idx = len(self.spans[r]) - 1
        t = self.time
        guard = 0
        while idx >= 0 and guard < 100000:
            guard += 1
            sp = self.spans[r][idx]
            if sp.end < t - 1e-12 and sp.end <= sp.start:
                idx -= 1
                continue
            path.append((r, sp.kind, sp.label, sp.start, sp.end))
            if sp.kind == "wait" and sp.cause is not None:
                f = self.flows[sp.cause]
                path.append((f.src, "message", f"{f.fid}", f.start, f.finish))
                # the message started when its later endpoint posted it
                poster = max(f.post, key=lambda k: f.post[k])
                t = f.post[poster]
                r = poster
                idx = _span_at(self.spans[r], t)
                continue
            t = sp.start
            idx -= 1
        return path

    def critical_summary(self) -> dict:
        comp = msg = idle = 0.0
        for _, kind, _, s, e in self.critical_path():
            if kind == "compute":
                comp += e - s
            elif kind == "message":
                msg += e - s
        idle = max(0.0, self.time - comp - msg)
        return {"compute": comp, "communication": msg, "other": idle}


def _span_at(spans: list, t: float) -> int:
    """Index of the last span ending at or before ``t`` (the op that preceded a post at time ``t``)."""
    lo, hi = 0, len(spans)
    ends = [s.end for s in spans]
    while lo < hi:
        mid = (lo + hi) // 2
        if ends[mid] <= t + 1e-12:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@dataclass(eq=False)
class _Rank:
    """One rank's state in a run: its program counter and what it is doing."""

    program: list
    pc: int = 0
    state: str = "ready"  # ready | compute | blocked | timer | done
    remaining: float = 0.0  # compute seconds left (at full speed)
    comp_start: float = 0.0
    wait_since: float = 0.0
    wait_cause: object = None
    compute: float = 0.0
    waited: float = 0.0
    bytes_sent: float = 0.0
    spans: list = field(default_factory=list)

    @property
    def op(self):
        return self.program[self.pc]


class _Engine:
    """State and phases of one :func:`run`: ranks, flows, links and timers at the current time."""

    def __init__(self, programs: list[list], links: Links, cores, background: float, speed: float):
        self.ranks = [_Rank(p) for p in programs]
        self.links = links
        self.cores, self.background, self.speed = cores, background, speed
        self.flows: dict = {}
        self.handles: dict = {}  # (rank, handle) -> [flow ids]
        self.free: dict = {}  # link key -> time it is free
        self.timers: list = []  # heap of (time, rank)
        self.now = 0.0

    # ------------------------------------------------------------------ messages
    def start_flow(self, f: _Flow) -> None:
        f.start = self.now
        path, lat = self.links.path(f.src, f.dst)
        end = self.now
        for key, bw in path:
            s = max(self.free.get(key, 0.0), self.now)
            fin = s + f.nbytes / bw
            self.free[key] = fin
            end = max(end, fin)
            f.queued = max(f.queued, s - self.now)
        f.finish = end + lat

    def post(self, r: int, fid, src: int, dst: int, nbytes) -> None:
        f = self.flows.get(fid)
        if f is None:
            f = self.flows[fid] = _Flow(fid, src, dst)
        if f.src != src or f.dst != dst:
            raise CPError(f"simulator: message {fid!r} posted with endpoints ({src}, {dst}) and ({f.src}, {f.dst})")
        if r in f.post:
            raise CPError(f"simulator: rank {r} posted message {fid!r} twice")
        f.post[r] = self.now
        if nbytes is not None:
            f.nbytes = float(nbytes)
            self.ranks[r].bytes_sent += nbytes
        if len(f.post) == 2:
            if f.nbytes is None:
                raise CPError(f"simulator: message {fid!r} has no sender size")
            self.start_flow(f)

    def handle_status(self, r: int, h) -> tuple[bool, float, object]:
        """(all arrived?, when the last one arrives, the flow that arrives last)."""
        latest, cause = self.now, None
        for fid in self.handles.get((r, h), ()):
            f = self.flows[fid]
            if f.finish is None:
                return False, 0.0, None
            if f.finish > latest:
                latest, cause = f.finish, fid
        return True, latest, cause

    def set_timer(self, r: int, t: float, cause) -> None:
        rank = self.ranks[r]
        rank.state, rank.wait_cause = "timer", cause
        heapq.heappush(self.timers, (t, r))

    def wake_blocked(self) -> None:
        for r, rank in enumerate(self.ranks):
            if rank.state == "blocked":
                ok, t, cause = self.handle_status(r, rank.op.handle)
                if ok:
                    self.set_timer(r, t, cause)

    # ------------------------------------------------------------------ phases
    def step(self, r: int) -> bool:
        """Run rank ``r``'s next op if it is ready; True if it posted messages (others may unblock)."""
        rank = self.ranks[r]
        if rank.pc >= len(rank.program):
            rank.state = "done"
            return False
        op = rank.op
        if isinstance(op, Compute):
            if op.seconds > 0:
                rank.state, rank.remaining, rank.comp_start = "compute", float(op.seconds), self.now
                rank.compute += op.seconds
            else:
                rank.pc += 1
            return False
        if isinstance(op, Launch):
            ids = self.handles.setdefault((r, op.handle), [])
            for fid, dst, nbytes in op.sends:
                self.post(r, fid, r, dst, nbytes)
                ids.append(fid)
            for fid, src in op.recvs:
                self.post(r, fid, src, r, None)
                ids.append(fid)
            rank.pc += 1
            return True
        if isinstance(op, Wait):
            rank.wait_since = self.now
            ok, t, cause = self.handle_status(r, op.handle)
            if ok and t <= self.now:
                rank.spans.append(Span("wait", op.label, self.now, self.now, None))
                rank.pc += 1
            elif ok:
                self.set_timer(r, t, cause)
            else:
                rank.state = "blocked"
            return False
        raise CPError(f"simulator: unknown op {op!r}")

    def run_ready(self) -> None:
        """Run every ready rank until it computes, blocks or ends."""
        progressed = True
        while progressed:
            progressed = False
            for r, rank in enumerate(self.ranks):
                while rank.state == "ready":
                    progressed |= self.step(r)
            if progressed:
                self.wake_blocked()

    def advance(self) -> bool:
        """Move time to the next compute end or timer; False when every rank is done."""
        computing = [r for r, rank in enumerate(self.ranks) if rank.state == "compute"]
        if not computing and not self.timers:
            if all(rank.state == "done" for rank in self.ranks):
                return False
            stuck = [r for r, rank in enumerate(self.ranks) if rank.state == "blocked"]
            raise CPError(f"simulator: deadlock, ranks {stuck} wait for messages that are never posted "
                          f"(first: rank {stuck[0]} on {self.ranks[stuck[0]].op.handle!r})")
        cores = self.cores
        rate = 1.0 if cores is None or not computing else (
            self.speed * min(1.0, cores / (len(computing) + self.background)))
        t_next = min([self.now + self.ranks[r].remaining / rate for r in computing]
                     + ([self.timers[0][0]] if self.timers else []))
        dt = t_next - self.now
        for r in computing:
            rank = self.ranks[r]
            rank.remaining -= rate * dt
            if rank.remaining <= 1e-15 * max(1.0, t_next):
                rank.spans.append(Span("compute", rank.op.label, rank.comp_start, t_next))
                rank.state = "ready"
                rank.pc += 1
        self.now = t_next
        self.fire_timers()
        return True

    def fire_timers(self) -> None:
        while self.timers and self.timers[0][0] <= self.now + 1e-15:
            _, r = heapq.heappop(self.timers)
            rank = self.ranks[r]
            if rank.state != "timer":
                continue
            rank.spans.append(Span("wait", rank.op.label, rank.wait_since, self.now, rank.wait_cause))
            rank.waited += self.now - rank.wait_since
            rank.state = "ready"
            rank.pc += 1

    def result(self) -> Result:
        ranks = self.ranks
        finish = np.array([max([sp.end for sp in rank.spans], default=0.0) for rank in ranks])
        return Result(len(ranks), finish, np.array([rank.compute for rank in ranks]),
                      np.array([rank.waited for rank in ranks]), [rank.spans for rank in ranks], self.flows,
                      np.array([rank.bytes_sent for rank in ranks]))


def run(programs: list[list], links: Links, cores: float | None = None, background: float = 0.0,
        speed: float = 1.0, max_events: int = 10_000_000) -> Result:
    """Simulate ``programs`` (one op list per rank) from time 0; see the module docstring. On a shared
    host (``cores`` not None) a computing rank progresses at ``speed * min(1, cores / (computing ranks +
    background))``, ``background`` being other jobs' runnable threads (a fair-share scheduler) and
    ``speed`` the per-core speed relative to the cost table (interference from other jobs)."""
    eng = _Engine(programs, links, cores, background, speed)
    for _ in range(max_events):
        eng.run_ready()
        if not eng.advance():
            return eng.result()
    raise CPError("simulator: too many events (a program loops?)")
