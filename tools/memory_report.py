#!/usr/bin/env python
"""Per-rank memory of a pretrain_gpt.py configuration, estimated without launching it.

Give the job's size and, after ``--``, the pretrain_gpt.py flags exactly as the launch would (data flags
may be replaced by ``--mock-data`` and the tokenizer by ``--vocab-size``); the report is
megatron/training/memory.py's: parameters, gradients, optimizer state, the activations of one packed
micro-batch and the CP backend's buffers from a real plan of that batch on the job's CP topology.

    python tools/memory_report.py --world-size 64 --ranks-per-node 8 --device-memory-gb 40 -- \\
        --cp-backend dcp --tensor-model-parallel-size 4 --context-parallel-size 16 --num-layers 32 \\
        --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 --ffn-hidden-size 14336 --swiglu \\
        --seq-length 131072 --train-iters 1 --mock-data --vocab-size 50257 --bf16 --use-distributed-optimizer

The batch: ``--seqlens`` (document lengths), ``--batch-dataset longalign|ldc`` (the first pack of that
synthetic length distribution), or by default one document of ``--seq-length`` tokens. 16-bit and
distributed-optimizer flags are accepted here although they need CUDA to run. ``--measure`` instead
launches the configuration on this machine's CPUs (torchrun, 3 iterations) and prints the estimate beside
each rank's measured peak memory growth (peak RSS minus the RSS before the model was built).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 2**30


def _estimate(a, flags: list[str]):
    from megatron.training import memory
    from megatron.training.arguments import pad_vocab_size, parse_args, validate_args
    from megatron.training.tokenizer import build_vocabulary

    os.environ["LOCAL_WORLD_SIZE"] = str(a.ranks_per_node)
    args = parse_args(flags)
    validate_args(args, a.world_size, cuda=not a.measure)  # the report describes a GPU job
    vocab = build_vocabulary(args)
    args.padded_vocab_size = pad_vocab_size(vocab.size, args.make_vocab_size_divisible_by,
                                            args.tensor_model_parallel_size)
    if a.seqlens:
        seqlens = [int(x) for x in a.seqlens.split(",")]
    elif a.batch_dataset:
        from dcp_backend.workloads import dataset_batches

        seqlens = dataset_batches(a.batch_dataset, 1, args.seq_length, seed=args.seed)[0]
    else:
        seqlens = [args.seq_length]
    return args, seqlens, memory.estimate(args, np.asarray(seqlens))


def report(a, flags: list[str]) -> dict:
    args, seqlens, est = _estimate(a, flags)
    lines = [
        f"configuration: world {a.world_size} ({a.ranks_per_node} per node) = TP {args.tensor_model_parallel_size} x "
        f"CP {args.context_parallel_size} x DP {args.data_parallel_size}; CP topology "
        f"{args.cp_topology.nodes} node(s) x {args.cp_topology.devices_per_node}; backend {args.cp_backend}; "
        f"{str(args.params_dtype).replace('torch.', '')}; "
        f"{'distributed optimizer' if args.use_distributed_optimizer else 'optimizer state on every rank'}",
        f"batch: {len(seqlens)} document(s), {sum(seqlens)} tokens; the rank with the most holds {est.tokens}",
        "",
        f"{'term':<14}{'GB':>10}",
    ]
    for name, value in (("parameters", est.parameters), ("gradients", est.gradients), ("optimizer", est.optimizer),
                        ("activations", est.activations), ("CP buffers", est.cp_buffers), ("total", est.total)):
        lines.append(f"{name:<14}{value / GB:>10.2f}")
    out = {"estimate": est.as_dict(), "seqlens": [int(x) for x in seqlens]}
    if a.device_memory_gb:
        fits = est.total <= a.device_memory_gb * GB
        lines.append(f"\n{'fits' if fits else 'does NOT fit'} in {a.device_memory_gb:g} GB per device "
                     f"({est.total / GB:.2f} GB, {100 * est.total / (a.device_memory_gb * GB):.0f}%)")
        out["fits"] = fits
    out["text"] = "\n".join(lines)
    return out


def _equal_packs_dataset(prefix: str, seq_length: int, vocab_size: int, count: int = 16) -> str:
    """Documents of exactly ``seq_length`` + 1 tokens: every pack is one document of ``seq_length`` training
    tokens, so every iteration holds the batch the estimate is for."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.int32)
    for _ in range(count):
        builder.add_item(torch.from_numpy(rng.integers(0, vocab_size, seq_length + 1).astype(np.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))
    return prefix


def _without_data_flags(flags: list[str]) -> list[str]:
    out, skip = [], False
    for i, word in enumerate(flags):
        if skip and not word.startswith("--"):
            continue
        skip = word in ("--data-path", "--mock-data", "--split")
        if not skip and word not in ("--split-long-documents",):
            out.append(word)
    return out


def measure(a, flags: list[str]) -> dict:
    """Launch the configuration on CPU ranks for 3 iterations of equal packs and compare each rank's measured
    peak growth (after iteration 2: the optimizer state exists) with the estimate."""
    import tempfile

    from megatron.training.arguments import parse_args

    parsed = parse_args(flags + ["--mock-data", "--train-iters", "3"])
    if parsed.vocab_size is None:
        raise SystemExit("--measure writes its own data: give --vocab-size (NullTokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _equal_packs_dataset(os.path.join(tmp, "equal"), parsed.seq_length, parsed.vocab_size)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": str(a.ranks_per_node),
               # glibc's adaptive mmap threshold would keep freed tensor memory in the heap and count it as
               # resident; a fixed threshold returns every large block to the system when it is freed.
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        run = _without_data_flags(flags) + ["--data-path", prefix, "--split", "1,0,0", "--train-iters", "3",
                                            "--num-workers", "0", "--eval-iters", "0", "--log-interval", "1"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.world_size),
               os.path.join(ROOT, "pretrain_gpt.py"), *run]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        raise SystemExit(f"the measured run failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    line = re.search(r"peak growth since the model was built, per rank: ([0-9., ]+) \|", p.stdout).group(1)
    growth = [float(x) for x in line.split(",")]
    est = re.search(r"> memory estimate per rank \(MB\) (.*)", p.stdout).group(1)
    estimate_mb = float(re.search(r"total: ([0-9.]+) \|", est).group(1))
    worst = max(growth)
    text = (f"estimate per rank (MB) {est}\nmeasured peak growth per rank (MB): "
            f"{', '.join(f'{g:.1f}' for g in growth)}\nestimate / measured (largest rank) = {estimate_mb / worst:.3f}")
    return {"estimate_mb": estimate_mb, "measured_growth_mb": growth, "ratio": estimate_mb / worst, "text": text}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: memory_report.py [options] -- <pretrain_gpt.py flags>")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: the world size (one node)")
    p.add_argument("--device-memory-gb", type=float, default=None, help="also say whether the total fits")
    p.add_argument("--seqlens", default=None, help="comma-separated document lengths of the batch")
    p.add_argument("--batch-dataset", choices=["longalign", "ldc", "uniform"], default=None)
    p.add_argument("--measure", action="store_true", help="run it on CPU ranks and compare (see the docstring)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv[:split])
    a.ranks_per_node = a.ranks_per_node or a.world_size
    flags = argv[split + 1:]
    out = measure(a, flags) if a.measure else report(a, flags)
    print(json.dumps({k: v for k, v in out.items() if k != "text"}) if a.json else out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
