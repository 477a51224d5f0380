"""The end-to-end model on tiny configurations: the roofline's GEMM time is the hand-counted FLOPs at the
matmul rate, with free non-attention work a layer is exactly the simulator's attention on the shard
network, the gradient all-reduce matches the back-of-envelope number, and bad setups are refused."""
import pytest

import dcp_backend as cp
from dcp_backend.cost_model import load_cost_model
from dcp_backend.errors import CPError
from dcp_backend.sim.e2e import GPT_8B, DeviceRates, E2ESetup, ModelShape, best_iterations, e2e_candidates, iteration
from dcp_backend.sim.op_costs import Costs
from dcp_backend.sim.simulator import simulate_plan

TINY = ModelShape(layers=3, hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=1000)
FREE = DeviceRates("free", 1e30, 1e30, 0.0)  # non-attention work costs nothing


def test_gemm_time_is_the_hand_counted_flops_at_the_matmul_rate():
    rates = DeviceRates("gemm only", 100e12, 1e30, 0.0)
    s = E2ESetup(TINY, tp=2, nodes=1, gpus_per_node=2, network="h100-p5", rates=rates)
    T, h, tp = 1000, 256, 2
    q, kv, ffn = 8 * 32, 2 * 32, 512
    flops = 2 * T * h * (q + 2 * kv) / tp + 2 * T * q / tp * h + 2 * T * h * 2 * ffn / tp + 2 * T * ffn / tp * h
    t = s.layer_seconds(T)
    coll = 4 * (tp - 1) / tp * T * h * 2 / 450e9 + 4 * (tp - 1) * 5e-6  # four TP collectives on NVLink
    assert t["pre"] + t["post"] == pytest.approx(flops / 100e12 + coll, rel=1e-9)
    assert t["pre_bwd"] + t["post_bwd"] == pytest.approx(2 * flops / 100e12 + coll, rel=1e-9)


def test_with_free_linear_work_a_layer_is_the_simulated_attention():
    s = E2ESetup(TINY, tp=1, nodes=2, gpus_per_node=4, network="a100-p4d", rates=FREE, grad_bytes=0,
                 optimizer_bytes_per_param=0)
    spec = s.attention_spec("causal")
    assert (spec.num_heads, spec.num_kv_heads) == (8, 2) and s.cp_topology == cp.Topology(8, 4)
    costs = Costs.make(load_cost_model("h100"), "bf16", 32)
    for name in ("zigzag", "te", "dcp"):
        opts = {"block_size": 256} if name == "dcp" else {}
        plan = cp.get_planner(name, **opts).plan([3000, 900, 100], spec, s.cp_topology)
        rep = iteration(plan, s, costs)
        sim = simulate_plan(plan, "h100", s.shard_network(), "bf16")
        assert rep.parts["layers"] == pytest.approx(TINY.layers * (sim.fwd.time + sim.bwd.time), rel=1e-9)
        # head and optimizer free, the all-reduce of no bytes only its 2 (n - 1) latencies
        assert rep.parts["grad_sync"] == pytest.approx(2 * 7 * 20e-6)
        assert rep.iteration_s == pytest.approx(rep.parts["layers"] + rep.parts["grad_sync"])


def test_linear_work_follows_each_ranks_rows_and_hybrid_rounds_add_up():
    s = E2ESetup(TINY, tp=1, nodes=1, gpus_per_node=4, network="h100-p5")
    cands = e2e_candidates([2000, 700, 300, 60], "causal", s, dcp_block_sizes=(256,),
                           backends=("zigzag", "hybrid", "dcp"))
    best = best_iterations(cands, s)
    assert set(best) == {"zigzag", "hybrid", "dcp", "dcp-hypergraph"}
    for rep, _ in best.values():
        # a layer holds at least the slowest rank's linear work, forward and backward
        lin = max(sum(s.layer_seconds(t).values()) for t in rep.tokens)
        assert rep.parts["layers"] >= TINY.layers * lin * (1 - 1e-9)
        assert sum(rep.tokens) >= 3060  # every token runs through the model on some rank (padding may add)


def test_gradient_all_reduce_and_setup_checks():
    s = E2ESetup(network="a100-p4d")
    assert s.cp_topology == cp.Topology(16, 2)
    net = s.shard_network()
    assert net.inter_bw_per_node == pytest.approx(50e9 / 4) and net.nics_per_node == 2
    params = GPT_8B.params(16384)
    assert 7.3e9 < params < 8.2e9
    # 16 replicas, fp32 gradients through 50 GB/s of NICs per node: 2 x 15/16 x 4 bytes x params / 50 GB/s
    assert s.grad_sync_seconds(16384) == pytest.approx(2 * 15 / 16 * 4 * params / 50e9, rel=0.01)
    with pytest.raises(CPError, match="TP 3 must divide the GPUs per node"):
        E2ESetup(tp=3)
    with pytest.raises(CPError, match="the plan is for"):
        plan = cp.get_planner("zigzag").plan([100], s.attention_spec("causal"), cp.Topology(4))
        iteration(plan, s, Costs.make(load_cost_model("h100"), "bf16", 128))
