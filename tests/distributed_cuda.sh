#!/usr/bin/env bash
# FSDP2 and DDP over nccl on one GPU (one rank) against the one-process run of the same batches:
#   bash tests/distributed_cuda.sh PYTHON OUT_DIR      (benchmarks/gpu_check.sh runs it on a lent GPU)
set -euo pipefail
PY=$1 OUT=$2
cd "$(dirname "$0")/.."
"$PY" tests/distributed_train.py --mode single --device cuda --ranks 1 --out "$OUT/single.pt"
for mode in fsdp ddp; do
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tests/distributed_train.py --mode $mode \
        --device cuda --out "$OUT/$mode.pt"
done
"$PY" tests/distributed_train.py --compare "$OUT/single.pt" "$OUT/fsdp.pt" "$OUT/ddp.pt"
