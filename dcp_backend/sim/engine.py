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


def run(programs: list[list], links: Links, cores: float | None = None, background: float = 0.0,
        speed: float = 1.0, max_events: int = 10_000_000) -> Result:
    """Simulate ``programs`` (one op list per rank) from time 0; see the module docstring. On a shared
    host (``cores`` not None) a computing rank progresses at ``speed * min(1, cores / (computing ranks +
    background))``, ``background`` being other jobs' runnable threads (a fair-share scheduler) and
    ``speed`` the per-core speed relative to the cost table (interference from other jobs)."""
    n = len(programs)
    pc = [0] * n
    state = ["ready"] * n  # ready | compute | blocked | timer | done
    remaining = [0.0] * n
    wake = [0.0] * n
    wait_since = [0.0] * n
    wait_cause: list = [None] * n
    compute = np.zeros(n)
    waited = np.zeros(n)
    spans: list[list[Span]] = [[] for _ in range(n)]
    flows: dict = {}
    handles: dict = {}  # (rank, handle) -> [flow ids]
    free: dict = {}  # link key -> time it is free
    bytes_sent = np.zeros(n)
    comp_start = [0.0] * n
    now = 0.0
    timers: list = []  # heap of (time, rank)

    def start_flow(f: _Flow) -> None:
        f.start = now
        path, lat = links.path(f.src, f.dst)
        end = now
        for key, bw in path:
            s = max(free.get(key, 0.0), now)
            fin = s + f.nbytes / bw
            free[key] = fin
            end = max(end, fin)
            f.queued = max(f.queued, s - now)
        f.finish = end + lat

    def handle_status(r: int, h) -> tuple[bool, float, object]:
        latest, cause = now, None
        for fid in handles.get((r, h), ()):
            f = flows[fid]
            if f.finish is None:
                return False, 0.0, None
            if f.finish > latest:
                latest, cause = f.finish, fid
        return True, latest, cause

    def post(r: int, fid, src: int, dst: int, nbytes) -> None:
        f = flows.get(fid)
        if f is None:
            f = flows[fid] = _Flow(fid, src, dst)
        if f.src != src or f.dst != dst:
            raise CPError(f"simulator: message {fid!r} posted with endpoints ({src}, {dst}) and ({f.src}, {f.dst})")
        if r in f.post:
            raise CPError(f"simulator: rank {r} posted message {fid!r} twice")
        f.post[r] = now
        if nbytes is not None:
            f.nbytes = float(nbytes)
            bytes_sent[r] += nbytes
        if len(f.post) == 2:
            if f.nbytes is None:
                raise CPError(f"simulator: message {fid!r} has no sender size")
            start_flow(f)

    def wake_blocked() -> None:
        for q in range(n):
            if state[q] == "blocked":
                ok, t, cause = handle_status(q, programs[q][pc[q]].handle)
                if ok:
                    state[q], wake[q], wait_cause[q] = "timer", t, cause
                    heapq.heappush(timers, (t, q))

    events = 0
    while True:
        events += 1
        if events > max_events:
            raise CPError("simulator: too many events (a program loops?)")
        # 1. run every ready rank until it computes, blocks or ends
        progressed = True
        while progressed:
            progressed = False
            for r in range(n):
                while state[r] == "ready":
                    if pc[r] >= len(programs[r]):
                        state[r] = "done"
                        break
                    op = programs[r][pc[r]]
                    if isinstance(op, Compute):
                        if op.seconds > 0:
                            state[r], remaining[r], comp_start[r] = "compute", float(op.seconds), now
                            compute[r] += op.seconds
                        else:
                            pc[r] += 1
                    elif isinstance(op, Launch):
                        ids = handles.setdefault((r, op.handle), [])
                        for fid, dst, nbytes in op.sends:
                            post(r, fid, r, dst, nbytes)
                            ids.append(fid)
                        for fid, src in op.recvs:
                            post(r, fid, src, r, None)
                            ids.append(fid)
                        pc[r] += 1
                        progressed = True
                    elif isinstance(op, Wait):
                        wait_since[r] = now
                        ok, t, cause = handle_status(r, op.handle)
                        if ok and t <= now:
                            spans[r].append(Span("wait", op.label, now, now, None))
                            pc[r] += 1
                        elif ok:
                            state[r], wake[r], wait_cause[r] = "timer", t, cause
                            heapq.heappush(timers, (t, r))
                        else:
                            state[r] = "blocked"
                    else:
                        raise CPError(f"simulator: unknown op {op!r}")
            if progressed:
                wake_blocked()
        computing = [r for r in range(n) if state[r] == "compute"]
        if not computing and not timers:
            if all(s == "done" for s in state):
                break
            stuck = [r for r in range(n) if state[r] == "blocked"]
            raise CPError(f"simulator: deadlock, ranks {stuck} wait for messages that are never posted "
                          f"(first: rank {stuck[0]} on {programs[stuck[0]][pc[stuck[0]]].handle!r})")
        rate = 1.0 if cores is None or not computing else speed * min(1.0, cores / (len(computing) + background))
        t_next = min([now + remaining[r] / rate for r in computing] + ([timers[0][0]] if timers else []))
        dt = t_next - now
        for r in computing:
            remaining[r] -= rate * dt
            if remaining[r] <= 1e-15 * max(1.0, t_next):
                spans[r].append(Span("compute", programs[r][pc[r]].label, comp_start[r], t_next))
                state[r] = "ready"
                pc[r] += 1
        now = t_next
        while timers and timers[0][0] <= now + 1e-15:
            _, r = heapq.heappop(timers)
            if state[r] != "timer":
                continue
            spans[r].append(Span("wait", programs[r][pc[r]].label, wait_since[r], now, wait_cause[r]))
            waited[r] += now - wait_since[r]
            state[r] = "ready"
            pc[r] += 1
    finish = np.array([max([s.end for s in spans[r]], default=0.0) for r in range(n)])
    return Result(n, finish, compute, waited, spans, flows, bytes_sent)
