"""The NCCL order checker (dcp_backend.comm_order): hand-written traces it must accept or reject, a bad
order recorded from a real gloo run (gloo buffers sends, so the run itself succeeds), and every backend's
recorded forward and backward at worlds 2 to 8, including two-node topologies.

(Every exactness test in tests/cp_check.py replays its traces too; this file checks the checker.)"""
import pytest
import torch

from dcp_backend import comm
from dcp_backend.comm_order import CommOrderError, replay
from tests.cp_check import Case, check_results, worker
from tests.distributed import run_ranks

G1 = ("g1", (0, 1))
G2 = ("g2", (0, 1))


def p2p(call, group, *ops):
    return ("p2p", call, group, f"call {call}", list(ops))


def wait(call):
    return ("wait", call)


def test_send_only_batch_before_the_receive_deadlocks():
    # the old ring backward: every rank sends its accumulator in a batch of its own, and the matching
    # receive sits in the peer's next batch on the same communicator
    bad = [[p2p(0, G1, ("send", 1, 12, 64)), p2p(1, G1, ("recv", 1, 12, 64)), wait(0), wait(1)],
           [p2p(0, G1, ("send", 0, 12, 64)), p2p(1, G1, ("recv", 0, 12, 64)), wait(0), wait(1)]]
    with pytest.raises(CommOrderError, match="deadlock") as err:
        replay(bad)
    assert "rank 0 call 0" in str(err.value) and "rank 1 call 0" in str(err.value)
    good = [[p2p(0, G1, ("send", 1, 12, 64), ("recv", 1, 12, 64)), wait(0)],
            [p2p(0, G1, ("recv", 0, 12, 64), ("send", 0, 12, 64)), wait(0)]]
    assert replay(good)["calls"] == 2


def test_separate_communicators_overlap_but_one_communicator_serialises():
    # rank 0 sends on g1 then receives on g2; rank 1 sends on g2 then receives on g1
    def traces(g_a, g_b):
        return [[p2p(0, g_a, ("send", 1, 1, 8)), p2p(1, g_b, ("recv", 1, 2, 8)), wait(0), wait(1)],
                [p2p(0, g_b, ("send", 0, 2, 8)), p2p(1, g_a, ("recv", 0, 1, 8)), wait(0), wait(1)]]

    replay(traces(G1, G2))
    with pytest.raises(CommOrderError, match="deadlock"):
        replay(traces(G1, G1))


def test_a_wait_orders_later_calls_on_every_group():
    # each rank waits for a receive before it sends on the other group: nobody ever sends
    bad = [[p2p(0, G1, ("recv", 1, 1, 8)), wait(0), p2p(1, G2, ("send", 1, 2, 8)), wait(1)],
           [p2p(0, G2, ("recv", 0, 2, 8)), wait(0), p2p(1, G1, ("send", 0, 1, 8)), wait(1)]]
    with pytest.raises(CommOrderError, match="deadlock"):
        replay(bad)
    # without the waits in between, the sends are posted and everything completes
    ok = [[p2p(0, G1, ("recv", 1, 1, 8)), p2p(1, G2, ("send", 1, 2, 8)), wait(0), wait(1)],
          [p2p(0, G2, ("recv", 0, 2, 8)), p2p(1, G1, ("send", 0, 1, 8)), wait(0), wait(1)]]
    replay(ok)


def test_mismatched_messages_and_collectives_are_reported():
    with pytest.raises(CommOrderError, match="no matching receive"):
        replay([[p2p(0, G1, ("send", 1, 1, 8)), wait(0)], []])
    with pytest.raises(CommOrderError, match="would pair"):  # FIFO pairs messages of different sizes
        replay([[p2p(0, G1, ("send", 1, 1, 8), ("send", 1, 1, 16)), wait(0)],
                [p2p(0, G1, ("recv", 0, 1, 16), ("recv", 0, 1, 8)), wait(0)]])
    coll = ("collective", 0, G1, "check", "all_reduce")
    with pytest.raises(CommOrderError, match="different numbers of collectives"):
        replay([[coll, wait(0)], []])
    with pytest.raises(CommOrderError, match="never launched"):
        replay([[wait(3)], []])
    # a collective after a receive that needs the peer's send, which the peer posts after the collective
    with pytest.raises(CommOrderError, match="deadlock"):
        replay([[p2p(0, G1, ("recv", 1, 1, 8)), wait(0), ("collective", 1, G2, "x", "all_reduce"), wait(1)],
                [("collective", 0, G2, "x", "all_reduce"), wait(0), p2p(1, G1, ("send", 0, 1, 8)), wait(1)]])


def _old_ring_backward_order(rank, world_size):
    """The pre-fix ring backward pattern, run for real on gloo: a send-only batch, then the receive."""
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    buf = torch.zeros(4)
    with comm.record_trace() as trace:
        for _ in range(2):
            send = comm.Exchange(None, "accumulator hand-off")
            send.send(torch.full((4,), float(rank)), nxt, 12)
            send.launch()
            recv = comm.Exchange(None, "next step")
            recv.recv(buf, prv, 12)
            recv.launch().wait()
            send.wait()
    return trace.events, float(buf[0])


def test_recorded_bad_order_passes_on_gloo_but_fails_the_replay():
    results = run_ranks(_old_ring_backward_order, 3)
    assert [r[1] for r in results] == [2.0, 0.0, 1.0]  # gloo delivered every message
    with pytest.raises(CommOrderError, match="deadlock"):
        replay([r[0] for r in results])


ALL_BACKENDS = {
    2: [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 2}), ("dcp", {"block_size": 16})],
    3: [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 1, "window": 1}), ("dcp", {"block_size": 16})],
    # two nodes of two: DCP's gateways and relays, LoongTrain's outer ring between the nodes
    4: [("ring", {"devices_per_node": 2}), ("zigzag", {"devices_per_node": 2}),
        ("loongtrain", {"head_parallel": 2, "window": 1, "devices_per_node": 2}),
        ("loongtrain", {"head_parallel": 1, "devices_per_node": 2}),
        ("dcp", {"block_size": 8, "devices_per_node": 2, "num_stages": 2})],
    # two nodes of four
    8: [("ring", {"devices_per_node": 4}), ("zigzag", {"devices_per_node": 4}),
        ("loongtrain", {"head_parallel": 2, "devices_per_node": 4}),
        ("dcp", {"block_size": 8, "devices_per_node": 4})],
}


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_every_backend_forward_and_backward_replays_without_deadlock(world_size):
    # check_results replays each case's recorded traces (and checks exactness on the way)
    cases = [Case(name, [37, 1, 64, 5, 20], options=opts, mask=mask, seed=i)
             for i, (name, opts) in enumerate(ALL_BACKENDS[world_size])
             for mask in (("causal",) if world_size == 8 else ("causal", "lambda"))]
    for c in cases:
        if c.mask == "lambda":
            c.mask_args = {"sink": 2, "window": 9}
    check_results(cases, run_ranks(worker, world_size, cases))
