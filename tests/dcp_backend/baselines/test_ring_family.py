"""Ring, zigzag and LoongTrain against the float64 reference: all masks, ragged batches, GQA/MHA,
world sizes 2, 3, 4 and 8, forward and backward, bf16 and an explicit softmax scale."""
import numpy as np
import pytest

from tests.cp_check import Case, check_results, random_seqlens, worker
from tests.distributed import run_ranks

MASKS = [
    ("causal", {}),
    ("full", {}),
    ("sliding_window", {"window": 7}),
    ("lambda", {"sink": 3, "window": 9}),
    ("shared_question", {"question_fraction": 0.25, "num_answers": 3}),
    ("causal_blockwise", {"block": 5, "k_local": 2}),
]


def _cases(world_size: int, backends, seed: int, heads=((4, 2), (4, 4)), docs=6, max_len=40):
    rng = np.random.default_rng(seed)
    cases = []
    for name, options in backends:
        for mask, args in MASKS:
            for h, hkv in heads:
                cases.append(Case(name, random_seqlens(rng, docs, max_len, world_size), num_heads=h, num_kv_heads=hkv,
                                  mask=mask, mask_args=args, options=options, seed=int(rng.integers(1 << 30))))
    return cases


BACKENDS = {
    2: [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 2}), ("loongtrain", {"head_parallel": 1})],
    3: [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 1, "window": 1})],
    4: [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 2, "window": 1}),
        ("loongtrain", {"head_parallel": 4}), ("loongtrain", {"head_parallel": 1, "window": 2})],
}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_family_matches_reference(world_size):
    cases = _cases(world_size, BACKENDS[world_size], seed=world_size)
    check_results(cases, run_ranks(worker, world_size, cases))


def test_eight_ranks_double_ring():
    cases = [
        Case("zigzag", [1, 3, 29, 64, 7], mask="causal", seed=1),
        Case("ring", [50, 2, 33], mask="lambda", mask_args={"sink": 2, "window": 11}, seed=2),
        Case("loongtrain", [1, 3, 29, 64, 7], options={"head_parallel": 2, "window": 2}, seed=3),
        Case("loongtrain", [40, 41, 5], mask="shared_question", num_heads=8, num_kv_heads=2,
             options={"head_parallel": 1, "window": 4, "devices_per_node": 4}, seed=4),
    ]
    check_results(cases, run_ranks(worker, 8, cases))


def test_bf16_explicit_scale_and_single_rank():
    cases = [
        Case("zigzag", [17, 90, 3], dtype="bf16", seed=5),
        Case("loongtrain", [17, 90, 3], dtype="bf16", mask="sliding_window", mask_args={"window": 16},
             options={"head_parallel": 2}, seed=6),
        # a non-default softmax_scale reaches every kernel call (the reference writes its own scale)
        Case("ring", [23, 1, 40], softmax_scale=0.9, seed=9),
        Case("zigzag", [31, 2, 12], mask="lambda", mask_args={"sink": 2, "window": 7}, softmax_scale=0.2, seed=10),
        Case("loongtrain", [29, 3, 18], num_heads=4, num_kv_heads=1, softmax_scale=1.7,
             options={"head_parallel": 1, "window": 1}, seed=11),
    ]
    check_results(cases, run_ranks(worker, 2, cases))
    single = [Case("ring", [5, 1, 12], seed=7), Case("loongtrain", [9, 2], mask="full", seed=8)]
    check_results(single, run_ranks(worker, 1, single))
