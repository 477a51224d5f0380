#!/bin/bash
# A Megatron-LM GPT launch script, as Megatron-LM's own examples write one (positional paths, flag groups,
# torchrun), with two changes only: sizes scaled down so it runs on 4 CPU processes, and `--cp-backend dcp`
# added. Every other flag is Megatron-LM's, with Megatron-LM's meaning: tensor x context parallelism, a
# GPT-2 BPE vocabulary, a train/valid/test split, validation every --eval-interval iterations, checkpoints
# saved to and resumed from the same directory, TensorBoard.
#
#   bash examples/megatron_lm_gpt.sh CHECKPOINT_PATH TENSORBOARD_LOGS_PATH VOCAB_FILE MERGE_FILE DATA_PATH [extra flags]
#
# DATA_PATH is the prefix of a megatron.core indexed dataset (<DATA_PATH>.bin/.idx, e.g. my-gpt2_text_document
# from Megatron-LM's tools/preprocess_data.py). Run it again and it resumes from CHECKPOINT_PATH.
# tests/test_megatron_lm_script.py runs it end to end on a dataset written by IndexedDatasetBuilder.

set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
PYTHON=${PYTHON:-python}

CHECKPOINT_PATH=$1
TENSORBOARD_LOGS_PATH=$2
VOCAB_FILE=$3
MERGE_FILE=$4
DATA_PATH=$5
shift 5

DISTRIBUTED_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes "$NUM_NODES"
    --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT"
)

GPT_MODEL_ARGS=(
    --num-layers 2
    --hidden-size 64
    --num-attention-heads 4
    --seq-length 256
    --max-position-embeddings 256
    --attention-backend auto
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 2
    --train-iters 8
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    --lr 6.0e-4
    --lr-decay-style cosine
    --min-lr 6.0e-5
    --lr-warmup-fraction .125
    --lr-decay-iters 8
    --use-cpu-initialization
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --context-parallel-size 2
)

DATA_ARGS=(
    --data-path "$DATA_PATH"
    --vocab-file "$VOCAB_FILE"
    --merge-file "$MERGE_FILE"
    --tokenizer-type GPT2BPETokenizer
    --split 949,50,1
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 1
    --save-interval 4
    --eval-interval 4
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --eval-iters 2
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${GPT_MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}" \
    --cp-backend dcp \
    "$@"
