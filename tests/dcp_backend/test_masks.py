"""Masks: the vectorised range masks against a per-token brute force written from DESIGN.md's table
(tests/reference_oracle.py, which the exactness tests use as their reference too), the canonical form
of ranges, custom masks, and argument errors."""
import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend import masks
from dcp_backend.batch import PackedBatch
from tests.reference_oracle import MASK_DEFAULTS, mask_args_with_defaults, visible_keys

MASK_ARGS = {
    "causal": [{}],
    "full": [{}],
    "sliding_window": [{}, {"window": 1}, {"window": 5}],
    "lambda": [{}, {"sink": 0, "window": 3}, {"sink": 4, "window": 2}, {"sink": 10, "window": 1}],
    "shared_question": [{}, {"question_fraction": 0.0, "num_answers": 1}, {"question_fraction": 0.3,
                        "num_answers": 3}, {"question_fraction": 1.0, "num_answers": 2},
                        {"question_fraction": 0.5, "num_answers": 7}],
    "causal_blockwise": [{}, {"block": 1, "k_local": 1}, {"block": 3, "k_local": 2}, {"block": 4, "k_local": 5}],
}


def ranges_to_sets(ranges):
    return [set().union(*(range(s, e) for s, e in row)) for row in ranges.tolist()]


def assert_canonical(r, lengths):
    s, e = r[..., 0], r[..., 1]
    empty = e <= s
    assert np.all(s[empty] == 0) and np.all(e[empty] == 0), "empty ranges are (0, 0)"
    assert np.all(s >= 0) and np.all(e <= lengths[:, None]), "ranges are clipped to the document"
    # non-empty ranges come first, sorted, disjoint and not touching-overlapping
    for row, emp in zip(r.tolist(), empty.tolist()):
        live = [x for x, m in zip(row, emp) if not m]
        assert emp == [False] * len(live) + [True] * (len(row) - len(live))
        for (s0, e0), (s1, e1) in zip(live, live[1:]):
            assert e0 <= s1


def test_builtin_masks_match_brute_force():
    rng = np.random.default_rng(0)
    assert set(MASK_ARGS) == set(MASK_DEFAULTS) and set(MASK_ARGS) <= set(cp.available_masks())
    for name, arg_list in MASK_ARGS.items():
        for args in arg_list:
            for trial in range(3):
                lens = [1] + rng.integers(1, 40, size=4).tolist() + [int(rng.integers(1, 4))]
                batch = PackedBatch.from_seqlens(lens)
                full_args = mask_args_with_defaults(name, args)  # DESIGN.md's defaults, not the library's
                assert masks.resolve_mask_args(name, args) == full_args
                r = masks.build_ranges(batch, name, args)
                assert_canonical(r, batch.token_seqlens)
                got = ranges_to_sets(r)
                want = [visible_keys(name, full_args, int(i), int(L))
                        for i, L in zip(batch.positions, batch.token_seqlens)]
                assert got == want, (name, args, lens)
                assert np.array_equal(masks.range_lengths(r), [len(x) for x in want])


def test_canonical_form_of_messy_custom_ranges():
    def messy(pos, length, shift):
        # overlapping, unsorted, out-of-document and empty ranges
        a = np.stack([pos - shift, pos + 1], -1)
        b = np.stack([pos + 5, pos - 2], -1)  # empty (end < start)
        c = np.stack([np.zeros_like(pos), np.minimum(pos, 2)], -1)
        d = np.stack([-7 + 0 * pos, length + 10], -1) * (pos % 3 == 0)[:, None]  # every third row: all keys
        return np.stack([b, a, d, c], 1)

    cp.register_mask("test_messy", messy, {"shift": 3})
    try:
        batch = PackedBatch.from_seqlens([1, 9, 4, 17])
        r = masks.build_ranges(batch, "test_messy", {"shift": 4})
        assert_canonical(r, batch.token_seqlens)
        for (i, L), keys in zip(zip(batch.positions, batch.token_seqlens), ranges_to_sets(r)):
            want = set(range(max(0, i - 4), i + 1)) | set(range(0, min(i, 2)))
            if i % 3 == 0:
                want = set(range(L))
            assert keys == want
        spec = cp.AttentionSpec(2, 1, 4, mask="test_messy", mask_args={"shift": 1})
        assert spec.mask_args == {"shift": 1}
        with pytest.raises(cp.CPError, match="already registered"):
            cp.register_mask("test_messy", messy)
        cp.register_mask("test_messy", messy, {"shift": 2}, overwrite=True)
        assert masks.resolve_mask_args("test_messy", {}) == {"shift": 2}
    finally:
        masks._MASKS.pop("test_messy", None)


def test_custom_mask_used_by_reference_and_clip_ranges():
    def two_back(pos, length):  # keys i-2 and i only (2-D return: one range per row is also accepted)
        return np.stack([np.maximum(pos - 2, 0), pos + 1], -1)

    cp.register_mask("test_two_back", two_back)
    try:
        from dcp_backend.dense_reference import dense_visibility

        vis = dense_visibility([3, 5], cp.AttentionSpec(1, 1, 2, mask="test_two_back"))
        assert vis.sum() == sum(min(i, 2) + 1 for L in (3, 5) for i in range(L))
        assert not vis[3, :3].any(), "attention never crosses documents"
    finally:
        masks._MASKS.pop("test_two_back", None)
    r = np.array([[[0, 4], [6, 9]], [[2, 3], [0, 0]]])
    out = masks.clip_ranges(r, 3, 7)
    assert out.tolist() == [[[0, 1], [3, 4]], [[0, 0], [0, 0]]]


@pytest.mark.parametrize("name,args,match", [
    ("nope", {}, "unknown mask 'nope'"),
    ("causal", {"window": 3}, "unknown argument"),
    ("sliding_window", {"window": 0}, "window must be a positive int"),
    ("sliding_window", {"window": 2.5}, "window must be a positive int"),
    ("lambda", {"sink": -1}, "sink must be a non-negative int"),
    ("shared_question", {"question_fraction": 1.5}, r"question_fraction must be in \[0, 1\]"),
    ("shared_question", {"num_answers": 0}, "num_answers must be a positive int"),
    ("causal_blockwise", {"block": True}, "block must be a positive int"),
    ("causal_blockwise", {"k_local": -2}, "k_local must be a positive int"),
])
def test_bad_mask_arguments(name, args, match):
    with pytest.raises(cp.CPError, match=match):
        cp.AttentionSpec(4, 2, 8, mask=name, mask_args=args)


def test_bad_registrations():
    with pytest.raises(cp.CPError, match="non-empty string"):
        cp.register_mask("", lambda p, L: p)
    with pytest.raises(cp.CPError, match="callable"):
        cp.register_mask("test_not_callable", 3)
    cp.register_mask("test_bad_shape", lambda pos, length: np.zeros((pos.size, 3)))
    try:
        with pytest.raises(cp.CPError, match=r"shape \[n, R, 2\]"):
            masks.build_ranges(PackedBatch.from_seqlens([4]), "test_bad_shape")
    finally:
        masks._MASKS.pop("test_bad_shape", None)


def test_parse_mask_args():
    from dcp_backend.masks import parse_mask_args

    assert parse_mask_args(["window=512", "question_fraction=0.25", " name = x"]) == {
        "window": 512, "question_fraction": 0.25, "name": "x"}
    assert parse_mask_args(None) == {}
    with pytest.raises(cp.CPError, match="KEY=VALUE"):
        parse_mask_args(["window"])
