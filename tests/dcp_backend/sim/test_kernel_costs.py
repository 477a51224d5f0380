"""Per-backend kernel costs: the derived flash-attn table reproduces the measured SDPA rate it was
derived from; the simulator prices a work as the kernel would run it (flash parts on the flash table, the
rest on the table's kernel plus its backward recompute); flash routing without a flash table is refused."""
import json

import numpy as np
import pytest

from dcp_backend.cost_model import (SDPA_CAUSAL_TFLOPS, calibration_work, derive_flash_table, load_cost_model,
                                    read_table, table_path)
from dcp_backend.errors import CPError
from dcp_backend.kernels import AttnWork
from dcp_backend.sim.op_costs import Costs

H, D = 8, 128


def _work(segments):
    """segments: (q_len, k_len, 'full' | 'causal' | 'window')."""
    ranges, ql, kl = [], [], []
    for q, k, kind in segments:
        i = np.arange(q)
        end = k - q + i + 1 if kind != "full" else np.full(q, k)
        start = np.maximum(0, end - 300) if kind == "window" else np.zeros(q, np.int64)
        ranges.append(np.stack([start, end], -1)[:, None])
        ql.append(q)
        kl.append(k)
    cu = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    return AttnWork(cu(ql), cu(kl), np.concatenate(ranges))


def test_shipped_flash_table_is_the_derivation_and_hits_the_sdpa_rate():
    flex = read_table(str(table_path("h100")))
    derived = derive_flash_table(flex)
    shipped = json.loads(table_path("h100_flash").read_text())
    assert shipped["pair_scale"] == pytest.approx(derived["pair_scale"], rel=1e-9)
    fl, fx = load_cost_model("h100_flash"), load_cost_model("h100")
    n = 32768
    w = calibration_work(1, n, n, "causal_last")
    flops = 4.0 * (n * (n + 1) // 2) * 32 * 128  # an independent pair count
    assert flops / fl.work_seconds(w, 32, 128, "bf16") / 1e12 == pytest.approx(SDPA_CAUSAL_TFLOPS, rel=1e-6)
    assert 0.5 < shipped["pair_scale"]["fwd"] == shipped["pair_scale"]["bwd"] < 1.0
    # faster on pair-heavy works, the same per-call overhead on (nearly) empty ones
    big = calibration_work(8, 2048, 8192, "full")
    assert fl.work_seconds(big, H, D, "bf16", True) < 0.8 * fx.work_seconds(big, H, D, "bf16", True)
    assert fl.call_seconds("bf16", D, False) == fx.call_seconds("bf16", D, False)


def test_flash_routing_prices_each_part_on_its_kernel():
    fx, fl = load_cost_model("h100"), load_cost_model("h100_flash")
    flash = Costs.make(fx, "bf16", D, kernel="flash")
    table = Costs.make(fx, "bf16", D, kernel="table")
    assert flash.flash.name == fl.name == "h100_flash" and flash.recompute == 1.0 and table.flash is None
    assert Costs.make(fx, "bf16", D, kernel="flash").flash is flash.flash  # fitted once: caches key on it
    causal = _work([(1024, 1024, "causal"), (512, 2048, "causal")])
    window = _work([(1024, 1024, "window")])
    for bwd in (False, True):
        # all-causal: one flash call, no recompute; all-window: the flex table plus its recompute
        assert flash.attention(causal, H, bwd) == pytest.approx(fl.work_seconds(causal, H, D, "bf16", bwd))
        want = fx.work_seconds(window, H, D, "bf16", bwd) + (fx.work_seconds(window, H, D, "bf16") if bwd else 0)
        assert flash.attention(window, H, bwd) == pytest.approx(want)
        assert table.attention(window, H, bwd) == pytest.approx(want)
    # mixed: full part + causal part on flash (one call each), the window segment on flex
    mixed = _work([(512, 1024, "full"), (1024, 1024, "window"), (256, 256, "causal")])
    parts = [_work([(512, 1024, "full")]), _work([(256, 256, "causal")])]
    for bwd in (False, True):
        want = sum(fl.work_seconds(p, H, D, "bf16", bwd) for p in parts)
        want += fx.work_seconds(window, H, D, "bf16", bwd) + (fx.work_seconds(window, H, D, "bf16") if bwd else 0)
        assert flash.attention(mixed, H, bwd) == pytest.approx(want)


def test_table_kernels_recompute_only_where_they_do_and_flash_needs_a_flash_table():
    cpu = load_cost_model("cpu")
    c = Costs.make(cpu, "fp32", 64)  # auto: no flash table for the CPU kernel, which does not recompute
    assert c.flash is None and c.recompute == 0.0
    w = _work([(64, 64, "causal")])
    assert c.attention(w, 4, True) == pytest.approx(cpu.work_seconds(w, 4, 64, "fp32", True))
    with pytest.raises(CPError, match="no flash-attn cost table goes with cost model 'cpu'.*kernel='table'"):
        Costs.make(cpu, "fp32", 64, kernel="flash")
    with pytest.raises(CPError, match="kernel routing must be one of"):
        Costs.make(cpu, "fp32", 64, kernel="cudnn")
