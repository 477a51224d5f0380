"""Replay recorded communication under NCCL's ordering rules and report deadlocks (no GPU needed).

gloo buffers sends, so a CPU run can succeed with an order that hangs under NCCL. Each rank records its
calls in program order (:func:`dcp_backend.comm.record_trace`); :func:`replay` then executes all ranks'
traces together under the rules NCCL imposes on the device side:

* **calls on one process group run in order**: a rank's call starts only after its previous call on the
  same group has completed (one stream per communicator);
* **waiting orders every later call**: after a rank waits on a call, none of its later calls starts
  before that call completed (the host, or under NCCL the current stream, blocks there);
* **a point-to-point operation completes only when its peer's matching operation is posted by a call
  that is running**: sends and receives match first-in first-out per (source, destination, group), and a
  batch (``batch_isend_irecv``) completes when all its operations have;
* **a collective completes when every member of the group has started its matching call** (the k-th
  collective of a group on every member).

The replay repeats "start every call whose dependencies are met; complete every started call whose
partners have all started" until nothing changes. Calls left incomplete form a deadlock, reported with
each rank's first blocked call and what it waits for. Matched operations must also agree on the byte
count and the tag (gloo matches by tag, NCCL by order: a disagreement means the two would pair
different messages).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


class CommOrderError(AssertionError):
    """The traces deadlock under NCCL's rules, or their sends and receives do not match."""


@dataclass(eq=False)
class _Call:
    rank: int
    call: int
    kind: str  # "p2p" or "collective"
    group: tuple
    what: str
    ops: list  # p2p: [(kind, peer, tag, nbytes)]; collective: [op name]
    waits_before: int  # number of wait events issued before this call's launch
    prev_same_group: "_Call | None" = None
    partners: list = field(default_factory=list)  # calls that must have started for this one to complete
    started: bool = False
    done: bool = False

    def __str__(self) -> str:
        if self.kind == "p2p":
            ops = ", ".join(f"{k} {'to' if k == 'send' else 'from'} {p} ({n} B, tag {t})" for k, p, t, n in self.ops)
        else:
            ops = self.ops[0]
        return f"rank {self.rank} call {self.call} [{self.what}] on group {self.group[0] or 'WORLD'}: {ops}"


def _parse(traces) -> tuple[list[list[_Call]], list[list[int]]]:
    """Per rank: calls in launch order, and the awaited call ids in wait order."""
    calls, waits = [], []
    for rank, events in enumerate(traces):
        events = getattr(events, "events", events)
        mine, waited, by_id = [], [], {}
        last_on_group: dict = {}
        for ev in events:
            if ev[0] == "wait":
                if ev[1] not in by_id:
                    raise CommOrderError(f"rank {rank} waits for call {ev[1]}, which it never launched")
                waited.append(ev[1])
                continue
            kind, call, group, what, payload = ev
            c = _Call(rank, call, kind, tuple(group), what, list(payload) if kind == "p2p" else [payload],
                      len(waited), last_on_group.get(tuple(group)))
            last_on_group[tuple(group)] = c
            by_id[call] = c
            mine.append(c)
        calls.append(mine)
        waits.append([by_id[w] for w in waited])
    return calls, waits


def _match(calls: list[list[_Call]]) -> None:
    """Pair sends with receives (FIFO per source, destination, group) and collectives per group."""
    sends, recvs = defaultdict(list), defaultdict(list)
    colls = defaultdict(lambda: defaultdict(list))
    for mine in calls:
        for c in mine:
            if c.kind == "p2p":
                for op in c.ops:
                    kind, peer, tag, nbytes = op
                    if kind == "send":
                        sends[(c.rank, peer, c.group)].append((c, tag, nbytes))
                    else:
                        recvs[(peer, c.rank, c.group)].append((c, tag, nbytes))
            else:
                colls[c.group][c.rank].append(c)
    for key in set(sends) | set(recvs):
        s, r = sends.get(key, []), recvs.get(key, [])
        src, dst, group = key
        for i in range(max(len(s), len(r))):
            if i >= len(r):
                raise CommOrderError(f"send #{i} from rank {src} to rank {dst} has no matching receive: {s[i][0]}")
            if i >= len(s):
                raise CommOrderError(f"receive #{i} on rank {dst} from rank {src} has no matching send: {r[i][0]}")
            (sc, st, sn), (rc, rt, rn) = s[i], r[i]
            if sn != rn or st != rt:
                raise CommOrderError(
                    f"message #{i} from rank {src} to rank {dst}: the send ({sn} B, tag {st}) and the receive it "
                    f"meets in order ({rn} B, tag {rt}) differ, so NCCL (order) and gloo (tags) would pair "
                    f"different messages: {sc} / {rc}")
            sc.partners.append(rc)
            rc.partners.append(sc)
    for group, per_rank in colls.items():
        members = group[1]
        counts = {r: len(per_rank.get(r, [])) for r in members}
        if len(set(counts.values())) > 1:
            raise CommOrderError(f"group {group[0] or 'WORLD'}: members issue different numbers of collectives {counts}")
        for k in range(next(iter(counts.values()), 0)):
            same = [per_rank[r][k] for r in members]
            if len({c.ops[0] for c in same}) > 1:
                raise CommOrderError(f"group {group[0] or 'WORLD'}: collective #{k} differs across members: "
                                     + "; ".join(map(str, same)))
            for c in same:
                c.partners.extend(x for x in same if x is not c)


def replay(traces) -> dict:
    """Replay per-rank traces (index = global rank) under NCCL's rules; raise :class:`CommOrderError` on a
    deadlock or mismatch. Returns a summary: calls and the number of replay rounds."""
    calls, waits = _parse(traces)
    _match(calls)
    waits_done = [0] * len(calls)  # per rank: length of the prefix of waited calls that are complete
    rounds = 0
    pending = sum(len(m) for m in calls)
    while pending:
        rounds += 1
        progress = False
        for r, mine in enumerate(calls):
            while waits_done[r] < len(waits[r]) and waits[r][waits_done[r]].done:
                waits_done[r] += 1
            for c in mine:
                if c.started:
                    continue
                if c.waits_before > waits_done[r]:
                    break  # program order: nothing after a pending wait starts
                if c.prev_same_group is not None and not c.prev_same_group.done:
                    continue  # its stream is busy; a later call on another group may still start
                c.started = progress = True
        for mine in calls:
            for c in mine:
                if c.started and not c.done and all(p.started for p in c.partners):
                    c.done = progress = True
                    pending -= 1
        if not progress:
            blocked = []
            for mine in calls:
                first = next((c for c in mine if not c.done), None)
                if first is None:
                    continue
                state = "running, its peers' matching calls have not started" if first.started else "not started"
                missing = [str(p) for p in first.partners if not p.started][:2]
                blocked.append(f"  {first} -- {state}" + (f"; waiting for: {' | '.join(missing)}" if missing else ""))
            raise CommOrderError("deadlock under NCCL ordering rules; first blocked call of each rank:\n"
                                 + "\n".join(blocked))
    return {"calls": sum(len(m) for m in calls), "rounds": rounds}
