#!/usr/bin/env bash
# One GPU node (default 8 GPUs): NCCL, bf16 parameters (fp32 main parameters and gradients), Transformer
# Engine layers when TE is installed (core attention is always the CP backend's), one CP group of all GPUs
# (CP=4 TP=2 for tensor x context parallelism: add --tensor-model-parallel-size 2). Untested in this repository's CI (no GPU there).
#
#   DATA=data/corpus TOKENIZER=data/spm.model BACKEND=dcp bash examples/gpu_single_node.sh
#   BACKEND=loongtrain BACKEND_ARGS="--loongtrain-head-parallel 2" bash examples/gpu_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
CP=${CP:-$GPUS}
BACKEND=${BACKEND:-dcp}
DATA=${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a sentencepiece model (tools/train_tokenizer.py)}
RUN=${RUN:-runs/gpu_${BACKEND}}
case "$BACKEND" in
  dcp) DEFAULT_ARGS="--cp-devices-per-node $GPUS --dcp-block-size auto" ;;
  loongtrain) DEFAULT_ARGS="--loongtrain-head-parallel 2 --cp-devices-per-node $GPUS" ;;
  te) DEFAULT_ARGS="--te-cp-comm-type p2p" ;;
  *) DEFAULT_ARGS="" ;;
esac
BACKEND_ARGS=${BACKEND_ARGS:-$DEFAULT_ARGS}

# shellcheck disable=SC2086
torchrun --standalone --nproc_per_node "$GPUS" pretrain_gpt.py \
  --cp-backend "$BACKEND" $BACKEND_ARGS --context-parallel-size "$CP" \
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 4 --ffn-hidden-size 8192 \
  --swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights \
  --position-embedding-type rope --seq-length 65536 --max-position-embeddings 65536 --rotary-base 500000 \
  --train-iters 200 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 --bf16 --seed 1234 \
  --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split-long-documents \
  --attention-mask "${MASK:-causal}" --num-workers 4 --plan-prefetch 4 \
  --log-interval 10 --log-dir "$RUN" --save "$RUN/ckpt" --save-interval 100 \
  --distributed-timeout-minutes 20 "$@"
