"""Setup and the training loop of ``pretrain_gpt.py``.

One iteration (see docs/ARCHITECTURE.md): fetch this rank's ``num_micro_batches`` planned micro-batches
from the data loader (planned ahead in worker processes; the time spent blocked here is the *plan
wait*), run them through megatron-core's schedule (``get_forward_backward_func``) with each micro-batch's
plan and position ids installed in the CP context by the forward step (the plan travels with its
micro-batch), let ``finalize_model_grads`` reduce the gradients over the data x context parallel ranks
and divide them by the token count of the global batch (each micro-batch's loss is the sum of its token
losses, so the result is the mean over every token of the batch), clip on the global norm, step
megatron-core's optimizer and the LR schedule, log, validate every ``--eval-interval`` iterations and
save every ``--save-interval``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
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
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron.training import checkpointing, cpu_compat, initialize, memory
from megatron.training.arguments import ConfigError, pad_vocab_size, parse_args, validate_args
from megatron.training.data import (DocumentTooLongError, PlannedBatches, PlannerConfig, SplitPacks, build_loader,
                                    micro_batch_indices)
from megatron.training.datasets import build_datasets, describe
from megatron.training.flops import ModelShape
from megatron.training.grad_sync import wrap_model
from megatron.training.model import attention_spec, build_model, unwrap, use_transformer_engine
from megatron.training.optimizer import build_optimizer, optimizer_step
from megatron.training.tokenizer import build_vocabulary
from megatron.training.training_log import TrainingLogger, validation_lines


@dataclass
class TrainHooks:
    """Callbacks for embedding the loop (tests, notebooks): ``on_iteration(iteration, metrics)`` runs on
    every rank after each optimizer step; ``on_validation(name, metrics)`` after each evaluation."""

    on_iteration: Callable[[int, dict], None] | None = None
    on_validation: Callable[[str, dict], None] | None = None


def _collective(fn, what: str, timeout_minutes: float):
    try:
        return fn()
    except RuntimeError as exc:
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise cp.CommunicationError(
            f"rank {rank}: {what} failed: a peer rank died, hung or diverged (--distributed-timeout-minutes "
            f"{timeout_minutes:g} bounds every wait). Original error: {type(exc).__name__}: {exc}") from exc


def _json_value(x):
    """args.json: dataclasses (the CP topology) as objects, anything else as its string."""
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else str(x)


def _peak_memory_mb(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    return rss, rss


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron's three-value loss: (sum of token losses, token count, logged [sum, count])."""
    losses = output_tensor.float().reshape(-1)
    loss = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach().clone(), loss_mask.sum().detach()])}


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
        check_output_paths(args)
        for line in getattr(args, "ignored_flags", []):
            if int(os.environ.get("RANK", "0")) == 0:
                self._print(f"> ignoring {line}", flush=True)
        self._check_backend()
        self._load_data()
        self._init_distributed()
        self._build_model_and_optimizer()
        self._resume_or_seed()
        self._build_loaders()
        self._open_logs()
        self._report_memory_estimate()

    def _check_backend(self) -> None:
        """The backend can run here and plan this model's attention (local heads) on the CP topology."""
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
        """Vocabulary and the train / validation / test packs (megatron-core's dataset builder)."""
        args = self.args
        try:
            self.vocab = build_vocabulary(args)
        except (ImportError, OSError, ValueError) as exc:
            raise ConfigError(f"--tokenizer-type {args.tokenizer_type}: {exc}") from exc
        args.padded_vocab_size = pad_vocab_size(self.vocab.size, args.make_vocab_size_divisible_by,
                                                args.tensor_model_parallel_size)
        try:
            self.datasets = build_datasets(args, self.vocab.size)
        except DocumentTooLongError as exc:
            raise ConfigError(str(exc)) from exc
        except (ValueError, AssertionError) as exc:
            raise ConfigError(f"--data-path {' '.join(args.data_path or [])}: {exc}") from exc
        needed = args.train_iters * args.global_batch_size
        _have = len(self.datasets["train"]) if self.datasets["train"] is not None else 0
        if _have < needed:
            raise ConfigError(f"the training split has {_have} packs but {args.train_iters} iterations x "
                              f"--global-batch-size {args.global_batch_size} need {needed}; give --data-path "
                              "weights (a weighted blend repeats its datasets) or fewer iterations")

    def _init_distributed(self) -> None:
        """Process groups (megatron-core's layout) and the attention backend over this rank's CP group."""
        args = self.args
        owns = initialize.init_process_group(args.distributed_backend, args.distributed_timeout_minutes)
        self.env = env = initialize.build_groups(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                                 args.context_parallel_size, args.distributed_timeout_minutes, owns)
        try:
            self.backend = cp.get_backend(args.cp_backend, group=env.cp_group, topology=args.cp_topology,
                                          **args.backend_options)
        except cp.CPError as exc:
            raise ConfigError(f"--cp-backend {args.cp_backend}: {exc}") from exc
        self.forward_backward = get_forward_backward_func()
        self.print_rank0(initialize.layout_line(env, args.cp_topology))
        self.print_rank0(f"> data: {args.dataset_name}, split {args.split}: {describe(self.datasets)} "
                         f"(a pack is one micro-batch of whole documents, <= {args.seq_length} tokens)")

    def _build_model_and_optimizer(self) -> None:
        """Model (identical initial weights on every rank of a tensor-parallel position: same seed),
        megatron-core's DDP (or LocalGradSync on CPU), optimizer and schedule."""
        args, env = self.args, self.env
        if args.deterministic_mode:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        cpu_compat.seed_model_parallel_rng(args.seed)
        self._baseline_mb = memory.current_rss_bytes() / 2**20  # what the model, optimizer and batches add to
        model, self.context = build_model(args, self.backend, env.device)
        self.model = wrap_model(args, model, env)
        self.gpt = unwrap(self.model)
        self._check_same_weights()
        self.optimizer, self.scheduler = build_optimizer(args, [self.model])
        self.shape = ModelShape.from_args(args)
        n_local = sum(p.numel() for p in self.gpt.parameters())
        self.print_rank0(
            f"> model: {n_local:,} parameters on rank 0 ({memory.count_local_parameters(args):,} counted), "
            f"{'Transformer Engine' if use_transformer_engine(args) else 'local'} layers, "
            f"{str(args.params_dtype).replace('torch.', '')} parameters, "
            f"{'DistributedOptimizer' if args.use_distributed_optimizer else type(self.optimizer).__name__}, "
            f"CP backend {args.cp_backend} {args.backend_options} on {self.spec.num_heads} query heads / "
            f"{self.spec.num_kv_heads} KV groups per rank")

    def _resume_or_seed(self) -> None:
        args, env = self.args, self.env
        self.iteration, self.consumed = 0, 0
        loaded = None
        if args.load is not None:
            loaded = checkpointing.load_checkpoint(args.load, self.gpt, self.optimizer, self.scheduler, args, env,
                                                   log=self.print_rank0)
        if loaded is not None:
            self.iteration, self.consumed = loaded
            self.print_rank0(f"> resumed from {args.load} at iteration {self.iteration}")
        else:
            if args.load is not None:
                self.print_rank0(f"> --load {args.load}: no checkpoint there yet, starting from iteration 0")
            # Dropout masks differ between ranks that hold different tokens (data and context parallel)
            # and agree between tensor-parallel ranks (their hidden states are replicas).
            from megatron.core import parallel_state

            torch.manual_seed(args.seed + 1 + parallel_state.get_data_parallel_rank(with_context_parallel=True))

    def _planner_config(self) -> PlannerConfig:
        args, env = self.args, self.env
        return PlannerConfig(args.cp_backend, dict(args.backend_options), self.spec, env.cp_rank, args.cp_topology,
                             env.device.type, env.tp_size if args.sequence_parallel else 1)

    def _consumption_order(self) -> list[tuple[str, int]]:
        """Every (split, pack) this rank will consume, in order: each iteration's micro-batches, a validation
        after every ``--eval-interval`` iterations and at the end, then the test. One loader plans them
        all ahead in the same workers (validations and tests included)."""
        args, env = self.args, self.env
        M, gbs = args.num_micro_batches, args.global_batch_size
        self.has_valid = bool(args.eval_iters) and self.datasets["valid"] is not None
        self.has_test = bool(args.eval_iters) and self.datasets["test"] is not None

        def packs(split, first_iter, last_iter):
            return [(split, g) for g in micro_batch_indices(first_iter, last_iter, gbs, env.dp_rank, M)]

        order = []
        for it in range(self.iteration, args.train_iters):
            order += packs("train", it, it + 1)
            if self.has_valid and (it + 1) % args.eval_interval == 0:
                k = (it + 1) // args.eval_interval - 1  # validations count as in Megatron-LM
                order += packs("valid", k * args.eval_iters, (k + 1) * args.eval_iters)
        if self.has_valid:
            k = args.train_iters // args.eval_interval
            order += packs("valid", k * args.eval_iters, (k + 1) * args.eval_iters)
        if self.has_test:
            order += packs("test", 0, args.eval_iters)
        return order

    def _build_loaders(self) -> None:
        """Planned micro-batches of this rank (training, validation and test), planned ahead in the loader's
        workers in the order they are consumed."""
        args = self.args
        splits = {name: ds for name, ds in self.datasets.items() if ds is not None}
        dataset = PlannedBatches(SplitPacks(splits), self._planner_config(), with_stats=args.log_plan_stats)
        self.loader = build_loader(dataset, self._consumption_order(), args.num_workers, args.plan_prefetch,
                                   args.dataloader_timeout)

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

    def _report_memory_estimate(self) -> None:
        """Per-rank memory estimate of rank 0 for the first training pack (megatron/training/memory.py)."""
        args = self.args
        if self.env.rank != 0:
            return
        upcoming = micro_batch_indices(self.iteration, args.train_iters, args.global_batch_size, 0,
                                       args.num_micro_batches)
        first = self.datasets["train"][upcoming[0] if upcoming else 0]
        report = memory.estimate(args, np.asarray(first["seqlens"]), backend_options=args.backend_options,
                                 local_parameters=sum(p.numel() for p in self.gpt.parameters()))
        self._print(report.line(prefix="> memory estimate per rank"), flush=True)
        self.memory_estimate = report

    def _check_same_weights(self) -> None:
        """Ranks at the same tensor-parallel position hold the same weights (same seed)."""
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.gpt.parameters()]).sum().reshape(1)
        both = torch.cat([total, -total])
        _collective(lambda: dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.env.dp_cp_group),
                    "initial weight check", self.args.distributed_timeout_minutes)
        if not (both[0] == total[0] and -both[1] == total[0]):
            raise RuntimeError("initial weights differ between data/context-parallel ranks although every rank used "
                               "the same seed")

    # ---------------------------------------------------------------------------------------- step
    def _forward_step(self, data_iterator, model):
        """megatron's forward step: the micro-batch's plan and positions go into the CP context here, so
        the plan travels with its micro-batch through the schedule."""
        mb = next(data_iterator)
        dev = self.env.device
        positions = mb.position_ids.to(dev)
        self.context.set_batch(mb.plan, positions, mb.num_real)
        output = model(mb.tokens.to(dev)[None], positions[None], None, labels=mb.labels.to(dev)[None])
        return output, functools.partial(_loss_func, mb.loss_mask.to(dev))

    def _run_schedule(self, micro_batches, forward_only: bool) -> torch.Tensor:
        """Forward (and backward) of the micro-batches through megatron-core's schedule; returns this rank's
        [loss sum, token count] (float64)."""
        with cpu_compat.cuda_placements_on_cpu():
            losses = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.model],
                num_microbatches=len(micro_batches), seq_length=self.args.seq_length, micro_batch_size=1,
                forward_only=forward_only)
        self.context.clear()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for entry in losses:
            total += entry["lm loss"].double()
        return total

    def train_step(self, micro_batches) -> dict:
        args, env = self.args, self.env
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            loss_and_count = self._run_schedule(micro_batches, forward_only=False)
        except RuntimeError as exc:
            err = _as_comm_error(exc, args)
            if err is exc:
                raise
            raise err from exc
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        stepped, grad_norm = optimizer_step(self.optimizer, args.clip_grad)
        if stepped:
            self.scheduler.step(1)
        # One sum over all ranks: the loss (tensor-parallel duplicates count once), the batch's size
        # (once per CP group) and the bytes every rank's attention sent.
        first_tp, first_cp = env.tp_rank == 0, env.tp_rank == 0 and env.cp_rank == 0
        intra, inter = self._comm_bytes()
        sums = torch.tensor([
            loss_and_count[0].item() if first_tp else 0.0, loss_and_count[1].item() if first_tp else 0.0,
            sum(mb.num_tokens for mb in micro_batches) if first_cp else 0,
            sum(mb.attention_pairs for mb in micro_batches) if first_cp else 0,
            sum(len(mb.seqlens) for mb in micro_batches) if first_cp else 0, intra, inter,
        ], dtype=torch.float64, device=env.device)
        _collective(lambda: dist.all_reduce(sums), "loss all-reduce", args.distributed_timeout_minutes)
        loss = sums[0].item() / max(sums[1].item(), 1.0)
        finite = stepped and np.isfinite(loss)
        return {"lm_loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "skipped": not finite,
                "nan": not finite, "loss_scale": float(self.optimizer.get_loss_scale().item()),
                "comm_bytes": int(sums[5].item() + sums[6].item()), "inter_node_bytes": int(sums[6].item()),
                "tokens": int(sums[2].item()), "attention_pairs": int(sums[3].item()),
                "documents": int(sums[4].item())}

    def evaluate(self, batches, name: str) -> dict:
        """``--eval-iters`` forward-only iterations of ``--global-batch-size`` packs: the token-mean loss."""
        args, env = self.args, self.env
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.eval_iters):
                mbs = [next(batches) for _ in range(args.num_micro_batches)]
                total += self._run_schedule(mbs, forward_only=True)
        if env.tp_rank != 0:
            total.zero_()
        _collective(lambda: dist.all_reduce(total), f"{name} loss all-reduce", args.distributed_timeout_minutes)
        self.model.train()
        self._comm_bytes()  # validation traffic is not training traffic
        return {"lm_loss": total[0].item() / max(total[1].item(), 1.0), "tokens": int(total[1].item()),
                "seconds": time.perf_counter() - t0}

    def _validate(self, batches, prefix: str, name: str) -> dict:
        m = self.evaluate(batches, name)
        for line in validation_lines(prefix, m["lm_loss"]):
            self.print_last(line)
        self.logger.validation(name, m, self.iteration)
        if self.hooks.on_validation is not None:
            self.hooks.on_validation(prefix, m)
        return m

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
        batches = self.batches = iter(self.loader)
        first = True
        while self.iteration < args.train_iters:
            t0 = time.perf_counter()
            micro_batches = [next(batches) for _ in range(args.num_micro_batches)]
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
                **step,
                "plan_wait_ms": 1000.0 * plan_wait,
                "plan_ms": 1000.0 * sum(mb.plan_seconds for mb in micro_batches),
                **self._planned(micro_batches),
                "backend": args.cp_backend,
                "mask": args.attention_mask,
                "dataset": args.dataset_name,
                "world_size": env.world_size,
                "cp_size": env.cp_size,
                "tp_size": env.tp_size,
                "dp_size": env.dp_size,
            }
            history.append(m)
            if self.hooks.on_iteration is not None:
                self.hooks.on_iteration(self.iteration, m)
            self.logger.record(self.iteration, m, force_print=first)
            if self.iteration == min(args.train_iters, 2) or (first and self.iteration == args.train_iters):
                self._report_memory()
            first = False
            if self.has_valid and self.iteration % args.eval_interval == 0:
                self._validate(batches, f"iteration {self.iteration}", "validation")
            saved = False
            if args.save and args.save_interval and self.iteration % args.save_interval == 0 \
                    and self.iteration < args.train_iters:
                self.save()
                saved = True
            if args.exit_interval and self.iteration % args.exit_interval == 0 and self.iteration < args.train_iters:
                if args.save and not saved:
                    self.save()
                self.print_rank0(f"> exiting program at iteration {self.iteration} (--exit-interval {args.exit_interval})")
                return history
        if args.save and not (args.save_interval and self.iteration % args.save_interval == 0
                              and self.iteration < args.train_iters):
            self.save()
        if self.has_valid:
            self._validate(batches, "the end of training for val data", "validation")
        if self.has_test:
            self._validate(batches, "the end of training for test data", "test")
        return history

    def _report_memory(self) -> None:
        """Measured peak memory once the optimizer state exists (after iteration 2, or the last): CUDA's
        allocator peak, or on CPU the peak RSS and its growth since just before the model was built
        (what megatron/training/memory.py estimates), per rank."""
        dev = self.env.device
        peak = _peak_memory_mb(dev)
        growth = (peak[0] - self._baseline_mb) if dev.type == "cpu" else peak[0]
        gathered = torch.zeros(self.env.world_size, dtype=torch.float64, device=dev)
        mine = torch.tensor([peak[0], peak[1]], dtype=torch.float64, device=dev)
        _collective(lambda: dist.all_reduce(mine, op=dist.ReduceOp.MAX), "memory report",
                    self.args.distributed_timeout_minutes)
        gathered[self.env.rank] = growth
        _collective(lambda: dist.all_reduce(gathered), "memory report", self.args.distributed_timeout_minutes)
        if dev.type == "cuda":
            line = f"max allocated: {mine[0]:.1f} | max reserved: {mine[1]:.1f}"
        else:
            line = (f"peak RSS: {mine[0]:.1f} | peak growth since the model was built, per rank: "
                    f"{', '.join(f'{g:.1f}' for g in gathered.tolist())}")
        self.print_last(f"[Rank {self.env.rank}] (after {self.iteration} iterations) memory (MB, max over ranks) | "
                        f"{line} |")
        self.logger.scalar("mem-peak-MB", float(mine[0]), self.iteration)

    def save(self) -> None:
        path = checkpointing.save_checkpoint(self.args.save, self.iteration, self.consumed, self.gpt, self.optimizer,
                                             self.scheduler, self.args, self.env, log=self.print_rank0)
        self.print_rank0(f"> saved checkpoint {path}")

    def close(self) -> None:
        self.loader = self.batches = None
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        initialize.teardown(self.env)


def check_output_paths(args) -> None:
    """``--save``, ``--log-dir`` and ``--tensorboard-dir`` must be directories this process can write (or
    creatable in one): found at setup, not after the run. Writing
    is probed with a temporary file (permission bits alone say nothing for root or read-only mounts)."""
    import tempfile

    for flag, path in (("--save", args.save), ("--log-dir", args.log_dir), ("--tensorboard-dir", args.tensorboard_dir)):
        if not path:
            continue
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            where = "is a file" if existing == os.path.abspath(path) else f"is under {existing}, which is a file"
            raise ConfigError(f"{flag} {path} {where}, not a directory; give a directory path")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot write in {existing} ({exc.strerror}); give a writable "
                              "directory") from None


def _as_comm_error(exc: RuntimeError, args) -> Exception:
    """A failed collective inside megatron's schedule (gloo/NCCL error) -> CommunicationError."""
    text = str(exc)
    if isinstance(exc, cp.CommunicationError):
        return exc
    if any(k in text for k in ("Connection", "connection", "Timed out", "timed out", "NCCL", "Gloo", "gloo",
                               "peer")):
        rank = dist.get_rank() if dist.is_initialized() else -1
        return cp.CommunicationError(
            f"rank {rank}: a collective of the training step failed: a peer rank died, hung or diverged "
            f"(--distributed-timeout-minutes {args.distributed_timeout_minutes:g} bounds every wait). "
            f"Original error: {type(exc).__name__}: {exc}")
    return exc


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
