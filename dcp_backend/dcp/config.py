"""DCP options: a frozen dataclass validated at construction, each field documented (its help text becomes
the launcher flag ``--dcp-<field>``). The topology (world size, devices per node) is not an option: it
comes with every plan (:class:`~dcp_backend.topology.Topology`)."""
from __future__ import annotations

from dataclasses import dataclass

from dcp_backend.contract import KernelOptions, option, positive_int
from dcp_backend.errors import CPError

PARTITIONERS = ("mtkahypar", "greedy")
PLACEMENTS = ("hypergraph", "zigzag", "zigzag2d", "auto")
COMMUNICATIONS = ("hierarchical", "direct")
SEEDS = ("structured", "none")
PARTIAL_DTYPES = ("model", "fp32")
SCHEDULES = ("stages", "ring")


def own_rows_factor(memory_limit) -> float | None:
    """The N of a ``memory_limit`` of the form ``"Nx"`` (N > 1: a multiple of the mean device's own rows), else None."""
    if not isinstance(memory_limit, str) or not memory_limit.endswith("x"):
        return None
    try:
        factor = float(memory_limit[:-1])
    except ValueError:
        return None
    return factor if factor > 1 else None


@dataclass(frozen=True)
class DCPOptions(KernelOptions):
    """Options of the ``dcp`` backend (see each field's help)."""

    block_size: int | str = option("auto", "tokens per block, or auto (chosen per batch from the lengths and the "
                                           "device count)")
    head_block_size: int | None = option(None, "query heads per head block (default: the query heads of one KV "
                                               "head, so a block never splits a GQA group; 1 = finest)")
    compute_imbalance: float = option(0.10, "allowed max/mean - 1 of attention compute per device")
    memory_imbalance: float = option(0.20, "allowed max/mean - 1 of tokens held per device")
    inter_node_imbalance_factor: float = option(
        1.0, "compute tolerance multiplier of the node-level partition (a looser node balance made the per-device "
             "repair move more blocks across nodes; docs/BENCHMARKS.md, dry-run sweep)")
    num_stages: int = option(4, "communication stages after the local stage (stage s+1's inputs arrive while "
                                "stage s computes)")
    seed: int = option(0, "partitioner seed (plans are deterministic for a given seed)")
    partitioner: str = option("mtkahypar", "mtkahypar (hypergraph partitioning) or greedy (no solver; a fast "
                                           "fallback)")
    inter_node_cost: float = option(8.0, "relative cost of a byte across nodes against one inside a node "
                                         "(the scheduler's stage budgets)")
    min_block_size: int = option(16, "smallest block size block_size=auto may choose")
    max_block_size: int = option(8192, "largest block size block_size=auto may choose")
    cost_model: str | None = option(None, "planner compute weights: none (unmasked pairs x heads), a shipped cost "
                                          "table (h100, cpu), a table path, or analytic:<preset> "
                                          "(dcp_backend.cost_model)")
    placement: str = option("hypergraph", "hypergraph (Mt-KaHyPar), zigzag (static snake-dealt blocks, "
                                          "computation on the query owner), zigzag2d (LoongTrain's layout: "
                                          "head groups x snake-dealt blocks) or auto (plan both, the hypergraph also at "
                                          "twice compute_imbalance, and a 2D zigzag, the hypergraph and 2D zigzag "
                                          "also with the other schedule; simulate them with the cost model, keep "
                                          "the fastest within memory_limit)")

    placement_seeds: str = option("structured", "structured (the hypergraph placement is compared with the "
                                                "zigzag, node-packed and 2D zigzag placements of the same blocks, "
                                                "repaired under the same balance limits; the one moving the fewest "
                                                "bytes across nodes is kept) or none")
    communication: str = option("hierarchical", "hierarchical (inter-node sends spread over a node's devices, "
                                                "partial results reduced inside a node before they cross) or "
                                                "direct (every block sent by its owner, every partial straight "
                                                "to its owner)")
    partial_dtype: str = option("model", "dtype partial results (out, dq, dk/dv) travel in: model (the input "
                                         "dtype, e.g. bf16: half the bytes of fp32; they are computed and reduced "
                                         "in fp32, lse travels in fp32) or fp32")
    memory_limit: float | str = option("none", "attention memory per device and pass, in MB (own rows, received "
                                               "blocks, partial results, transfer buffers): the devices over it "
                                               "hold fewer received blocks at once, in an order that finishes "
                                               "with a block before the next, over more stages, until they fit "
                                               "(an error if they cannot); Nx (e.g. 2.5x) = N times the mean "
                                               "device's own rows, the same cap on every device, best effort "
                                               "(memory stays flat as the cluster grows); auto = 2x; none = no "
                                               "limit (fastest)")
    schedule: str = option("stages", "stages (num_stages communication stages, each receiving the blocks that "
                                     "unlock the most compute per byte; memory_limit bounds what is held) or ring "
                                     "(LoongTrain's double ring in DCP's instructions: every block visits its "
                                     "readers in ring order, crossing into each node once, with its dK/dV partial "
                                     "accumulating along the way; little memory, one stage per ring position)")
    refetch: bool = option(True, "under a memory_limit that slot budgets alone do not meet, a device may hold one "
                                 "side of its remote query x remote key pairs in groups and receive the other side "
                                 "again for every group (more bytes, less memory); false = every block once per pass")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.refetch, bool):
            raise CPError(f"dcp option refetch must be true or false, got {self.refetch!r}")
        positive_int("dcp", "head_block_size", self.head_block_size, allow_none=True)
        for name in ("num_stages", "min_block_size", "max_block_size"):
            positive_int("dcp", name, getattr(self, name))
        if self.block_size != "auto":
            positive_int("dcp", "block_size", self.block_size)
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
        if not (self.memory_limit in ("auto", "none") or own_rows_factor(self.memory_limit) is not None
                or (isinstance(self.memory_limit, (int, float)) and not isinstance(self.memory_limit, bool)
                    and self.memory_limit > 0)):
            raise CPError(f"dcp option memory_limit must be a positive number of MB, 'auto', a multiple of a "
                          f"device's own rows above 1 such as '2.5x', or 'none', got {self.memory_limit!r}")
        if self.placement_seeds not in SEEDS:
            raise CPError(f"dcp option placement_seeds must be one of {SEEDS}, got {self.placement_seeds!r}")
        if self.communication not in COMMUNICATIONS:
            raise CPError(f"dcp option communication must be one of {COMMUNICATIONS}, got {self.communication!r}")
        if self.partial_dtype not in PARTIAL_DTYPES:
            raise CPError(f"dcp option partial_dtype must be one of {PARTIAL_DTYPES}, got {self.partial_dtype!r}")
        if self.schedule not in SCHEDULES:
            raise CPError(f"dcp option schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.partitioner not in PARTITIONERS:
            raise CPError(f"dcp option partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
