"""tools/reproduce_e2e.py on a tiny cluster: every backend's iteration per network in the JSON, the table
with DCP's speed-ups, the figure files; --plot-only redraws from the JSON."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

import reproduce_e2e  # noqa: E402


def test_tiny_run_writes_results_tables_and_figures(tmp_path, capsys):
    out, fig = tmp_path / "e2e", tmp_path / "fig"
    args = ["--out", str(out), "--figures", str(fig), "--datasets", "ldc", "--msl", "4096", "--masks", "causal",
            "--batches", "1", "--networks", "h100-p5,a100-p4d", "--nodes", "2", "--gpus-per-node", "4", "--tp", "2",
            "--dcp-block-sizes", "512"]
    assert reproduce_e2e.main(args) == 0
    text = capsys.readouterr().out
    assert "Iteration time (s), `h100-p5`" in text and "MCore hybrid CP" in text and "DCP / MLM" in text
    res = json.loads((out / "results.json").read_text())
    r = res["points"][0]["results"]
    assert set(r) == {"h100-p5", "a100-p4d"}
    assert {"ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp"} <= set(r["a100-p4d"])
    # the slower network only lengthens iterations (same plans, same compute)
    assert all(r["a100-p4d"][k]["iteration_s"] >= r["h100-p5"][k]["iteration_s"] for k in r["h100-p5"])
    assert sorted(os.listdir(fig)) == ["fig14_15_e2e_a100-p4d.pdf", "fig14_15_e2e_a100-p4d.png",
                                       "fig14_15_e2e_h100-p5.pdf", "fig14_15_e2e_h100-p5.png"]
    assert reproduce_e2e.main(args + ["--plot-only"]) == 0
