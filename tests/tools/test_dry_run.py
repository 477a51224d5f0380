"""tools/dry_run.py and tools/plot_dry_run.py on tiny batches: the --json records carry every required
figure with sane values for DCP and the four baselines; --seqlens-file takes a JSON list of batches and
one length per line (packed whole, in order), and names an over-budget document; a micro --sweep writes
one CSV row per (grid, configuration, batch) and the plot script turns it into PNG and PDF figures."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcp_backend.dcp.config import DCPOptions
from dcp_backend.batch import PackedBatch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "dry_run.py"
PLOT = ROOT / "tools" / "plot_dry_run.py"
TINY = ["--nodes", "2", "--devices-per-node", "2", "--block-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
        "--head-dim", "16"]
REQUIRED = ("planning_seconds", "fwd_inter_node_bytes", "bwd_inter_node_bytes", "fwd_intra_node_bytes",
            "bwd_intra_node_bytes", "compute_imbalance", "memory_imbalance", "max_device_memory_bytes", "num_stages")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry():
    return _load("dry_run_under_test", TOOL)


def _json_records(dry, capsys, *argv):
    assert dry.main([*argv, "--json", "--no-progress"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_json_has_required_keys_and_sane_values():
    seqlens = [300, 17, 129, 64, 1, 250]
    proc = subprocess.run([sys.executable, str(TOOL), "--seqlens", ",".join(map(str, seqlens)), *TINY, "--json",
                           "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for k in REQUIRED:
        assert k in rec, k
    assert rec["seqlens"] == seqlens and rec["tokens"] == sum(seqlens) and rec["world_size"] == 4
    assert rec["verified"] is True and rec["num_stages"] == 4 and rec["block_size"] == 64
    assert rec["planning_seconds"] > 0 and rec["planning_cpu_seconds"] > 0
    assert abs(sum(rec["planning_seconds_by_phase"].values()) - rec["planning_seconds"]) < 1e-9
    assert set(rec["planning_seconds_by_phase"]) == {"blocks", "partition", "schedule", "compile"}
    ph = rec["planning_seconds_by_phase"]  # one rank: everything but the other ranks' programs
    assert ph["blocks"] + ph["partition"] + ph["schedule"] < rec["rank_planning_seconds"] < rec["planning_seconds"]
    assert 1.0 <= rec["compute_imbalance"] <= 1.1 + 1e-9  # the default limit, met on this batch
    assert rec["memory_imbalance"] >= 1.0 and rec["max_device_memory_bytes"] == max(rec["memory_bytes"])
    assert sum(rec["tokens_per_device"]) == sum(seqlens)
    assert len(rec["fwd_inter_node_bytes_per_rank"]) == 4
    assert sum(rec["fwd_inter_node_bytes_per_rank"]) == rec["fwd_inter_node_bytes"]
    assert rec["mask_sparsity"] == pytest.approx(1.0)
    assert set(rec["baselines"]) == {"ring", "zigzag", "loongtrain", "te", "hybrid"}
    for name, b in rec["baselines"].items():
        assert "error" not in b, (name, b)
        for k in REQUIRED[1:-1]:
            assert k in b, (name, k)
        # hybrid keeps short documents on one rank and the two longest inside a node here
        assert (b["fwd_inter_node_bytes"] > 0 or name == "hybrid") and b["compute_imbalance"] >= 1.0
    assert rec["baselines"]["hybrid"]["rounds"] >= 1 and rec["baselines"]["hybrid"]["max_seqlen_per_rank"] == 191
    # the static ring's causal imbalance is the known ~2x on 2 x 2 devices; zigzag balances it
    assert rec["baselines"]["ring"]["compute_imbalance"] > rec["baselines"]["zigzag"]["compute_imbalance"]


def test_text_output_and_a_mask_te_does_not_take(dry, capsys):
    assert dry.main(["--seqlens", "200,90,31", *TINY, "--mask", "lambda", "--mask-arg", "sink=4",
                     "--mask-arg", "window=32"]) == 0
    out = capsys.readouterr().out
    for name in ("dcp", "ring", "zigzag", "loongtrain"):
        assert f"\n  {name} " in out
    assert "te: mask 'lambda' is not supported" in out
    assert "dcp planning" in out and "partition" in out
    rec = _json_records(dry, capsys, "--seqlens", "200,90,31", *TINY, "--mask", "lambda", "--mask-arg",
                        "window=32", "--baselines", "zigzag,te")[0]
    assert set(rec["baselines"]) == {"zigzag", "te"} and "error" in rec["baselines"]["te"]
    assert 0 < rec["mask_sparsity"] < 1 and rec["mask_args"]["window"] == 32


def test_dataset_batches_one_record_each(dry, capsys):
    recs = _json_records(dry, capsys, "--dataset", "ldc", "--num-batches", "3", "--tokens-per-batch", "512",
                         *TINY, "--baselines", "none")
    assert [r["batch"] for r in recs] == [0, 1, 2]
    assert all(r["tokens"] <= 512 and r["baselines"] == {} for r in recs)


def test_seqlens_file_formats(dry, capsys, tmp_path):
    batches = [[100, 30, 7], [256, 1]]
    f = tmp_path / "batches.json"
    f.write_text(json.dumps(batches))
    recs = _json_records(dry, capsys, "--seqlens-file", str(f), *TINY, "--baselines", "zigzag")
    assert [r["seqlens"] for r in recs] == batches
    f.write_text(json.dumps({"batches": batches}))  # the published study's file layout
    assert [r["seqlens"] for r in _json_records(dry, capsys, "--seqlens-file", str(f), *TINY,
                                                "--baselines", "none")] == batches
    lengths = [120, 100, 40, 200, 3, 250, 9]
    f = tmp_path / "lengths.txt"
    f.write_text("# one document per line\n" + "\n".join(map(str, lengths)) + "\n\n")
    recs = _json_records(dry, capsys, "--seqlens-file", str(f), "--tokens-per-batch", "260", *TINY,
                         "--baselines", "none")
    got = [r["seqlens"] for r in recs]
    assert got == [[120, 100, 40], [200, 3], [250, 9]]  # whole documents, in order, nothing dropped
    assert sum(got, []) == lengths and all(sum(b) <= 260 for b in got)


def test_seqlens_file_errors_name_the_problem(dry, capsys, tmp_path):
    f = tmp_path / "lengths.txt"
    f.write_text("100\n5000\n20\n")
    with pytest.raises(SystemExit) as exc:
        dry.main(["--seqlens-file", str(f), "--tokens-per-batch", "4096", *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "document 1 has 5000 tokens, more than the batch budget of 4096 tokens" in err
    f.write_text("100\nten\n")
    with pytest.raises(SystemExit):
        dry.main(["--seqlens-file", str(f), *TINY])
    assert "lengths.txt:2: expected one document length" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seqlens", "3,4", "--dataset", "ldc"], "exactly one of"),
    ([], "exactly one of"),
    (["--seqlens", "3,x"], "comma-separated ints"),
    (["--seqlens", "3", "--sweep", "--json"], "drop --json"),
    (["--seqlens", "3", "--baselines", "ring,megatron"], "unknown baseline"),
    (["--seqlens", "3", "--mask-arg", "window"], "KEY=VALUE"),
    (["--seqlens", "3", "--mask", "lambda", "--mask-arg", "windw=3"], "unknown argument"),
    (["--seqlens", "3", "--block-size", "big"], "--block-size"),
    (["--seqlens", "3", "--nodes", "0"], "--nodes"),
    (["--seqlens", "3", "--dcp-option", "bogus=1"], "unknown option(s) ['bogus']"),
    (["--seqlens", "3", "--dcp-option", "communication=smoke"], "communication must be one of"),
    (["--seqlens", "3", "--dcp-option", "memory_limit"], "--dcp-option values take KEY=VALUE"),
])
def test_bad_arguments(dry, capsys, argv, message):
    with pytest.raises(SystemExit):
        dry.parse_args(argv)
    assert message in capsys.readouterr().err


def test_dcp_options_reach_the_plan_and_every_device_peak_is_reported(dry, capsys):
    """--dcp-option sets any DCP option (here direct communication and fp32 partials, then a memory limit
    below what fits: one line, exit 2); baselines report each device's peak as DCP does."""
    argv = ["--seqlens", "300,17,129,64,1,250", *TINY, "--baselines", "zigzag"]
    default = _json_records(dry, capsys, *argv)[0]
    direct = _json_records(dry, capsys, *argv, "--dcp-option", "communication=direct",
                           "--dcp-option", "partial-dtype=fp32")[0]
    assert default["dcp_options"]["communication"] == "hierarchical"
    assert default["dcp_options"]["partial_dtype"] == "model" and default["dcp_options"]["block_size"] == 64
    assert direct["dcp_options"]["communication"] == "direct" and direct["dcp_options"]["partial_dtype"] == "fp32"
    zig = default["baselines"]["zigzag"]
    assert len(zig["memory_bytes"]) == 4 and max(zig["memory_bytes"]) == zig["max_device_memory_bytes"]
    assert dry.main([*argv, "--dcp-option", "memory_limit=0.001", "--no-progress"]) == 2
    assert "dry_run.py: error: dcp: memory_limit=0.001 MB cannot be met" in capsys.readouterr().err


def test_mask_sparsity(dry):
    b = PackedBatch.from_seqlens([100, 7])
    assert dry.mask_sparsity(b, "causal", {}) == pytest.approx(1.0)
    assert dry.mask_sparsity(b, "full", {}) > 1.5
    assert 0 < dry.mask_sparsity(b, "lambda", {"sink": 4, "window": 8}) < 0.3


def test_micro_sweep_csv_and_figures(dry, tmp_path, capsys):
    out = tmp_path / "sweep" / "ldc.csv"
    sweep = ["--dataset", "ldc", "--num-batches", "2", "--tokens-per-batch", "1024", *TINY, "--sweep", "--grid",
             "small"]
    assert dry.main([*sweep, "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    assert "distinct" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    g = dry.GRIDS["small"]
    n_configs = (4 * len(g["block_size"]) + len(g["lambda_window"]) + len(g["num_answers"]) + len(g["k_local"])
                 + len(g["compute_imbalance"]) * len(g["inter_node_factor"]))
    assert len(rows) == 2 * n_configs
    assert all(r["status"] == "ok" for r in rows)
    assert {r["grid"] for r in rows} == {"block_size", "lambda_window", "shared_question", "causal_blockwise",
                                         "imbalance"}
    for r in rows:
        assert float(r["planning_seconds"]) > 0 and float(r["planning_cpu_seconds"]) > 0
        assert int(r["fwd_inter_node_bytes"]) >= 0
        assert int(r["zigzag_fwd_inter_node_bytes"]) > 0
        assert (r["te_fwd_inter_node_bytes"] != "") == (r["mask"] == "causal")
        assert 0 < float(r["mask_sparsity"]) <= 1.0 + 1e-9
    # a configuration in two grids is planned once: identical figures
    base = [r for r in rows if r["grid"] == "block_size" and r["mask"] == "causal" and r["block_size"] == "64"]
    same = [r for r in rows if r["grid"] == "imbalance" and r["compute_imbalance_limit"] == "0.1"
            and r["inter_node_factor"] == str(float(DCPOptions().inter_node_imbalance_factor))]
    assert [r["planning_seconds"] for r in base] == [r["planning_seconds"] for r in same]
    meta = json.loads((tmp_path / "sweep" / "ldc.csv.meta.json").read_text())
    assert meta["batches"] == 2 and meta["unique_configurations"] < meta["configurations"] == n_configs

    # two worker processes give the same plans (timings aside)
    par = tmp_path / "sweep" / "ldc_par.csv"
    proc = subprocess.run([sys.executable, str(TOOL), *sweep, "--out", str(par), "--jobs", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr

    def untimed(r):
        return {k: v for k, v in r.items() if not k.endswith("seconds")}

    assert [untimed(r) for r in csv.DictReader(par.open())] == [untimed(r) for r in rows]

    plot = _load("plot_dry_run_under_test", PLOT)
    fig_dir = tmp_path / "figs"
    assert plot.main([str(out), "--out-dir", str(fig_dir)]) == 0
    for name in plot.FIGURES:
        png, pdf = fig_dir / f"{name}.png", fig_dir / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert pdf.read_bytes()[:5] == b"%PDF-", name
