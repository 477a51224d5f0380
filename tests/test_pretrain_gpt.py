"""pretrain_gpt.py end to end under torchrun: log lines, JSONL, TensorBoard, checkpoints, planning workers,
and exit codes."""
import json
import os
import subprocess
import sys

import pytest

from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, nproc=2, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "pretrain_gpt.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_indexed(str(tmp_path_factory.mktemp("d") / "docs"), documents(80, 2, 300, seed=8))


def test_training_run_writes_logs_and_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    p = _run(["--cp-backend", "zigzag", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "256", "--train-iters", "5", "--log-interval", "2", "--vocab-size", str(VOCAB),
              "--data-path", data, "--split-long-documents", "--num-workers", "1", "--plan-prefetch", "3",
              "--attention-mask", "sliding_window", "--mask-window", "32",
              "--log-plan-stats", "--log-dir", str(run), "--save", str(tmp_path / "ckpt"),
              "--context-parallel-size", "2", "--eval-interval", "4", "--eval-iters", "1", "--split", "80,10,10"])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if "elapsed time per iteration (ms)" in x]
    # Printed by the last rank only: after iteration 1, then every 2 iterations and at the end.
    assert [x.split("iteration")[1].split("/")[0].strip() for x in lines] == ["1", "2", "4", "5"]
    assert sum("memory (MB" in x for x in p.stdout.splitlines()) == 1
    assert sum("> memory estimate per rank (MB) | parameters:" in x for x in p.stdout.splitlines()) == 1
    assert [x.split("|")[0].strip() for x in p.stdout.splitlines() if "validation loss at" in x] == [
        "validation loss at iteration 4", "validation loss at the end of training for val data",
        "validation loss at the end of training for test data"]
    assert "tokens per second:" in lines[0] and "lm loss:" in lines[0]
    lines = [json.loads(x) for x in open(run / "train_log.jsonl")]
    records = [r for r in lines if "split" not in r]
    assert [r["split"] for r in lines if "split" in r] == ["validation", "validation", "test"]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["backend"] == "zigzag" and r["mask"] == "sliding_window" and r["plan_ms"] > 0 for r in records)
    assert records[0]["plan_wait_ms"] > 0 and records[-1]["consumed_samples"] == 5
    # Bytes the ranks' attention really sent: 2 layers x (forward + backward) over a 2-rank ring.
    assert all(r["comm_bytes"] > 0 and r["inter_node_bytes"] == 0 for r in records)
    assert all(r["comm_bytes_planned"] > 0 and r["compute_imbalance"] >= 1.0 for r in records)
    saved = json.load(open(run / "args.json"))
    assert saved["cp_backend"] == "zigzag"
    assert saved["backend_options"] == {}
    assert saved["cp_topology"] == {"world_size": 2, "devices_per_node": 2}  # from torchrun's LOCAL_WORLD_SIZE
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    saved = tmp_path / "ckpt" / "iter_0000005"  # megatron-core's torch_dist format
    assert {".metadata", "common.pt", "metadata.json", "rng"} <= set(os.listdir(saved))
    assert json.load(open(saved / "metadata.json"))["sharded_backend"] == "torch_dist"
    assert sorted(os.listdir(saved / "rng")) == ["rank_00000.pt", "rank_00001.pt"]


def test_config_error_exits_with_a_message(tmp_path, data):
    p = _run(["--cp-backend", "zigzag", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "256", "--train-iters", "5", "--vocab-size", str(VOCAB), "--data-path", data], nproc=1)
    assert p.returncode != 0  # the rank exits 2; torchrun reports 1
    assert "error (rank 0):" in p.stderr and "--split-long-documents" in p.stderr


def test_bad_mask_arguments_are_a_configuration_error(data):
    # a bad mask argument is bad input (exit 2 with the reason on every rank), not a rank failure (exit 1)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--cp-backend", "ring",
                        "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
                        "--train-iters", "1", "--vocab-size", str(VOCAB), "--data-path", data,
                        "--attention-mask", "sliding_window", "--mask-window", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error (rank 0): --cp-backend ring: mask argument window must be a positive int, got 0" in p.stderr
    assert "failed" not in p.stderr
