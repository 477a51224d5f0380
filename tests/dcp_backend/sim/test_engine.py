"""The event engine: message timing over shared links, waits, processor sharing, deadlocks."""
import pytest

from dcp_backend import CPError
from dcp_backend.sim.engine import Compute, Launch, Wait, run
from dcp_backend.sim.network import Links, NetworkModel, Topology

NET = NetworkModel("test", intra_bw=100.0, inter_bw_per_node=10.0, nics_per_node=1, intra_latency=0.5,
                   inter_latency=2.0)


def test_message_waits_for_both_posts_and_pays_bandwidth_and_latency():
    links = Links(Topology.grid(1, 2), NET)
    progs = [[Compute(3.0), Launch("k", [("m", 1, 200.0)], []), Wait("k")],
             [Launch("k", [], [("m", 0)]), Wait("k"), Compute(1.0)]]
    res = run(progs, links)
    # starts at 3 (sender posts late), 200 B at 100 B/s = 2 s, + 0.5 s latency
    assert res.finish[0] == pytest.approx(5.5) and res.finish[1] == pytest.approx(6.5)
    assert res.waited[1] == pytest.approx(5.5) and res.bytes_sent[0] == 200


def test_shared_link_serves_messages_one_after_another():
    links = Links(Topology.grid(1, 3), NET)
    # ranks 1 and 2 both send 100 B to rank 0: its ingress port carries 200 B
    progs = [[Launch("k", [], [("a", 1), ("b", 2)]), Wait("k")],
             [Launch("k", [("a", 0, 100.0)], []), Wait("k")],
             [Launch("k", [("b", 0, 100.0)], []), Wait("k")]]
    res = run(progs, links)
    assert res.finish[0] == pytest.approx(2.0 + 0.5)


def test_inter_node_messages_use_the_nics():
    links = Links(Topology.grid(2, 1), NET)
    progs = [[Launch("k", [("a", 1, 10.0)], []), Wait("k")], [Launch("k", [], [("a", 0)]), Wait("k")]]
    assert run(progs, links).time == pytest.approx(1.0 + 2.0)


def test_cores_are_shared_by_computing_ranks():
    links = Links(Topology.grid(1, 4), NET)
    progs = [[Compute(1.0)] for _ in range(4)]
    assert run(progs, links, cores=2).time == pytest.approx(2.0)
    assert run(progs, links, cores=None).time == pytest.approx(1.0)
    # one rank alone runs at full speed once the others are done
    progs = [[Compute(1.0)], [Compute(1.0)], [Compute(1.0)], [Compute(3.0)]]
    assert run(progs, links, cores=2).time == pytest.approx(2.0 + 2.0)  # 1 s done by t=2, 2 s left alone


def test_overlap_of_compute_and_transfer():
    links = Links(Topology.grid(1, 2), NET)
    progs = [[Launch("k", [("m", 1, 300.0)], []), Compute(2.0), Wait("k")],
             [Launch("k", [], [("m", 0)]), Compute(5.0), Wait("k")]]
    res = run(progs, links)
    assert res.finish[0] == pytest.approx(3.5) and res.finish[1] == pytest.approx(5.0)
    assert res.waited[1] == pytest.approx(0.0)


def test_deadlock_is_reported():
    links = Links(Topology.grid(1, 2), NET)
    progs = [[Launch("k", [], [("m", 1)]), Wait("k")], [Compute(1.0)]]
    with pytest.raises(CPError, match="deadlock"):
        run(progs, links)


def test_critical_path_follows_the_message():
    links = Links(Topology.grid(1, 2), NET)
    progs = [[Compute(4.0, "slow"), Launch("k", [("m", 1, 100.0)], []), Wait("k")],
             [Launch("k", [], [("m", 0)]), Wait("k", "w"), Compute(1.0, "tail")]]
    res = run(progs, links)
    path = res.critical_path()
    kinds = [p[1] for p in path]
    assert path[0][2] == "tail" and "message" in kinds and path[-1][2] == "slow"
    cs = res.critical_summary()
    assert cs["compute"] == pytest.approx(5.0) and cs["communication"] == pytest.approx(1.5)
