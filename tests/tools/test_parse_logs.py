"""tools/parse_logs.py: Megatron text lines and JSONL sidecars -> figures and a summary table."""
import json

import numpy as np


from megatron.training.training_log import format_line
from tools import parse_logs


def _write_run(path, backend, mask, times_ms, dataset="mock-ldc", validations=()):
    """A train_log.jsonl as the trainer writes it: one record per iteration, then (at the end) validation
    records of the same iteration number with a "split"."""
    path.mkdir(parents=True)
    with open(path / "train_log.jsonl", "w") as f:
        for i, t in enumerate(times_ms, 1):
            f.write(json.dumps({"iteration": i, "elapsed_ms": t, "lm_loss": 5.0 - 0.1 * i, "tokens_per_second": 100.0,
                                "tflops_per_gpu": 0.01, "plan_wait_ms": 1.0, "backend": backend, "mask": mask,
                                "dataset": dataset, "world_size": 4}) + "\n")
        for loss in validations:
            f.write(json.dumps({"iteration": len(times_ms), "split": "validation", "lm_loss": loss, "tokens": 9,
                                "seconds": 0.1}) + "\n")
    return str(path)


def test_parse_line_reads_named_fields_in_any_order():
    old = ("[2024-05-01 10:00:00] iteration      100/    1000 | consumed samples:        12800 | "
           "elapsed time per iteration (ms): 2345.6 | throughput per GPU (TFLOP/s/GPU): 312.4 | "
           "learning rate: 1.500000E-04 | global batch size:   128 | lm loss: 6.123456E+00 | loss scale: 1.0 | "
           "grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |")
    r = parse_logs.parse_line(old)
    assert r["iteration"] == 100 and r["train_iters"] == 1000 and r["elapsed_ms"] == 2345.6
    assert r["tflops_per_gpu"] == 312.4 and r["lm_loss"] == 6.123456 and r["grad_norm"] == 1.234
    assert "tokens_per_second" not in r
    ours = format_line(7, 9, {"consumed_samples": 7, "elapsed_ms": 12.5, "tflops_per_gpu": 0.0123,
                              "tokens_per_second": 99.0, "learning_rate": 1e-3, "global_batch_size": 1,
                              "lm_loss": 4.5, "grad_norm": 2.0, "skipped": 0, "nan": 0})
    r = parse_logs.parse_line(ours)
    assert (r["iteration"], r["elapsed_ms"], r["tokens_per_second"], r["tflops_per_gpu"]) == (7, 12.5, 99.0, 0.0123)
    assert parse_logs.parse_line("> training 5 iterations") is None


def test_figures_and_summary(tmp_path, capsys):
    runs = [_write_run(tmp_path / "r1", "ring", "causal", [900, 500, 400, 400]),
            # Longer run: only the iterations every causal run has are compared (5000 ms ones are not).
            _write_run(tmp_path / "r2", "dcp", "causal", [900, 300, 200, 200, 5000, 5000], validations=(4.75, 4.5)),
            _write_run(tmp_path / "r3", "zigzag", "lambda", [900, 300, 300, 300])]
    # A text log with args.json beside it.
    text = tmp_path / "r4"
    text.mkdir()
    (text / "args.json").write_text(json.dumps({"cp_backend": "loongtrain", "attention_mask": "causal",
                                                "dataset_name": "mock-ldc", "world_size": 4}))
    (text / "stdout.log").write_text("noise\n" + "\n".join(
        format_line(i, 4, {"consumed_samples": i, "elapsed_ms": 250.0, "tflops_per_gpu": 0.02,
                           "tokens_per_second": 50.0, "learning_rate": 1e-3, "global_batch_size": 1,
                           "lm_loss": 5.0, "grad_norm": 1.0, "skipped": 0, "nan": 0}) for i in range(1, 5)) + "\n")
    out = tmp_path / "figs"
    assert parse_logs.main([*runs, str(text), "--out", str(out), "--warmup", "2"]) == 0
    for name in ("iteration_time", "loss_curves"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    table = (out / "summary.md").read_text()
    rows = {line.split("|")[3].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"ring", "dcp", "zigzag", "loongtrain"}
    assert "| 400.0 +- 0.0 | 1.00x |" in rows["ring"]
    assert "| 200.0 +- 0.0 | 2.00x |" in rows["dcp"]  # warm-up iterations 1-2 dropped
    assert "| dcp | 4 | 6 |" in rows["dcp"]
    # validation records (the same iteration number, a "split") neither replace iteration 6 nor hide the
    # run's backend: the last training loss is iteration 6's, the validation loss its own column
    assert "| 4.9000 | 4.4000 | 4.5000 |" in rows["dcp"] and "| 4.6000 |  |" in rows["ring"]
    assert "| 250.0 +- 0.0 | 1.60x |" in rows["loongtrain"]
    assert "| lambda | zigzag |" in rows["zigzag"] and "x |" not in rows["zigzag"].split("|")[7]


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert parse_logs.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err


def test_figures_tell_the_truth(tmp_path, capsys):
    # identical loss curves (every backend is exact) and runs shorter than the warm-up
    runs = [parse_logs.load_run(_write_run(tmp_path / b, b, "causal", [1234.5, 987.65])) for b in ("ring", "dcp")]
    assert parse_logs.warmup_note(runs, 1) is None
    note = parse_logs.warmup_note(runs, 2)
    assert "--warmup 2 would drop every iteration" in note and "(2 iterations)" in note
    fig = parse_logs.iteration_time_figure(runs, warmup=2)
    assert "all their iterations averaged" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "iteration time (ms)"
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["1110", "1110"]  # (1234.5 + 987.65) / 2 ms, three significant digits
    assert parse_logs._three_digits(0.012345) == "0.0123" and parse_logs._three_digits(12.345) == "12.3"
    fig = parse_logs.loss_curves_figure(runs)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and np.array_equal(lines[0].get_ydata(), lines[1].get_ydata())
    assert (lines[0].get_linestyle(), lines[0].get_marker()) != (lines[1].get_linestyle(), lines[1].get_marker())
    out = tmp_path / "figs"
    assert parse_logs.main([str(tmp_path / "ring"), "--out", str(out), "--warmup", "5"]) == 0
    assert "warning: --warmup 5 would drop every iteration" in capsys.readouterr().err


def test_a_broken_jsonl_line_is_named(tmp_path, capsys):
    run = _write_run(tmp_path / "r", "ring", "causal", [10.0, 11.0, 12.0])
    with open(tmp_path / "r" / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 4, "elapsed_ms": 1')  # a run killed mid-write
    assert parse_logs.main([run, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train_log.jsonl:4: not a JSON record" in err and "partial last line" in err
