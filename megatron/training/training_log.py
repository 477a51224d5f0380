"""Megatron's per-iteration log line, a JSONL sidecar and TensorBoard scalars (written by the last rank).

The line follows Megatron-LM's ``training_log``: ``key: value |`` segments after a timestamp, averaged
over the log interval, plus ``tokens per second`` (real tokens, no padding)::

    [2026-11-25 10:00:00.123456] iteration       20/      40 | consumed samples:           80 |
    elapsed time per iteration (ms): 2345.6 | throughput per GPU (TFLOP/s/GPU): 312.4 |
    tokens per second: 12345.6 | learning rate: 1.500000E-04 | global batch size:     4 |
    lm loss: 6.123456E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 |
    number of nan iterations:   0 |

(one line in the log). Throughput values below 1 TFLOP/s (CPU runs) get four decimals instead of one.
The JSONL sidecar (``<log-dir>/train_log.jsonl``) has one record per iteration with the same fields
(unaveraged) plus the backend, mask, planning time, plan wait and planned communication bytes.
"""
from __future__ import annotations

import datetime
import json
import math
import os


def _tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.4f}"


def format_line(iteration: int, train_iters: int, m: dict) -> str:
    ts = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    parts = [
        f"[{ts}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {m['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {m['elapsed_ms']:.1f}",
        f"throughput per GPU (TFLOP/s/GPU): {_tflops(m['tflops_per_gpu'])}",
        f"tokens per second: {m['tokens_per_second']:.1f}",
        f"learning rate: {m['learning_rate']:.6E}",
        f"global batch size: {m['global_batch_size']:5d}",
    ]
    if m.get("lm_loss") is not None:
        parts.append(f"lm loss: {m['lm_loss']:.6E}")
    parts.append(f"loss scale: {m.get('loss_scale', 1.0):.1f}")
    if m.get("grad_norm") is not None:
        parts.append(f"grad norm: {m['grad_norm']:.3f}")
    parts.append(f"number of skipped iterations: {m['skipped']:3d}")
    parts.append(f"number of nan iterations: {m['nan']:3d}")
    return " | ".join(parts) + " |"


def validation_lines(prefix: str, loss: float) -> list[str]:
    """Megatron-LM's validation block: `` validation loss at <prefix> | lm loss value: ... | lm loss PPL:
    ... |`` between two dashed lines (prefix: ``iteration N``, ``the end of training for val data``, ...)."""
    ppl = math.exp(min(20.0, loss))
    text = f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    rule = "-" * (len(text) + 1)
    return [rule, text, rule]


class TrainingLogger:
    """Collects per-iteration metrics; prints interval lines, writes JSONL and TensorBoard (if enabled)."""

    def __init__(self, train_iters: int, log_interval: int, enabled: bool, log_dir: str | None = None,
                 tensorboard_dir: str | None = None, printer=print):
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.enabled = enabled
        self.print = printer
        self._interval: list[dict] = []
        self._jsonl = None
        self._tb = None
        if enabled and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = open(os.path.join(log_dir, "train_log.jsonl"), "a", buffering=1)
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def record(self, iteration: int, m: dict, force_print: bool = False) -> str | None:
        """Add iteration ``iteration``'s metrics; returns the printed line, if one is due."""
        if not self.enabled:
            return None
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"iteration": iteration, **m}) + "\n")
        if self._tb is not None:
            for tag, key in (("lm loss", "lm_loss"), ("learning-rate", "learning_rate"), ("grad-norm", "grad_norm"),
                             ("iteration-time", "elapsed_ms"), ("throughput", "tflops_per_gpu"),
                             ("tokens-per-second", "tokens_per_second"), ("plan-wait-time", "plan_wait_ms")):
                if m.get(key) is not None:
                    self._tb.add_scalar(tag, m[key], iteration)
        self._interval.append(m)
        if not (force_print or iteration % self.log_interval == 0 or iteration == self.train_iters):
            return None
        line = format_line(iteration, self.train_iters, self.aggregate())
        self._interval = []
        self.print(line)
        return line

    def aggregate(self) -> dict:
        ms = self._interval
        n = len(ms)
        seconds = sum(m["elapsed_ms"] for m in ms) / 1000.0
        ok = [m for m in ms if not m["skipped"]]
        last = ms[-1]
        return {
            "consumed_samples": last["consumed_samples"],
            "elapsed_ms": 1000.0 * seconds / n,
            "tflops_per_gpu": sum(m["flops"] for m in ms) / (seconds * 1e12 * last["world_size"]),
            "tokens_per_second": sum(m["tokens"] for m in ms) / seconds,
            "learning_rate": last["learning_rate"],
            "global_batch_size": last["global_batch_size"],
            "lm_loss": sum(m["lm_loss"] for m in ok) / len(ok) if ok else None,
            "loss_scale": last.get("loss_scale", 1.0),
            "grad_norm": last["grad_norm"],
            "skipped": sum(int(m["skipped"]) for m in ms),
            "nan": sum(int(m["nan"]) for m in ms),
        }

    def validation(self, name: str, m: dict, iteration: int) -> None:
        """A validation or test result: a JSONL record and TensorBoard scalars (loss and perplexity)."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"iteration": iteration, "split": name, **m}) + "\n")
        if self._tb is not None:
            self._tb.add_scalar(f"lm loss {name}", m["lm_loss"], iteration)
            self._tb.add_scalar(f"lm loss {name} ppl", math.exp(min(20.0, m["lm_loss"])), iteration)

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
