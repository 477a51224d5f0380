"""End-to-end training-iteration time of a GPT on a cluster: attention from the simulator, the rest from a
roofline (the published end-to-end comparison, DCP paper Figs. 14-15).

Setup as published (docs/research/dcp_reference.md section 4.2): an 8B GPT (:data:`GPT_8B`: 32 layers,
hidden 4096, 32 query / 8 KV heads of 128, FFN 14336), tensor parallelism 4 inside a node, 8 nodes x 8
GPUs, so 16 context-parallel ranks of 4 GPUs (2 per node); one iteration is one batch of 16K-128K tokens.
Every backend plans the batch over the 16 CP ranks with the heads of one TP shard (8 query / 2 KV); the 4
shards of a rank run the same schedule at once, so one shard is simulated on the network as one shard
sees it (:meth:`E2ESetup.shard_network`: its GPU's NVLink port, a quarter of the node's NICs).

One layer of a rank is ``pre`` (norm, the TP all-gather, the QKV GEMM), its attention program (the
backend's simulator program, :func:`dcp_backend.sim.simulator.plan_programs`), then ``post`` (output
projection, TP reduce-scatter, residual, norm, all-gather, MLP, reduce-scatter, residual); backward is
``post``'s backward, attention backward, ``pre``'s backward. Rank ``r``'s linear work follows the rows it
runs through the model (:func:`model_tokens`: tokens held, TE's padding included). The layer's time is
the event engine's makespan over ranks (attention synchronises the ranks every layer), times the layers.
Megatron-Core's hybrid CP runs rounds of per-sample micro-batches: a round's time is its slowest group's
``layers x (forward + backward)`` of its samples one after another, rounds in sequence with a barrier.
Then the LM head and loss (per rank, on its rows), the data-parallel gradient all-reduce over the 16
ranks (fp32 gradients, Megatron's default with bf16; identical for every backend: the parameters are
replicated over CP and DP alike) and the optimizer step.

Rates (:class:`DeviceRates`): GEMMs at the measured H100 bf16 matmul rate (690 TFLOP/s, shared
DESIGN.md) and memory-bound operations at the measured copy bandwidth (1.39 TB/s read + write,
/work/shared/data), each operation ``max(flops / F, bytes / B) + launch``; TP collectives on NVLink at
the network preset's per-device bandwidth. :meth:`DeviceRates.measure` measures the same two rates on
this machine (CPU) instead. Not modelled: overlap of the gradient all-reduce with the backward (off by
default in Megatron), activation recomputation, pipeline parallelism, kernel slowdown from concurrent
communication, the data loader (plans are made ahead, in workers).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from dcp_backend.baselines.hybrid import HybridPlan
from dcp_backend.baselines.te import TEPlan
from dcp_backend.errors import CPError
from dcp_backend.sim.engine import Compute, run
from dcp_backend.sim.hybrid import hybrid_programs
from dcp_backend.sim.network import Links, NetworkModel, get_network
from dcp_backend.sim.op_costs import Costs
from dcp_backend.spec import AttentionSpec
from dcp_backend.topology import Topology


# ----------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    gated_mlp: bool = True  # SwiGLU: two up projections (the 14336 FFN of an 8B model)
    learned_positions: bool = True  # a position embedding table of max-sequence-length rows (as published)

    def params(self, max_positions: int = 0) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + (3 if self.gated_mlp else 2) * h * self.ffn + 4 * h
        emb = 2 * self.vocab * h + (max_positions * h if self.learned_positions else 0)  # untied in/out
        return self.layers * per_layer + emb + 2 * h


# The published end-to-end model ("gpt2-8b"): GPT-2 BPE vocabulary (50257 + 100 extra ids) padded to a
# multiple of 128 x TP 4, learned absolute positions.
GPT_8B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=50688)


@dataclass(frozen=True)
class DeviceRates:
    """Per-GPU rates of the non-attention work."""

    name: str
    gemm_flops_per_s: float
    bytes_per_s: float  # memory-bound operations: bytes read + written per second
    launch_s: float = 5e-6  # per kernel

    @classmethod
    def measure(cls, size: int = 512, repeats: int = 5) -> "DeviceRates":
        """This machine's (CPU) matmul rate and copy bandwidth, measured with torch (seconds)."""
        import torch

        a, b = torch.randn(size, size), torch.randn(size, size)
        x = torch.randn(1 << 22)
        torch.mm(a, b)
        t = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
        c = min(_timed(lambda: x.clone()) for _ in range(repeats))
        return cls("cpu (measured)", 2.0 * size ** 3 / t, 2.0 * x.numel() * 4 / c, 1e-6)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# H100: bf16 matmul about 690 TFLOP/s and copies at 1374-1401 GB/s read + write, both measured on one
# H100 80GB HBM3 (shared DESIGN.md "Kernels"; /work/shared/data/h100_block_costs.jsonl copy rows).
H100 = DeviceRates("h100 (measured matmul and copy rates)", 690e12, 1.39e12)


@dataclass(frozen=True)
class E2ESetup:
    model: ModelShape = GPT_8B
    tp: int = 4
    nodes: int = 8
    gpus_per_node: int = 8
    network: NetworkModel | str = "a100-p4d"
    rates: DeviceRates = H100
    sequence_parallel: bool = True
    grad_bytes: int = 4  # fp32 gradient all-reduce (Megatron with bf16)
    optimizer_bytes_per_param: int = 30  # Adam: grad, fp32 master, m, v read + written, bf16 param written

    def __post_init__(self) -> None:
        m = self.model
        if self.gpus_per_node % self.tp:
            raise CPError(f"e2e: TP {self.tp} must divide the GPUs per node ({self.gpus_per_node}); TP stays in a node")
        if m.heads % self.tp or m.kv_heads % self.tp:
            raise CPError(f"e2e: TP {self.tp} must divide the query heads ({m.heads}) and the KV heads ({m.kv_heads})")
        object.__setattr__(self, "network", get_network(self.network))

    @property
    def cp_topology(self) -> Topology:
        """The context-parallel ranks (each a TP group of ``tp`` GPUs) and their nodes."""
        return Topology.grid(self.nodes, self.gpus_per_node // self.tp)

    def attention_spec(self, mask: str, mask_args: dict | None = None) -> AttentionSpec:
        """The heads of one TP shard."""
        m = self.model
        return AttentionSpec(m.heads // self.tp, m.kv_heads // self.tp, m.head_dim, mask=mask,
                             mask_args=dict(mask_args or {}))

    def shard_network(self) -> NetworkModel:
        """The network one TP shard's CP traffic sees: its GPU's NVLink port, and per node ``1 / tp`` of the
        NICs' bandwidth in one link per CP rank where the node has the NICs for it (all shards send at once)."""
        net = self.network
        ranks = self.gpus_per_node // self.tp
        return replace(net, name=f"{net.name} (1 of {self.tp} TP shards)",
                       inter_bw_per_node=net.inter_bw_per_node / self.tp,
                       nics_per_node=max(1, min(ranks, net.nics_per_node)))

    # ------------------------------------------------------------------ non-attention costs (seconds)
    def _op(self, flops: float, nbytes: float) -> float:
        r = self.rates
        return max(flops / r.gemm_flops_per_s, nbytes / r.bytes_per_s) + r.launch_s

    def _gemm(self, m: float, k: float, n: float) -> float:
        return self._op(2.0 * m * k * n, 2.0 * (m * k + k * n + m * n))

    def _gemm_bwd(self, m: float, k: float, n: float) -> float:
        return self._gemm(m, n, k) + self._gemm(k, m, n)  # input gradient and weight gradient

    def _elementwise(self, elements: float, passes: float) -> float:
        return self._op(0.0, 2.0 * elements * passes)  # bf16 elements, each read or written once per pass

    def _tp_collective(self, tokens: float) -> float:
        """One all-gather or reduce-scatter of ``tokens`` x hidden bf16 inside a TP group."""
        if self.tp == 1:
            return 0.0
        net = self.network
        return (self.tp - 1) / self.tp * tokens * self.model.hidden * 2 / net.intra_bw + (self.tp - 1) * net.intra_latency

    def layer_seconds(self, tokens: float) -> dict:
        """Seconds of one layer's non-attention work on one GPU of a CP rank that runs ``tokens`` rows:
        ``pre`` / ``post`` forward and ``pre_bwd`` / ``post_bwd``."""
        m, tp, T = self.model, self.tp, float(tokens)
        if T <= 0:
            return {"pre": 0.0, "post": 0.0, "pre_bwd": 0.0, "post_bwd": 0.0}
        h = m.hidden
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        up = (2 if m.gated_mlp else 1) * m.ffn / tp
        ts = T / tp if self.sequence_parallel else T  # rows of norms and residuals per GPU
        # four TP collectives a layer each way (sequence parallel: all-gather / reduce-scatter pairs; without
        # it two all-reduces of the same bytes): one before the QKV GEMM, three after the attention
        coll = self._tp_collective(T)
        norm, resid = self._elementwise(ts * h, 2), self._elementwise(ts * h, 3)
        act = self._elementwise(T * m.ffn / tp, 3 if m.gated_mlp else 2)
        qkv, out = (T, h, (q + 2 * kv) / tp), (T, q / tp, h)
        fc1, fc2 = (T, h, up), (T, m.ffn / tp, h)
        pre = norm + coll + self._gemm(*qkv)
        post = self._gemm(*out) + resid + norm + self._gemm(*fc1) + act + self._gemm(*fc2) + resid + 3 * coll
        pre_bwd = 2 * norm + coll + self._gemm_bwd(*qkv)
        post_bwd = self._gemm_bwd(*out) + 2 * resid + 2 * norm + self._gemm_bwd(*fc1) + 2 * act \
            + self._gemm_bwd(*fc2) + 3 * coll
        return {"pre": pre, "post": post, "pre_bwd": pre_bwd, "post_bwd": post_bwd}

    def head_seconds(self, tokens: float) -> float:
        """Embedding, final norm, LM head GEMM, cross-entropy: forward + backward, one GPU, ``tokens`` rows."""
        m, T = self.model, float(tokens)
        if T <= 0:
            return 0.0
        v = m.vocab / self.tp
        fwd = self._elementwise(T * m.hidden, 2) + self._gemm(T, m.hidden, v) + self._op(0.0, 4.0 * T * v * 3)
        return fwd + self._gemm_bwd(T, m.hidden, v) + self._op(0.0, 4.0 * T * v * 2) + self._elementwise(T * m.hidden, 4)

    def grad_sync_seconds(self, max_positions: int) -> float:
        """Ring all-reduce of every TP shard's gradients over the ``cp ranks`` replicas (the ``tp`` rings of a
        node share its NICs; one crossing in and out of each node per ring)."""
        n = self.cp_topology.world_size
        if n == 1:
            return 0.0
        net = self.network
        shard = self.model.params(max_positions) / self.tp * self.grad_bytes
        factor = 2.0 * (n - 1) / n
        steps = 2 * (n - 1)
        if self.nodes == 1:
            return factor * shard / net.intra_bw + steps * net.intra_latency
        return factor * shard * self.tp / net.inter_bw_per_node + steps * net.inter_latency

    def optimizer_seconds(self, max_positions: int) -> float:
        return self._op(0.0, self.model.params(max_positions) / self.tp * self.optimizer_bytes_per_param)


# ----------------------------------------------------------------------------------------- per plan

@functools.singledispatch
def model_tokens(plan) -> np.ndarray:
    """Rows each CP rank runs through the model (the rows it holds)."""
    return np.array([plan.num_local_tokens(r) for r in range(plan.world_size)], dtype=np.int64)


@model_tokens.register
def _(plan: TEPlan) -> np.ndarray:
    return np.full(plan.world_size, plan.layout.local_tokens, dtype=np.int64)  # padded THD buffers


@model_tokens.register
def _(plan: HybridPlan) -> np.ndarray:
    return plan.model_tokens()


@dataclass
class E2EReport:
    label: str
    iteration_s: float
    parts: dict  # seconds: layers (forward + backward, attention included), head, grad_sync, optimizer
    layer_fwd_s: float = 0.0  # one layer's makespan (mean over rounds for hybrid)
    layer_bwd_s: float = 0.0
    tokens: list = field(default_factory=list)  # model rows per rank

    def summary(self) -> dict:
        return {"iteration_s": self.iteration_s, **{f"{k}_s": v for k, v in self.parts.items()},
                "layer_fwd_ms": self.layer_fwd_s * 1e3, "layer_bwd_ms": self.layer_bwd_s * 1e3,
                "max_tokens": int(max(self.tokens)) if self.tokens else 0}


def _wrapped(progs: list, parts: list, backward: bool) -> list:
    a, b = ("post_bwd", "pre_bwd") if backward else ("pre", "post")
    return [[Compute(p[a], a)] + ops + [Compute(p[b], b)] for ops, p in zip(progs, parts)]


def iteration(plan, setup: E2ESetup, costs: Costs, label: str | None = None, cache: dict | None = None,
              max_positions: int | None = None) -> E2EReport:
    """One training iteration of ``setup.model`` with ``plan``'s attention (planned on
    ``setup.cp_topology`` with :meth:`E2ESetup.attention_spec`)."""
    from dcp_backend.sim.simulator import plan_programs

    if plan.topology != setup.cp_topology:
        raise CPError(f"e2e: the plan is for {plan.topology}, the setup's CP ranks are {setup.cp_topology}")
    cache = {} if cache is None else cache
    links = Links(plan.topology, setup.shard_network())
    L = setup.model.layers
    max_positions = int(plan.batch.total_tokens if max_positions is None else max_positions)
    fixed = {"grad_sync": setup.grad_sync_seconds(max_positions), "optimizer": setup.optimizer_seconds(max_positions)}
    tokens = model_tokens(plan)
    if isinstance(plan, HybridPlan):
        layers = head = 0.0
        lf, lb = [], []
        for j in range(len(plan.rounds)):
            per_rank = np.zeros(plan.world_size)

            def wrap(g, i, d, backward=False):
                t = setup.layer_seconds(plan.sample_plan(d, len(g.ranks)).layout.local_tokens)
                per_rank[g.ranks[i]] += setup.head_seconds(plan.sample_plan(d, len(g.ranks)).layout.local_tokens) \
                    if not backward else 0.0
                a, b = ("post_bwd", "pre_bwd") if backward else ("pre", "post")
                return [Compute(t[a], a)], [Compute(t[b], b)]

            f = run(hybrid_programs(plan, False, costs, cache, rounds=[j], wrap=wrap, barrier=False), links).finish
            b = run(hybrid_programs(plan, True, costs, cache, rounds=[j], barrier=False,
                                    wrap=lambda g, i, d: wrap(g, i, d, True)), links).finish
            total = L * (f + b) + per_rank
            layers += float((L * (f + b)).max())
            head += float(total.max()) - float((L * (f + b)).max())
            lf.append(float(f.max()))
            lb.append(float(b.max()))
        barrier = len(plan.rounds) * math.ceil(math.log2(max(plan.world_size, 2))) * setup.network.inter_latency
        parts = {"layers": layers, "head": head, "barriers": barrier, **fixed}
        return E2EReport(label or plan.backend_name, sum(parts.values()), parts, float(np.mean(lf)),
                         float(np.mean(lb)), tokens.tolist())
    per = [setup.layer_seconds(t) for t in tokens]
    res = {}
    for backward in (False, True):
        progs = plan_programs(plan, backward, costs, cache)
        res[backward] = run(_wrapped(progs, per, backward), links).time
    parts = {"layers": L * (res[False] + res[True]),
             "head": max(setup.head_seconds(t) for t in tokens), **fixed}
    return E2EReport(label or plan.backend_name, sum(parts.values()), parts, res[False], res[True], tokens.tolist())


def e2e_candidates(seqlens, mask: str, setup: E2ESetup, cost_model="h100", mask_args: dict | None = None,
                   backends=None, dcp_block_sizes=(1024, 2048), log=None) -> list:
    """Every backend's configurations planned for one batch on the setup's CP ranks and one TP shard's
    heads (:func:`dcp_backend.sim.compare.candidate_plans`)."""
    from dcp_backend.cost_model import load_cost_model
    from dcp_backend.dcp.config import DCPOptions
    from dcp_backend.sim.compare import ALL_BACKENDS, candidate_plans

    cm = load_cost_model(cost_model)
    return candidate_plans(seqlens, setup.attention_spec(mask, mask_args), setup.cp_topology,
                           backends or ALL_BACKENDS, dcp_block_sizes, DCPOptions(cost_model=cm.spec), None, log=log)


def best_iterations(cands: list, setup: E2ESetup, cost_model="h100", kernel: str = "auto", log=None) -> dict:
    """Each backend's best configuration (shortest iteration): {label: (E2EReport, config)}; ``dcp-hypergraph``
    is DCP's hypergraph plans alone."""
    from dcp_backend.cost_model import load_cost_model

    if not cands:
        return {}
    cm = load_cost_model(cost_model)
    costs = Costs.make(cm, "bf16", cands[0].plan.spec.head_dim, kernel=kernel)
    best: dict = {}
    cache: dict = {}
    for c in cands:
        rep = iteration(c.plan, setup, costs, c.label, cache)
        if log:
            log(f"  {c.label:10s} {c.config:34s} iteration {rep.iteration_s:.3f} s (layers {rep.parts['layers']:.3f})")
        labels = (c.label, "dcp-hypergraph") if c.label == "dcp" and c.config.startswith("hypergraph") else (c.label,)
        for label in labels:
            if label not in best or rep.iteration_s < best[label][0].iteration_s:
                best[label] = (rep, c.config)
    return best
