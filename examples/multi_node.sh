#!/usr/bin/env bash
# Several GPU nodes through torchrun's c10d rendezvous. Run the same command on every node:
#
#   NNODES=8 MASTER_ADDR=node0.cluster JOB_ID=dcp42 DATA=... TOKENIZER=... bash examples/multi_node.sh
#
# The whole world is one context-parallel group of NNODES x GPUS ranks (CP=...; TP via extra flags), planned
# hierarchically (across nodes, then inside each node); plans are computed by the data-loader workers
# of every rank (deterministic, no planner server). Untested in this repository's CI (no GPU there).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:?set NNODES}
GPUS=${GPUS:-8}
CP=${CP:-$((NNODES * GPUS))}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-dcp-megatron}
BACKEND=${BACKEND:-dcp}
DATA=${DATA:?set DATA}
TOKENIZER=${TOKENIZER:?set TOKENIZER}
RUN=${RUN:-runs/multinode_${BACKEND}}
case "$BACKEND" in
  dcp) DEFAULT_ARGS="--dcp-block-size auto --dcp-inter-node-imbalance-factor 4" ;;
  loongtrain) DEFAULT_ARGS="--loongtrain-head-parallel 2" ;;
  te) DEFAULT_ARGS="--te-cp-comm-type a2a+p2p" ;;
  *) DEFAULT_ARGS="" ;;
esac
BACKEND_ARGS=${BACKEND_ARGS:-$DEFAULT_ARGS}

# shellcheck disable=SC2086
torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" \
  pretrain_gpt.py --cp-backend "$BACKEND" $BACKEND_ARGS --context-parallel-size "$CP" \
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 4 --ffn-hidden-size 8192 \
  --swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights \
  --position-embedding-type rope --seq-length 131072 --max-position-embeddings 131072 --rotary-base 500000 \
  --train-iters 200 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 --bf16 --seed 1234 \
  --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split-long-documents \
  --attention-mask "${MASK:-causal}" --num-workers 8 --plan-prefetch 4 \
  --log-interval 10 --log-dir "$RUN" --save "$RUN/ckpt" --save-interval 100 \
  --distributed-timeout-minutes 30 "$@"
