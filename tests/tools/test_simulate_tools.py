"""tools/simulate.py prints the per-backend table and DCP's speed-up; tools/calibrate.py converts measured
rows and measures a (tiny) grid into tables the cost model loads."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

import calibrate  # noqa: E402
import simulate  # noqa: E402

from dcp_backend.cost_model import load_cost_model  # noqa: E402


def test_simulate_prints_every_backend_and_the_speedup(capsys, tmp_path):
    out = tmp_path / "s.json"
    assert simulate.main(["--seqlens", "6000,2000,300,64", "--nodes", "2", "--devices-per-node", "4",
                          "--all-backends", "--dcp-block-sizes", "512", "--lt-windows", "1,2", "--quiet",
                          "--json", str(out), "--network", "a100-p4d"]) == 0
    text = capsys.readouterr().out
    for label in ("ring", "zigzag", "loongtrain", "te ", "te-a2a", "hybrid", "dcp ", "dcp-hypergraph"):
        assert f"\n{label}" in text
    assert "dcp speed-up over the best baseline, fwd:" in text and "bwd:" in text
    data = json.loads(out.read_text())
    r = data["batches"][0]["results"]
    assert r["dcp"]["fwd_ms"] > 0 and "fwd_critical_compute_ms" in r["ring"]


def test_simulate_sparse_mask_models_forked_te(capsys):
    assert simulate.main(["--seqlens", "3000,500", "--nodes", "1", "--devices-per-node", "4", "--backends",
                          "te-a2a,dcp", "--mask", "lambda", "--mask-arg", "sink=8", "--mask-arg", "window=256",
                          "--dcp-block-sizes", "256", "--quiet"]) == 0
    assert "range masks" in capsys.readouterr().out


def test_calibrate_converts_and_measures(tmp_path):
    rows = [{"heads": 8, "kv_heads": 2, "head_dim": 128, "block": 512, "kv_blocks": k, "causal_last": c,
             "q_tokens": 2048, "kv_tokens": 2048 * k, "pairs": 1, "fwd_ms": 0.1 * k, "fwdbwd_ms": 0.35 * k}
            for k in (1, 4) for c in (False, True)] + [{"copy_block_tokens": 512, "bytes": 1, "ms": 1,
                                                         "GBps_read_plus_write": 1000.0}]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "conv.json"
    assert calibrate.main(["--from-jsonl", str(src), "--out", str(out)]) == 0
    cm = load_cost_model(str(out))
    assert cm.source("bf16", 128) == "table" and cm.copy_bytes_per_s == pytest.approx(500e9)
    meas = tmp_path / "cpu.json"
    assert calibrate.main(["--out", str(meas), "--dtypes", "fp32", "--head-dims", "8", "--heads", "2/1",
                           "--q-lens", "16", "--kv-mults", "1", "--masks", "full,causal_last", "--work", "1e4",
                           "--repeats", "1", "--warmup", "0"]) == 0
    table = json.loads(meas.read_text())
    assert table["visit"] == "dense_unless_causal" and len(table["points"]) == 4
    assert load_cost_model(str(meas)).source("fp32", 8) == "table"


def test_calibrate_derives_the_shipped_flash_table(tmp_path):
    from dcp_backend.cost_model import table_path

    out = tmp_path / "flash.json"
    assert calibrate.main(["--derive-flash", str(table_path("h100")), "--out", str(out)]) == 0
    got, shipped = json.loads(out.read_text()), json.loads(table_path("h100_flash").read_text())
    assert got["kernel"] == "flash" and got["points"] == shipped["points"]
    assert got["pair_scale"] == pytest.approx(shipped["pair_scale"])
    assert "no flash-attn backward was measured" in got["source"]


def test_simulate_takes_dcp_options(capsys, tmp_path):
    out = tmp_path / "s.json"
    argv = ["--seqlens", "3000,500", "--nodes", "2", "--devices-per-node", "2", "--backends", "zigzag,dcp",
            "--dcp-block-sizes", "256", "--dcp-candidates", "hypergraph", "--quiet"]
    assert simulate.main([*argv, "--dcp-option", "memory_limit=2x", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["args"]["dcp_options"] == {"memory_limit": "2x"}
    capsys.readouterr()
    assert simulate.main([*argv, "--dcp-option", "memory_limit=-1"]) == 2
    assert "--dcp-option: dcp option memory_limit must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        simulate.main([*argv, "--dcp-option", "memory_limit"])


def test_simulate_dcp_shares_take_fractions_and_refuse_bad_input(capsys):
    assert simulate.parse_args(["--seqlens", "100", "--dcp-shares", "1,1.5,2"]).dcp_shares == (1, 1.5, 2)
    for bad in ("1,x", "0.5", ""):
        with pytest.raises(SystemExit):
            simulate.parse_args(["--seqlens", "100", "--dcp-shares", bad])
        assert "token-share factors of at least 1" in capsys.readouterr().err


def test_simulate_dcp_compute_tolerances_are_parsed_and_refuse_bad_input(capsys):
    args = simulate.parse_args(["--seqlens", "100", "--dcp-compute-tolerances", "0.1,0.25"])
    assert args.dcp_compute_tolerances == (0.1, 0.25)
    for bad in ("0.1,x", "0", "-0.2", ""):
        with pytest.raises(SystemExit):
            simulate.parse_args(["--seqlens", "100", "--dcp-compute-tolerances", bad])
        assert "compute_imbalance values above 0" in capsys.readouterr().err
