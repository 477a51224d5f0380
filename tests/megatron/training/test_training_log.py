"""The Megatron log line, its interval averages and the JSONL sidecar."""
import json
import re

import pytest

from megatron.training.training_log import TrainingLogger, format_line


def _m(i, ms, loss, skipped=False):
    return {"consumed_samples": 4 * i, "elapsed_ms": ms, "flops": 2e12, "tflops_per_gpu": 0.0, "tokens": 1000,
            "tokens_per_second": 0.0, "learning_rate": 1e-3 / i, "global_batch_size": 4, "lm_loss": loss,
            "loss_scale": 1.0, "grad_norm": 0.5 * i, "skipped": skipped, "nan": skipped, "world_size": 2}


def test_interval_line_has_megatron_fields_and_averages(tmp_path):
    lines = []
    log = TrainingLogger(train_iters=4, log_interval=2, enabled=True, log_dir=str(tmp_path), printer=lines.append)
    assert log.record(1, _m(1, 1000.0, 4.0)) is None
    line = log.record(2, _m(2, 3000.0, 2.0))
    assert lines == [line]
    assert re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration        2/       4 \| ", line)
    fields = dict(seg.strip().rsplit(": ", 1) for seg in line.split("|")[1:-1])
    assert fields["consumed samples"].strip() == "8"
    assert float(fields["elapsed time per iteration (ms)"]) == 2000.0
    assert float(fields["throughput per GPU (TFLOP/s/GPU)"]) == pytest.approx(4e12 / (4.0 * 1e12 * 2))
    assert float(fields["tokens per second"]) == 500.0
    assert float(fields["lm loss"]) == 3.0 and float(fields["grad norm"]) == 1.0
    assert fields["learning rate"] == "5.000000E-04" and fields["global batch size"].strip() == "4"
    assert fields["loss scale"] == "1.0"
    assert int(fields["number of skipped iterations"]) == 0 and int(fields["number of nan iterations"]) == 0
    # Skipped iterations are counted and left out of the loss average.
    log.record(3, _m(3, 1000.0, float("nan"), skipped=True))
    line = log.record(4, _m(4, 1000.0, 5.0))
    assert "lm loss: 5.000000E+00" in line and "number of skipped iterations:   1" in line
    log.close()
    records = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and records[1]["elapsed_ms"] == 3000.0


def test_disabled_logger_prints_nothing(tmp_path):
    lines = []
    log = TrainingLogger(4, 1, enabled=False, log_dir=str(tmp_path), printer=lines.append)
    assert log.record(1, _m(1, 1.0, 1.0)) is None and lines == []
    assert not (tmp_path / "train_log.jsonl").exists()


def test_format_line_of_a_gpu_run():
    line = format_line(100, 1000, {**_m(1, 2345.6, 6.123456), "tflops_per_gpu": 312.44, "tokens_per_second": 1.5e5})
    assert "throughput per GPU (TFLOP/s/GPU): 312.4 |" in line and "tokens per second: 150000.0 |" in line
    assert "elapsed time per iteration (ms): 2345.6 |" in line and "lm loss: 6.123456E+00 |" in line
