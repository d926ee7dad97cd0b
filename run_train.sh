#!/usr/bin/env bash
# Train X-MDPT. Default: the paper's single-GPU X-MDPT-S/2 recipe (configs/xmdpt_s.yaml).
#   CONFIG=configs/xmdpt_b.yaml ./run_train.sh            # another config
#   NUM_GPUS=4 ./run_train.sh                             # one machine, 4 GPUs (torchrun); global batch kept
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NUM_GPUS=8 ./run_train.sh   # several machines (run on each)
#   ./run_train.sh --resume --max-steps 400000 train.lr=5e-5          # extra arguments pass through
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-configs/xmdpt_s.yaml}
OUT=${OUT:-runs/$(basename "$CONFIG" .yaml)}
NUM_GPUS=${NUM_GPUS:-1}
NNODES=${NNODES:-1}
if [ "$NUM_GPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  if [ "$NNODES" -gt 1 ]; then
    launch=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
            --master_port "${MASTER_PORT:-29500}")
  else
    launch=(--standalone)
  fi
  exec torchrun "${launch[@]}" --nproc_per_node "$NUM_GPUS" train_xmdpt.py --config "$CONFIG" --out "$OUT" "$@"
fi
exec python train_xmdpt.py --config "$CONFIG" --out "$OUT" "$@"
