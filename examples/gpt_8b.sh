#!/usr/bin/env bash
# The published DCP end-to-end configuration ("gpt2-8b", SOSP'25 figures 14-15 and 20) at its published
# layout: tensor parallelism 4 x context parallelism 16 on 8 nodes x 8 A100-40G.
#   model     32 layers, hidden 4096, 32 query heads, 8 KV groups (head dim 128), FFN 14336
#   layout    TP 4 x CP 16 x DP 1 (megatron-core parallel_state, TP innermost): each TP rank runs DCP over its
#             CP group of 16 ranks (2 per node, strided by 4) on 8 query heads and 2 KV groups
#   batches   --seq-length tokens per iteration (16K, 32K, 64K or 128K; the paper's "global batch in
#             tokens equals the max sequence length"), 200 iterations, log every 10
#   DCP       block size 512 (16K) / 1024 (32K, 64K) / 2048 (128K), memory imbalance 0.2, compute
#             imbalance 0.1, head block 1, inter-node imbalance factor 4 (or 16)
#   precision bf16 parameters, fp32 main parameters and gradients, megatron-core's DistributedOptimizer
#             (sharded over the 16 data x context parallel ranks), overlapped gradient reduce-scatter
# Memory per GPU, estimated by tools/memory_report.py (docs/BENCHMARKS.md, "Memory"): at 128K tokens about
# 31.7 GB of 40 (parameters 3.4, gradients 6.9, optimizer 1.3, activations 19.5, DCP buffers 0.5);
# 25.4 GB with --sequence-parallel. Differences from the published runs, on purpose: RoPE instead of
# learned absolute positions, SwiGLU and RMSNorm (the FFN size 14336 is a SwiGLU size). Untested here (no
# GPU in this repository's CI): run tools/gpu_verify.py on the cluster first.
#
#   NNODES=8 MASTER_ADDR=node0 DATA=data/longalign_text_document TOKENIZER=data/tok.model SEQ=131072 bash examples/gpt_8b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-8}
GPUS=${GPUS:-8}
TP=${TP:-4}
CP=${CP:-$((NNODES * GPUS / TP))}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}
MASTER_PORT=${MASTER_PORT:-29500}
SEQ=${SEQ:-131072}
BACKEND=${BACKEND:-dcp}
MASK=${MASK:-causal}
DATA=${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py or Megatron-LM preprocessing)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a sentencepiece model}
RUN=${RUN:-runs/gpt8b_${BACKEND}_${MASK}_${SEQ}}
case "$SEQ" in
  16384) BLOCK=512 ;;
  32768|65536) BLOCK=1024 ;;
  *) BLOCK=2048 ;;
esac
case "$BACKEND" in
  dcp) BACKEND_ARGS="--dcp-block-size $BLOCK --dcp-head-block-size 1 --dcp-memory-imbalance 0.2 \
        --dcp-compute-imbalance 0.1 --dcp-inter-node-imbalance-factor ${FACTOR:-4}" ;;
  loongtrain) BACKEND_ARGS="--loongtrain-head-parallel 2" ;;
  te) BACKEND_ARGS="--te-cp-comm-type a2a+p2p" ;;
  *) BACKEND_ARGS="" ;;
esac

# shellcheck disable=SC2086
torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "gpt8b-$BACKEND-$MASK-$SEQ" \
  pretrain_gpt.py --cp-backend "$BACKEND" $BACKEND_ARGS \
  --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" \
  --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 --kv-channels 128 \
  --ffn-hidden-size 14336 --swiglu --normalization RMSNorm --disable-bias-linear \
  --untie-embeddings-and-output-weights --position-embedding-type rope --rotary-base 500000 \
  --seq-length "$SEQ" --max-position-embeddings "$SEQ" --attention-mask "$MASK" \
  --micro-batch-size 1 --global-batch-size 1 \
  --train-iters 200 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 --bf16 --use-distributed-optimizer --overlap-grad-reduce --seed 1234 \
  --data-path "$DATA" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --split 998,1,1 --split-long-documents --eval-interval 50 --eval-iters 5 \
  --num-workers 8 --plan-prefetch 4 --log-interval 10 --log-dir "$RUN" \
  --distributed-timeout-minutes 30 "$@"
