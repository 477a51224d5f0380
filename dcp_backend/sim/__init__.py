"""Cluster simulator: replays a backend's real plan as a timeline of compute and communication.

network.py             links and the network presets (A100 p4d, H100 p5, CPU loopback) over a Topology
engine.py              discrete-event engine over per-rank programs (compute, launch, wait)
op_costs.py            what a kernel call or a memory operation costs (wraps dcp_backend.cost_model.CostModel)
dcp.py                 DCP's compiled per-device instructions as programs
ring.py                ring / zigzag / LoongTrain / TE step schedules as programs
simulator.py           simulate_plan(plan, cost_model, network, dtype) -> SimReport (forward, backward, stats)
benchmark_batches.py   published-microbenchmark-shaped batches (LongAlign / LDC lengths packed into a budget)
"""
from dcp_backend.sim.network import PRESETS, NetworkModel, get_network
from dcp_backend.sim.simulator import SimReport, simulate_plan
from dcp_backend.topology import Topology

__all__ = ["PRESETS", "NetworkModel", "Topology", "get_network", "SimReport", "simulate_plan"]
