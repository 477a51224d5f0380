"""Cluster topology and network model of the simulator: who talks over which link, how fast, how late.

A cluster is ``nodes x devices_per_node`` devices (rank ``r`` on node ``r // devices_per_node``). A
message between two devices of one node uses the sender's intra-node egress link and the receiver's
ingress link (NVLink through NVSwitch: every device has its own full-bandwidth port). A message across
nodes uses a NIC of the sender's node (egress) and a NIC of the receiver's node (ingress); the node's
inter-node bandwidth is split evenly over its NICs and device ``d`` uses NIC ``d * nics // devices``
(with fewer NICs than devices, devices share NICs; with more, each device drives ``nics / devices``
of them, modelled as one link of that combined bandwidth). Every message also pays a fixed latency.

Presets (assumptions taken from public instance specifications, not measurements):

* ``a100-p4d`` (AWS p4d/p4de): 8 x A100 per node, NVLink 600 GB/s per GPU bidirectional (300 GB/s each
  way), 4 x 100 Gbps EFA per node (50 GB/s each way per node, 12.5 GB/s per NIC), latency 5 us inside a
  node and 20 us across nodes. This is the published microbenchmark's cluster class.
* ``h100-p5`` (AWS p5): 8 x H100 per node, NVLink 900 GB/s per GPU bidirectional (450 GB/s each way),
  3200 Gbps EFA per node in 32 x 100 Gbps NICs (400 GB/s each way per node), latencies as above.
* ``cpu-loopback``: gloo over TCP loopback on one machine; defaults from the measurement in
  docs/research/cpu_feasibility.md section 7 (about 1.2 GiB/s each way for one pair, ~0.5 GiB/s per rank
  when 4 ranks exchange at once) and refined by the validation (docs/BENCHMARKS.md).

Link efficiency is 1.0 in every preset: NCCL point-to-point reaches most of NVLink's and EFA's rated
bandwidth for the multi-megabyte messages of these schedules; the simulator reports what the rated
numbers imply.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dcp_backend.errors import CPError
from dcp_backend.topology import Topology

GB = 1e9


@dataclass(frozen=True)
class NetworkModel:
    """Bandwidths in bytes/s (each direction), latencies in seconds."""

    name: str
    intra_bw: float  # per device, each direction
    inter_bw_per_node: float  # per node, each direction, all NICs together
    nics_per_node: int
    intra_latency: float
    inter_latency: float
    # CPU hosts: ranks share ``cores`` cores for compute (None: one accelerator per rank, no sharing),
    # with ``background`` runnable threads of other jobs competing for them
    cores: float | None = None
    background: float = 0.0
    speed: float = 1.0  # per-core speed relative to the cost table (CPU hosts)

    def validate(self) -> None:
        for f in ("intra_bw", "inter_bw_per_node"):
            if not getattr(self, f) > 0:
                raise CPError(f"network {self.name}: {f} must be positive")
        if self.nics_per_node < 1:
            raise CPError(f"network {self.name}: nics_per_node must be >= 1")
        if self.intra_latency < 0 or self.inter_latency < 0:
            raise CPError(f"network {self.name}: latencies must be >= 0")

    def scaled(self, bandwidth: float = 1.0, latency: float = 1.0) -> "NetworkModel":
        """A copy with every bandwidth multiplied by ``bandwidth`` and latency by ``latency``."""
        return replace(self, intra_bw=self.intra_bw * bandwidth, inter_bw_per_node=self.inter_bw_per_node * bandwidth,
                       intra_latency=self.intra_latency * latency, inter_latency=self.inter_latency * latency)


PRESETS = {
    "a100-p4d": NetworkModel("a100-p4d", intra_bw=300 * GB, inter_bw_per_node=50 * GB, nics_per_node=4,
                             intra_latency=5e-6, inter_latency=20e-6),
    "h100-p5": NetworkModel("h100-p5", intra_bw=450 * GB, inter_bw_per_node=400 * GB, nics_per_node=32,
                            intra_latency=5e-6, inter_latency=20e-6),
    "cpu-loopback": NetworkModel("cpu-loopback", intra_bw=1.2 * 2 ** 30, inter_bw_per_node=1.2 * 2 ** 30,
                                 nics_per_node=1, intra_latency=100e-6, inter_latency=100e-6, cores=2),
}


def get_network(name_or_model) -> NetworkModel:
    if isinstance(name_or_model, NetworkModel):
        name_or_model.validate()
        return name_or_model
    if name_or_model not in PRESETS:
        raise CPError(f"unknown network preset {name_or_model!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name_or_model]


class Links:
    """Resource ids, bandwidths and latency of every (src, dst) path of a topology under a network."""

    def __init__(self, topo: Topology, net: NetworkModel):
        self.topo, self.net = topo, net
        dpn = topo.devices_per_node
        self.groups = min(net.nics_per_node, dpn)  # NIC links per node as the simulator sees them
        self.nic_bw = net.inter_bw_per_node / self.groups

    def nic(self, rank: int) -> int:
        d = rank % self.topo.devices_per_node
        return d * self.groups // self.topo.devices_per_node

    def path(self, src: int, dst: int):
        """[(resource key, bytes/s)], latency."""
        ns, nd = self.topo.node(src), self.topo.node(dst)
        if ns == nd:
            return [(("out", src), self.net.intra_bw), (("in", dst), self.net.intra_bw)], self.net.intra_latency
        return ([(("nic_out", ns, self.nic(src)), self.nic_bw), (("nic_in", nd, self.nic(dst)), self.nic_bw)],
                self.net.inter_latency)


# ------------------------------------------------------------------------------------ fitting

def fit_link(nbytes, seconds) -> dict:
    """Bandwidth and latency of a link from timed transfers of several sizes (least squares on
    ``seconds = latency + bytes / bandwidth``; a negative intercept counts as zero latency)."""
    b = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if b.size < 2:
        raise CPError("fit_link needs transfers of at least two sizes")
    slope, icpt = np.polyfit(b, t, 1)
    return {"bytes_per_s": float(1 / slope), "latency_s": float(max(icpt, 0.0))}


def host_model(world: int, speed_ratio: float, cores: int) -> tuple[float, float]:
    """(per-core speed, other jobs' runnable threads) of a shared CPU host, from a probe: ``world`` ranks
    ran one kernel call at once at ``speed_ratio`` = (the cost table's time) / (measured time). With no more
    ranks than cores, fair share would give each a full core, so the slowdown is interference: speed
    ``speed_ratio``, no background. With more ranks than cores, each gets ``cores / (world + L)``:
    ``L = cores / speed_ratio - world`` (speed 1; if that is negative, the ranks ran faster than fair
    sharing predicts and the speed absorbs it)."""
    r = speed_ratio
    if world <= cores:
        return float(min(r, 1.5)), 0.0
    bg = cores / r - world
    if bg < 0:
        return float(r * world / cores), 0.0
    return 1.0, float(bg)
