"""Acceptance: with the same data, seed and model, the parallel layouts reproduce the single-process
(TP 1 x CP 1) lm loss and grad norm of the first 10 iterations within 1e-5 relative (fp32, weights
initialised on the CPU, so every tensor-parallel size starts from the same weights):

* every CP backend at CP 4, for the causal mask and a sparse mask (lambda);
* tensor x context parallel, TP 2 x CP 2, for dcp and zigzag: each TP rank runs its CP backend on its
  local heads (2 of 4 query heads, 1 of 2 KV groups) inside megatron's CP group of that TP rank
  (strided ranks: {0, 2} and {1, 3});
* tensor x data parallel, TP 2 x DP 2, and data x context parallel, DP 2 x CP 2, against gradient
  accumulation over the same two packs on one process.

The single-process run is the same launcher at world size 1 (the backend then holds every token on one
rank and attends locally). Agreement of every iteration's loss and gradient norm means the forward pass,
the per-document RoPE positions, the loss normalisation over the whole batch (megatron's schedule and
finalize_model_grads with per-token loss) and the gradient reduction all match the unsharded computation.
"""
import pytest

from megatron.training.training import pretrain
from tests.distributed import run_ranks
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

ITERS = 10
TOL = 1e-5
MASKS = {
    "causal": ["--attention-mask", "causal"],
    "lambda": ["--attention-mask", "lambda", "--mask-sink", "4", "--mask-window", "24"],
}
BACKENDS = {
    "ring": [],
    "zigzag": [],
    # 4 ranks = 2 head-parallel slots x 2 ring positions; window 1 makes those 2 positions 2 windows, so
    # the double ring's outer ring (its hand-offs between windows) runs, not only the inner ring.
    "loongtrain": ["--loongtrain-head-parallel", "2", "--loongtrain-window", "1"],
    "dcp": ["--cp-devices-per-node", "2"],
}
TP2_CP2 = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"]


def base_args(data_prefix: str) -> list[str]:
    # --make-vocab-size-divisible-by 64: 97 ids pad to 128 at TP 1 (64 x 1) and at TP 2 (64 x 2) alike.
    return ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 320 "
            f"--train-iters {ITERS} --vocab-size {VOCAB} --make-vocab-size-divisible-by 64 --lr 3e-3 "
            "--lr-decay-style constant --seed 11 --use-cpu-initialization --position-embedding-type rope "
            "--log-interval 1000 --eval-iters 0 --num-workers 0 --swiglu --normalization RMSNorm "
            f"--disable-bias-linear --data-path {data_prefix}").split()


def _quiet(*args, **kwargs):
    pass


def train_runs(rank, world_size, runs):
    """Run several trainings in one set of processes; returns {name: [(loss, grad norm), ...]}."""
    return {name: [(m["lm_loss"], m["grad_norm"]) for m in pretrain(argv, printer=_quiet)] for name, argv in runs}


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    # Ragged lengths from 2 to 260 tokens: several documents per 320-token batch, some shorter than the
    # number of ranks.
    return write_indexed(str(tmp_path_factory.mktemp("data") / "docs"), documents(120, 2, 260, seed=3))


@pytest.fixture(scope="module")
def reference(data_prefix):
    runs = [(mask, base_args(data_prefix) + ["--cp-backend", "ring"] + flags) for mask, flags in MASKS.items()]
    runs.append(("causal_gbs2", base_args(data_prefix) + ["--cp-backend", "ring", "--global-batch-size", "2"]))
    return run_ranks(train_runs, 1, runs)[0]


def _assert_close(got, ref, what):
    assert len(got) == len(ref) == ITERS, what
    for i, ((loss, gnorm), (rloss, rgnorm)) in enumerate(zip(got, ref)):
        assert abs(loss - rloss) <= TOL * abs(rloss), f"{what} iteration {i + 1}: loss {loss!r} vs {rloss!r}"
        assert abs(gnorm - rgnorm) <= TOL * abs(rgnorm), f"{what} iteration {i + 1}: grad norm {gnorm!r} vs {rgnorm!r}"


# Extra layouts run in the same processes as a backend's CP 4 runs (one spawn per backend).
EXTRA = {
    "zigzag": {"tp2_cp2": (TP2_CP2, "causal"),
               "tp2_dp2": (["--tensor-model-parallel-size", "2", "--global-batch-size", "2"], "causal_gbs2"),
               "dp2_cp2": (["--context-parallel-size", "2", "--global-batch-size", "2"], "causal_gbs2")},
    "dcp": {"tp2_cp2": (TP2_CP2 + ["--cp-devices-per-node", "1"], "causal"),
            "tp2_cp2_lambda": (TP2_CP2 + MASKS["lambda"], "lambda")},
}


@pytest.mark.parametrize("backend", ["ring", "zigzag", "loongtrain", "dcp"])
def test_four_ranks_match_single_process(backend, data_prefix, reference):
    runs = [(mask, base_args(data_prefix) + ["--cp-backend", backend, "--context-parallel-size", "4"]
             + BACKENDS[backend] + flags) for mask, flags in MASKS.items()]
    for name, (flags, _) in EXTRA.get(backend, {}).items():
        runs.append((name, base_args(data_prefix) + ["--cp-backend", backend] + flags))
    per_rank = run_ranks(train_runs, 4, runs, timeout=600)
    for mask in MASKS:
        for rank in range(4):  # every rank sees the global loss and norm
            _assert_close(per_rank[rank][mask], reference[mask], f"{backend}/{mask} rank {rank}")
    for name, (_, ref) in EXTRA.get(backend, {}).items():
        for rank in range(4):
            _assert_close(per_rank[rank][name], reference[ref], f"{backend}/{name} rank {rank}")
