"""DCP options: a validated dataclass (all fields documented), shared by the planner and the backend."""
from __future__ import annotations

from dataclasses import dataclass

from dcp_backend.backend import BackendOptions
from dcp_backend.errors import CPError

PARTITIONERS = ("mtkahypar", "greedy")
PLACEMENTS = ("hypergraph", "zigzag", "auto")


@dataclass(frozen=True)
class DCPOptions(BackendOptions):
    """Options of the ``dcp`` backend.

    devices_per_node: ranks per node; the world is nodes x devices_per_node (None = one node).
    block_size: tokens per block, or "auto" (chosen per batch from the lengths and the device count).
    head_block_size: query heads per head block (None = query heads per KV head, so a block never
        splits a GQA group; 1 = finest).
    compute_imbalance: allowed max/mean - 1 of attention compute per device (default 0.10).
    memory_imbalance: allowed max/mean - 1 of tokens held per device (default 0.20).
    inter_node_imbalance_factor: compute tolerance multiplier for the node-level partition (default 1: a
        looser node-level balance made the per-device repair move more blocks across nodes; measured in
        the dry-run sweep, docs/BENCHMARKS.md).
    num_stages: communication stages after the local stage (inputs of stage s+1 arrive while stage s
        computes).
    seed: partitioner seed (plans are deterministic for a given seed).
    partitioner: "mtkahypar" (hypergraph partitioning, default) or "greedy" (no solver; fast fallback).
    inter_node_cost: relative cost of a byte across nodes vs inside one (used by the scheduler's budget).
    min_block_size / max_block_size: bounds for block_size="auto".
    cost_model: None (balance unmasked pairs x heads, the default) or a cost table for the planner's
        compute weights in seconds: "h100", "cpu" (shipped tables), a table path, or "analytic:<preset>"
        (see dcp_backend.cost_model).
    placement: "hypergraph" (default: Mt-KaHyPar placement), "zigzag" (static snake-dealt token blocks,
        computation on the query owner) or "auto" (plan both, simulate both with the cost model on that
        table's network preset, keep the faster; costs two plans and two simulations per batch). See
        dcp_backend.dcp.candidates.
    """

    devices_per_node: int | None = None
    block_size: int | str = "auto"
    head_block_size: int | None = None
    compute_imbalance: float = 0.10
    memory_imbalance: float = 0.20
    inter_node_imbalance_factor: float = 1.0
    num_stages: int = 4
    seed: int = 0
    partitioner: str = "mtkahypar"
    inter_node_cost: float = 8.0
    min_block_size: int = 16
    max_block_size: int = 8192
    cost_model: str | None = None
    placement: str = "hypergraph"

    def validate(self) -> None:
        super().validate()

        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CPError(f"dcp option {name} must be a positive int, got {v!r}")

        pos_int("devices_per_node", allow_none=True)
        pos_int("head_block_size", allow_none=True)
        pos_int("num_stages")
        pos_int("min_block_size")
        pos_int("max_block_size")
        if self.block_size != "auto":
            pos_int("block_size")
        if self.min_block_size > self.max_block_size:
            raise CPError("dcp option min_block_size must not exceed max_block_size")
        for name in ("compute_imbalance", "memory_imbalance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 10:
                raise CPError(f"dcp option {name} must be a number in [0, 10], got {v!r}")
        for name in ("inter_node_imbalance_factor", "inter_node_cost"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 1:
                raise CPError(f"dcp option {name} must be a number >= 1, got {v!r}")
        if not isinstance(self.seed, int):
            raise CPError(f"dcp option seed must be an int, got {self.seed!r}")
        if self.cost_model is not None:
            if not isinstance(self.cost_model, str):
                raise CPError(f"dcp option cost_model must be None or a table name/path, got {self.cost_model!r}")
            from dcp_backend.cost_model import load_cost_model

            load_cost_model(self.cost_model)  # raises CPError naming the problem
        if self.placement not in PLACEMENTS:
            raise CPError(f"dcp option placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.partitioner not in PARTITIONERS:
            raise CPError(f"dcp option partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
