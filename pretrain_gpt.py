#!/usr/bin/env python
"""Pretrain a GPT on megatron-core with a pluggable context-parallel backend.

    torchrun --nproc_per_node 4 pretrain_gpt.py --cp-backend dcp --num-layers 4 --hidden-size 256 \\
        --num-attention-heads 8 --num-query-groups 2 --seq-length 4096 --train-iters 50 \\
        --data-path data/corpus_text_document --tokenizer-model data/spm.model

Run with --help for every option (Megatron-LM names; see megatron/training/arguments.py).
"""
import os
import sys
import warnings

# megatron-core warns once per module that Transformer Engine and Apex are absent (expected on CPU).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")


def main(argv=None) -> int:
    from dcp_backend.errors import CommunicationError, CPError
    from megatron.training.arguments import ConfigError
    from megatron.training.training import pretrain

    rank = os.environ.get("RANK", "0")
    try:
        pretrain(argv)
    except ConfigError as exc:
        print(f"pretrain_gpt.py: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except (CommunicationError, CPError) as exc:
        print(f"pretrain_gpt.py: rank {rank} failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
