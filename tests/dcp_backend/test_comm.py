"""Communication helpers on 3 gloo ranks: batched exchange (data, tags, byte counters, subgroups with
group-local peers), uneven all-to-all, the cross-rank consistency check, group timeouts; and the
counters' intra/inter-node split."""
import datetime

import pytest
import torch
import torch.distributed as dist

from dcp_backend import comm
from dcp_backend.errors import CPError
from tests.distributed import run_ranks


def test_counters_split_by_node():
    c = comm.CommCounters()
    c.add_send(1, 100)
    c.add_send(2, 10)
    c.add_send(3, 1)
    c.add_send(1, 5)
    assert c.total() == 116 and c.sent_bytes[1] == 105
    assert c.split(my_rank=0, devices_per_node=2) == (105, 11)
    assert c.split(my_rank=2, devices_per_node=2) == (11, 105)  # peers 2, 3 share its node
    assert c.split(my_rank=0, devices_per_node=4) == (116, 0)
    c.reset()
    assert c.total() == 0 and c.wait_seconds == 0.0


def _comm_worker(rank, n):
    out = {}
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    counters = comm.CommCounters()
    x = comm.Exchange(None, "test ring", counters=counters)
    a = torch.full((rank + 1, 3), float(rank))
    b = torch.arange(4, dtype=torch.float64) + 10 * rank
    got_a = torch.empty(prv + 1, 3)
    got_b = torch.empty(4, dtype=torch.float64)
    x.send(a, nxt, tag=1)
    x.send(b, nxt, tag=2)
    x.recv(got_b, prv, tag=2)
    x.recv(got_a, prv, tag=1)
    x.launch().wait()
    out["ring data"] = torch.equal(got_a, torch.full((prv + 1, 3), float(prv))) and torch.equal(
        got_b, torch.arange(4, dtype=torch.float64) + 10 * prv)
    out["bytes"] = (x.bytes_sent, dict(counters.sent_bytes))
    with pytest.raises(CPError, match="contiguous"):
        comm.Exchange().recv(torch.empty(4, 4).t(), prv)
    # uneven all-to-all: rank r sends (r + p + 1) rows to rank p
    send_counts = [rank + p + 1 for p in range(n)]
    recv_counts = [p + rank + 1 for p in range(n)]
    inp = torch.cat([torch.full((c, 2), float(100 * rank + p)) for p, c in enumerate(send_counts)])
    res = torch.empty(sum(recv_counts), 2)
    comm.all_to_all(res, inp, recv_counts, send_counts)
    want = torch.cat([torch.full((c, 2), float(100 * p + rank)) for p, c in enumerate(recv_counts)])
    out["all_to_all"] = torch.equal(res, want)
    # consistency check
    comm.check_same(12345, what="batch id")
    try:
        comm.check_same(7 if rank == 1 else 8, what="batch id")
        out["check_same"] = "no error"
    except CPError as e:
        out["check_same"] = "ranks disagree on the batch id" in str(e)
    out["timeout"] = comm.group_timeout(None)
    # subgroup of ranks 1..n-1 with group-local peer numbers
    sub = dist.new_group(list(range(1, n)))
    if rank >= 1:
        me = comm.group_rank(sub)
        m = comm.group_size(sub)
        y = comm.Exchange(sub, "subgroup ring")
        got = torch.empty(2)
        y.send(torch.tensor([float(rank), float(me)]), (me + 1) % m)
        y.recv(got, (me - 1) % m)
        y.launch().wait()
        out["subgroup"] = (me, got.tolist(), comm.global_rank(sub, (me - 1) % m))
    return out


def test_comm_on_three_ranks():
    n = 3
    res = run_ranks(_comm_worker, n, pg_timeout=33)
    for rank, r in enumerate(res):
        assert r["ring data"] and r["all_to_all"], rank
        nbytes = (rank + 1) * 3 * 4 + 4 * 8
        assert r["bytes"] == (nbytes, {(rank + 1) % n: nbytes})
        assert r["check_same"] is True
        assert r["timeout"] == datetime.timedelta(seconds=33)
    # subgroup {1, 2}: local ranks 0, 1; each receives from the other
    assert res[1]["subgroup"] == (0, [2.0, 1.0], 2)
    assert res[2]["subgroup"] == (1, [1.0, 0.0], 1)
