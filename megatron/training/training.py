"""Setup and the training loop of ``pretrain_gpt.py``.

One iteration (see docs/ARCHITECTURE.md): fetch this rank's ``num_micro_batches`` planned micro-batches
from the data loader (planned ahead in worker processes; the time spent blocked here is the *plan wait*),
all-reduce the number of loss tokens of the whole global batch, run forward and backward of each
micro-batch with the plan and position ids installed in the CP context (loss = sum of token losses /
global token count, so the result is the mean over every token of the batch, not a mean of per-rank
means), all-reduce the gradients (SUM) over all ranks (CP and DP), clip on the global norm, step the
optimizer and the LR schedule, and log.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

import dcp_backend as cp
from dcp_backend.registry import backend_class
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.training import checkpointing, cpu_compat, initialize
from megatron.training.arguments import ConfigError, pad_vocab_size, parse_args, validate_args
from megatron.training.data import (DocumentTooLongError, IndexedDocuments, MockDocuments, PlannedBatches,
                                    PlannerConfig, build_loader, build_schedule, micro_batch_indices)
from megatron.training.flops import ModelShape
from megatron.training.model import attention_spec, build_model, use_transformer_engine
from megatron.training.training_log import TrainingLogger


@dataclass
class TrainHooks:
    """Callbacks for embedding the loop (tests, notebooks): ``on_iteration(iteration, metrics)`` runs on
    every rank after each optimizer step."""

    on_iteration: Callable[[int, dict], None] | None = None


def _collective(fn, what: str, timeout_minutes: float):
    try:
        return fn()
    except RuntimeError as exc:
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise cp.CommunicationError(
            f"rank {rank}: {what} failed: a peer rank died, hung or diverged (--distributed-timeout-minutes "
            f"{timeout_minutes:g} bounds every wait). Original error: {type(exc).__name__}: {exc}") from exc


class GradBuffer:
    """All gradients as views of one flat fp32 buffer, so the CP/DP all-reduce is one call."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.params = params
        self.data = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        self.views = []
        offset = 0
        for p in params:
            view = self.data[offset:offset + p.numel()].view_as(p)
            self.views.append(view)
            p.grad = view
            offset += p.numel()

    def zero(self) -> None:
        self.data.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

    def gather(self) -> None:
        """Make sure every gradient lives in the buffer (autograd may have replaced a .grad)."""
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]


def _json_value(x):
    """args.json: dataclasses (the CP topology) as objects, anything else as its string."""
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else str(x)


def _peak_memory_mb(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    return rss, rss


class Trainer:
    def __init__(self, args, hooks: TrainHooks | None = None, printer=print):
        self.args = args
        self.hooks = hooks or TrainHooks()
        self.env = None
        self._print = printer
        self.loader = None

    # ------------------------------------------------------------------------------------ printing
    def print_rank0(self, msg: str) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            self._print(msg, flush=True)

    def print_last(self, msg: str) -> None:
        if self.env is None or self.env.is_last_rank:
            self._print(msg, flush=True)

    # --------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Everything before the first iteration; every input problem is a ConfigError raised here."""
        args = self.args
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        validate_args(args, world)
        self._check_backend()
        self._load_data()
        self._init_distributed()
        self._build_model_and_optimizer()
        self._resume_or_seed()
        self._build_loader()
        self._open_logs()

    def _check_backend(self) -> None:
        """The backend can run here and plan this model's attention on the CP topology."""
        args = self.args
        try:
            backend_class(args.cp_backend).check_available()
            self.spec = attention_spec(args)
            cp.get_planner(args.cp_backend, **args.backend_options).check_spec(self.spec, args.cp_topology)
        except ImportError as exc:
            raise ConfigError(f"--cp-backend {args.cp_backend} is not available in this installation "
                              f"({type(exc).__name__}: {exc})") from exc
        except (cp.CPError, cp.BackendUnavailableError) as exc:
            raise ConfigError(f"--cp-backend {args.cp_backend}: {exc}") from exc

    def _load_data(self) -> None:
        """Vocabulary, documents and the micro-batch schedule."""
        args = self.args
        if args.tokenizer_model is not None:
            from megatron.training.tokenizer import SentencePieceTokenizer

            vocab = SentencePieceTokenizer(args.tokenizer_model).vocab_size
        else:
            vocab = args.vocab_size
        args.padded_vocab_size = pad_vocab_size(vocab, args.make_vocab_size_divisible_by)
        if args.data_path is not None:
            self.source = IndexedDocuments(args.data_path)
        else:
            self.source = MockDocuments(args.mock_data, args.mock_num_documents, args.seed, args.seq_length,
                                        vocab, args.mock_length_scale)
        try:
            self.schedule = build_schedule(self.source.lengths, args.seq_length, args.seed, args.split_long_documents,
                                           args.train_iters * args.global_batch_size)
        except DocumentTooLongError as exc:
            raise ConfigError(str(exc)) from exc
        except ValueError as exc:
            raise ConfigError(f"--data-path {args.data_path}: {exc}") from exc

    def _init_distributed(self) -> None:
        """Process groups and the attention backend over this rank's CP group."""
        args = self.args
        owns = initialize.init_process_group(args.distributed_backend, args.distributed_timeout_minutes)
        self.env = env = initialize.build_groups(args.context_parallel_size, args.distributed_timeout_minutes, owns)
        try:
            self.backend = cp.get_backend(args.cp_backend, group=env.cp_group, topology=args.cp_topology,
                                          **args.backend_options)
        except cp.CPError as exc:
            raise ConfigError(f"--cp-backend {args.cp_backend}: {exc}") from exc
        s = self.schedule
        self.print_rank0(
            f"> data: {len(self.source.lengths)} documents -> {s.piece_doc.size} pieces "
            f"({s.split_docs} long documents split, {s.skipped_short_docs} shorter than 2 tokens ignored); "
            f"{len(s.batches)} micro-batches of <= {args.seq_length} tokens scheduled")

    def _build_model_and_optimizer(self) -> None:
        """Model, optimizer, schedule (identical initial weights on every rank: same seed)."""
        args, env = self.args, self.env
        if args.deterministic_mode:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        cpu_compat.seed_model_parallel_rng(args.seed)
        self.model, self.context = build_model(args, self.backend, env.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._check_same_weights()
        self.grads = GradBuffer(self.params, env.device)
        adam = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
        if args.use_distributed_optimizer:
            # ZeRO-1: each rank keeps the AdamW state of 1/world of the parameters, steps them and
            # broadcasts them (the gradients are already all-reduced).
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(_param_groups(self.model, args.weight_decay),
                                                     optimizer_class=torch.optim.AdamW, **adam)
        else:
            self.optimizer = torch.optim.AdamW(_param_groups(self.model, args.weight_decay), **adam)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters, wd_incr_style="constant")
        self.shape = ModelShape.from_args(args)
        topo = args.cp_topology
        self.print_rank0(f"> model: {sum(p.numel() for p in self.params):,} parameters, "
                         f"{'Transformer Engine' if use_transformer_engine(args) else 'local'} layers, "
                         f"CP backend {args.cp_backend} {args.backend_options} over {env.cp_size} ranks "
                         f"({topo.nodes} node(s) x {topo.devices_per_node}) x DP {env.dp_size}")

    def _resume_or_seed(self) -> None:
        args, env = self.args, self.env
        self.iteration, self.consumed = 0, 0
        if args.load is not None:  # restores every rank's RNG too
            self.iteration, self.consumed = checkpointing.load_checkpoint(
                args.load, self.model, self.optimizer, self.scheduler, args, env.rank, log=self.print_rank0)
            self.print_rank0(f"> resumed from {args.load} at iteration {self.iteration}")
        else:
            torch.manual_seed(args.seed + 1 + env.rank)  # dropout masks differ per rank (different tokens)

    def _build_loader(self) -> None:
        """Planned micro-batches of this rank, planned ahead in the loader's workers."""
        args, env = self.args, self.env
        planner = PlannerConfig(args.cp_backend, dict(args.backend_options), self.spec, env.cp_rank, args.cp_topology,
                                env.device.type)
        dataset = PlannedBatches(self.source, self.schedule, planner, with_stats=args.log_plan_stats)
        indices = micro_batch_indices(self.iteration, args.train_iters, args.global_batch_size, env.dp_rank,
                                      args.num_micro_batches)
        self.loader = build_loader(dataset, indices, args.num_workers, args.plan_prefetch, args.dataloader_timeout)

    def _open_logs(self) -> None:
        args, env = self.args, self.env
        if env.is_last_rank and args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            with open(os.path.join(args.log_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1, sort_keys=True, default=_json_value)
        self.logger = TrainingLogger(args.train_iters, args.log_interval, enabled=env.is_last_rank,
                                     log_dir=args.log_dir,
                                     tensorboard_dir=args.tensorboard_dir or (os.path.join(args.log_dir, "tensorboard")
                                                                              if args.log_dir else None),
                                     printer=lambda line: self._print(line, flush=True))

    def _check_same_weights(self) -> None:
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        both = torch.cat([total, -total])
        _collective(lambda: dist.all_reduce(both, op=dist.ReduceOp.MAX), "initial weight check",
                    self.args.distributed_timeout_minutes)
        if not (both[0] == total[0] and -both[1] == total[0]):
            raise RuntimeError("initial weights differ between ranks although every rank used the same seed")

    # ---------------------------------------------------------------------------------------- step
    def train_step(self, micro_batches) -> dict:
        args, env = self.args, self.env
        timeout = args.distributed_timeout_minutes
        first_cp = env.cp_rank == 0
        dev = env.device  # collectives run on the device (NCCL needs CUDA tensors)
        counts = torch.tensor([
            sum(float(mb.loss_mask.sum()) for mb in micro_batches),
            sum(mb.num_tokens for mb in micro_batches) if first_cp else 0,
            sum(mb.attention_pairs for mb in micro_batches) if first_cp else 0,
            sum(len(mb.seqlens) for mb in micro_batches) if first_cp else 0,
        ], dtype=torch.float64, device=dev)
        _collective(lambda: dist.all_reduce(counts), "all-reduce of the batch token count", timeout)
        global_count = counts[0].item()
        self.model.train()
        self.grads.zero()
        loss_sum = torch.zeros(1, dtype=torch.float64, device=dev)
        for mb in micro_batches:
            self.context.set_batch(mb.plan, mb.position_ids.to(dev))
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                token_loss = self.model(mb.tokens.to(dev)[None], mb.position_ids.to(dev)[None], None,
                                        labels=mb.labels.to(dev)[None])
            local = (token_loss.float().reshape(-1) * mb.loss_mask.to(dev)).sum()
            (local / global_count).backward()
            loss_sum += local.detach().double()
        self.context.clear()
        self.grads.gather()
        _collective(lambda: dist.all_reduce(self.grads.data), "gradient all-reduce", timeout)
        # Loss sum and the bytes this rank's attention sent (all layers, forward and backward).
        intra, inter = self._comm_bytes()
        sums = torch.cat([loss_sum, torch.tensor([intra, inter], dtype=torch.float64, device=dev)])
        _collective(lambda: dist.all_reduce(sums), "loss all-reduce", timeout)
        loss = sums[0].item() / global_count
        grad_norm = torch.linalg.vector_norm(self.grads.data).item()
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if finite:
            if args.clip_grad > 0:
                coeff = args.clip_grad / (grad_norm + 1e-6)
                if coeff < 1.0:
                    self.grads.data.mul_(coeff)
            self.optimizer.step()
            self.scheduler.step(1)
        return {"lm_loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "skipped": not finite, "nan": not finite,
                "comm_bytes": int(sums[1].item() + sums[2].item()), "inter_node_bytes": int(sums[2].item()),
                "tokens": int(counts[1].item()), "attention_pairs": int(counts[2].item()),
                "documents": int(counts[3].item())}

    @staticmethod
    def _planned(micro_batches) -> dict:
        """Plan statistics of this rank's micro-batches (only with --log-plan-stats)."""
        stats = [mb.plan_stats for mb in micro_batches if mb.plan_stats]
        if not stats:
            return {}
        return {"comm_bytes_planned": sum(s["comm_bytes_planned"] for s in stats),
                "inter_node_bytes_planned": sum(s["inter_node_bytes_planned"] for s in stats),
                "compute_imbalance": max(s["compute_imbalance"] for s in stats)}

    def _comm_bytes(self) -> tuple[float, float]:
        """(intra-node, inter-node) bytes sent by this rank's backend since the last call.

        Read from the backend's ``counters`` (part of the CP contract; the te backend's transfers happen
        inside Transformer Engine and are not counted, so it reports 0). Nodes are those of the CP topology.
        """
        counters = self.backend.counters
        intra, inter = counters.split(self.env.cp_rank, self.args.cp_topology.devices_per_node)
        counters.reset()
        return float(intra), float(inter)

    # ---------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        args, env = self.args, self.env
        history = []
        batches = iter(self.loader)
        first = True
        while self.iteration < args.train_iters:
            t0 = time.perf_counter()
            micro_batches = []
            for _ in range(args.num_micro_batches):
                micro_batches.append(next(batches))
            plan_wait = time.perf_counter() - t0
            step = self.train_step(micro_batches)
            elapsed = time.perf_counter() - t0
            self.iteration += 1
            self.consumed += args.global_batch_size
            flops = self.shape.flops(step["tokens"], step["attention_pairs"])
            m = {
                "consumed_samples": self.consumed,
                "elapsed_ms": 1000.0 * elapsed,
                "flops": flops,
                "tflops_per_gpu": flops / (elapsed * 1e12 * env.world_size),
                "tokens_per_second": step["tokens"] / elapsed,
                "global_batch_size": args.global_batch_size,
                "loss_scale": 1.0,
                **step,
                "plan_wait_ms": 1000.0 * plan_wait,
                "plan_ms": 1000.0 * sum(mb.plan_seconds for mb in micro_batches),
                **self._planned(micro_batches),
                "backend": args.cp_backend,
                "mask": args.attention_mask,
                "dataset": args.dataset_name,
                "world_size": env.world_size,
                "cp_size": env.cp_size,
            }
            history.append(m)
            if self.hooks.on_iteration is not None:
                self.hooks.on_iteration(self.iteration, m)
            self.logger.record(self.iteration, m, force_print=first)
            if first:
                self._report_memory()
                first = False
            if args.save and args.save_interval and self.iteration % args.save_interval == 0 \
                    and self.iteration < args.train_iters:
                self.save()
        if args.save:
            self.save()
        return history

    def _report_memory(self) -> None:
        peak = torch.tensor(_peak_memory_mb(self.env.device), dtype=torch.float64, device=self.env.device)
        _collective(lambda: dist.all_reduce(peak, op=dist.ReduceOp.MAX), "memory report",
                    self.args.distributed_timeout_minutes)
        if self.env.device.type == "cuda":
            line = f"max allocated: {peak[0]:.1f} | max reserved: {peak[1]:.1f}"
        else:
            line = f"peak RSS: {peak[0]:.1f}"
        self.print_last(f"[Rank {self.env.rank}] (after {self.iteration} iterations) memory (MB, max over ranks) | "
                        f"{line} |")
        self.logger.scalar("mem-peak-MB", float(peak[0]), self.iteration)

    def save(self) -> None:
        path = checkpointing.save_checkpoint(self.args.save, self.iteration, self.consumed, self.model,
                                             self.optimizer, self.scheduler, self.args, self.env.rank)
        self.print_rank0(f"> saved checkpoint {path}")

    def close(self) -> None:
        self.loader = None
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        initialize.teardown(self.env)


def pretrain(argv=None, *, args=None, hooks: TrainHooks | None = None, printer=print) -> list[dict]:
    """Parse (or take) the arguments, set up, train; returns the per-iteration metrics of this rank."""
    if args is None:
        args = parse_args(argv)
    trainer = Trainer(args, hooks, printer)
    try:
        trainer.setup()
        trainer.print_rank0(f"> training {args.train_iters - trainer.iteration} iterations")
        history = trainer.train()
        trainer.print_last("> after training is done")
        return history
    finally:
        trainer.close()
