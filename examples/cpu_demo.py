#!/usr/bin/env python
"""CPU demo (``make demo``): train a small GPT on 4 CPU ranks with ``--cp-backend dcp``, then draw the figures.

Steps, all local (no download):

1. corpus: the Python standard library of this interpreter (no tests): every top-level function and class
   is one document (about 4,200 documents on CPython 3.11; median about 170 tokens, a heavy tail up to
   tens of thousands, so a 4,096-token batch packs 1 to 17 documents, LDC-like); ``--corpus files`` makes
   each source file a document instead (median about 3,400 tokens: mostly one document per batch);
2. a 2,048-piece SentencePiece vocabulary trained on it (tools/train_tokenizer.py) and the indexed
   dataset (tools/preprocess_data.py);
3. ``torchrun --nproc_per_node 4 pretrain_gpt.py --cp-backend dcp`` for ``--iters`` iterations: 4 layers,
   hidden 256, 8 heads, 2 KV groups, SwiGLU, RoPE, 4,096-token packed batches of whole documents (longer ones
   split), 2 simulated nodes x 2 ranks; progress and the Megatron log lines are printed;
4. short runs of the baselines (ring, zigzag, loongtrain) on the same data; they plan inline
   (``--num-workers 0``: their plans take milliseconds, and four more worker processes importing
   megatron-core would cost the 2-core machine more start-up time than they save), dcp in one planning
   worker per rank;
5. ``tools/parse_logs.py`` over all runs: iteration-time bars, loss curves, summary table.

If the dcp backend is missing from the checkout or its run fails, the main run uses ``--fallback-backend``
(and says so, with the path of the failed run's log).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_FLAGS = {
    "dcp": ["--cp-devices-per-node", "2"],
    "loongtrain": ["--loongtrain-head-parallel", "2", "--cp-devices-per-node", "2"],
    "ring": ["--cp-devices-per-node", "2"],
    "zigzag": ["--cp-devices-per-node", "2"],
}


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class CommandFailed(RuntimeError):
    pass


def run(cmd: list[str], log_path: str | None = None) -> None:
    """Run a command, streaming its output (minus Python warning noise) and keeping a full log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    skip_next = False
    for line in proc.stdout:
        if log:
            log.write(line)
        if skip_next:
            skip_next = False
            continue
        if "Warning:" in line or "warnings.warn(" in line:
            skip_next = "warnings.warn(" not in line  # the source line that follows a warning
            continue
        print(line, end="", flush=True)
    rc = proc.wait()
    if log:
        log.close()
    if rc != 0:
        raise CommandFailed(f"command failed with exit code {rc}: {' '.join(cmd)}"
                            + (f" (full log: {log_path})" if log_path else ""))


SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__",
             "tkinter", "pydoc_data", "encodings"}


def stdlib_files() -> list[str]:
    """This interpreter's standard-library sources (no tests, no third-party packages), sorted."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and "test" not in d and not d.startswith("config-"))
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    return files


def definitions(path: str) -> list[str]:
    """The source of every top-level function and class of a module (decorators included)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        src = f.read()
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    lines = src.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            out.append("".join(lines[start:node.end_lineno]))
    return out


def build_corpus(data_dir: str, vocab: int, corpus: str) -> tuple[str, str]:
    os.makedirs(data_dir, exist_ok=True)
    jsonl = os.path.join(data_dir, "stdlib.jsonl")
    files = stdlib_files()
    n = 0
    with open(jsonl, "w") as out:
        for path in files:
            if corpus == "definitions":
                texts = definitions(path)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts = [f.read()]
            for text in texts:
                out.write(json.dumps({"text": text}) + "\n")
                n += 1
    say(f"corpus: {n} documents ({'one per top-level function or class' if corpus == 'definitions' else 'one per file'}) "
        f"from {len(files)} files of {sysconfig.get_paths()['stdlib']} -> {jsonl}")
    model_prefix = os.path.join(data_dir, "spm")
    run([sys.executable, "tools/train_tokenizer.py", "--input", jsonl, "--model-prefix", model_prefix,
         "--vocab-size", str(vocab), "--max-sentences", "100000"])
    prefix = os.path.join(data_dir, "stdlib")
    run([sys.executable, "tools/preprocess_data.py", "--input", jsonl, "--tokenizer-model", model_prefix + ".model",
         "--output-prefix", prefix, "--append-eod"])
    return prefix, model_prefix + ".model"


def train(backend: str, iters: int, a, data: str, tokenizer: str, run_dir: str) -> str:
    out = os.path.join(run_dir, backend)
    os.makedirs(out, exist_ok=True)
    for stale in ("train_log.jsonl",):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           "pretrain_gpt.py", "--cp-backend", backend, *BACKEND_FLAGS.get(backend, []),
           "--context-parallel-size", str(a.nproc), "--position-embedding-type", "rope",
           "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--num-query-groups", "2",
           "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
           "--seq-length", str(a.seq_length), "--max-position-embeddings", str(a.seq_length),
           "--train-iters", str(iters), "--lr-decay-iters", str(a.iters), "--lr", "1e-3", "--min-lr", "1e-4",
           "--lr-warmup-iters", "4", "--lr-decay-style", "cosine", "--seed", "1234",
           "--data-path", data, "--tokenizer-model", tokenizer, "--split-long-documents",
           "--attention-mask", a.mask, "--num-workers", "1" if backend == "dcp" else "0", "--plan-prefetch", "2",
           "--log-interval", str(a.log_interval), "--log-dir", out,
           "--split", "98,2,0", "--eval-interval", str(iters), "--eval-iters", "1"]
    say(f"training {backend}: {iters} iterations on {a.nproc} CPU ranks")
    t0 = time.perf_counter()
    run(cmd, os.path.join(out, "stdout.log"))
    say(f"{backend} done in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--backend", default="dcp")
    p.add_argument("--fallback-backend", default="zigzag", help="used when the dcp backend is not available")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--baselines", default="ring,zigzag,loongtrain", help="comma list; empty to skip")
    p.add_argument("--baseline-iters", type=int, default=10)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--mask", default="causal")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--corpus", choices=["definitions", "files"], default="definitions",
                   help="one document per top-level function/class (default) or per source file")
    p.add_argument("--log-interval", type=int, default=5)
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    run_dir = os.path.abspath(a.run_dir)
    prefix, tokenizer = build_corpus(os.path.join(run_dir, "data"), a.vocab_size, a.corpus)

    backend = a.backend
    if backend == "dcp" and importlib.util.find_spec("dcp_backend.dcp") is None:
        say(f"NOTE: the dcp backend (dcp_backend/dcp) is not in this checkout yet; the main run uses "
            f"--cp-backend {a.fallback_backend} instead")
        backend = a.fallback_backend
    try:
        runs = [train(backend, a.iters, a, prefix, tokenizer, run_dir)]
    except CommandFailed as exc:
        if backend == a.fallback_backend:
            raise
        say(f"NOTE: the {backend} run failed ({exc}); the main run uses --cp-backend {a.fallback_backend} instead")
        backend = a.fallback_backend
        runs = [train(backend, a.iters, a, prefix, tokenizer, run_dir)]
    for b in [x for x in a.baselines.split(",") if x and x != backend]:
        runs.append(train(b, a.baseline_iters, a, prefix, tokenizer, run_dir))

    figures = os.path.join(run_dir, "figures")
    say("figures: tools/parse_logs.py")
    run([sys.executable, "tools/parse_logs.py", *runs, "--out", figures, "--warmup", "2"])
    say(f"demo finished in {time.perf_counter() - t_start:.0f} s; figures and summary.md in {figures}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CommandFailed as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        sys.exit(1)
