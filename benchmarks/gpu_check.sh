#!/usr/bin/env bash
# One prepared check for a lent GPU machine without network (its image has torch, triton,
# transformers, peft, pytest): install fastlora, print the card, run the GPU tests (the op suites
# in every dtype, bf16 included, and the gpu-marked checks), then the benchmarks, most important
# first. Every step is capped with `timeout` (and by what is left of an 8-minute budget), logged to
# <step>.log, and a failing step does not stop the next. Every benchmark appends its rows to one CSV.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # $OUT defaults to benchmarks/results/gpu-<UTC time>
#
# The device tool brings back at most 8 files from $OUT: logs are written to a work folder and
# packed into $OUT/logs.tar.gz at exit; $OUT keeps the card, the step codes and all.csv (the rows;
# append them to benchmarks/results/all.csv with `tail -n +2 $OUT/all.csv >> benchmarks/results/all.csv`).
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
OUT="$(mktemp -d)"
mkdir -p "$RESULTS"
pack() {
    for f in card.txt steps.txt all.csv; do
        [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RESULTS/"
    done
    tar czf "$RESULTS/logs.tar.gz" -C "$OUT" .
}
trap pack EXIT
trap 'exit 143' TERM
PY="$(command -v python || command -v python3)"
START=$SECONDS
BUDGET_S=${BUDGET_S:-470}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is importable even if the install fails
export PYTHONUNBUFFERED=1
export FASTLORA_BUILD_EXT=0  # the C++ CPU extension is not what this machine is for: save its build time
CSV="$OUT/all.csv"

step() {  # step NAME CAP_S COMMAND...: run within min(CAP_S, budget left), keep the log, print its tail
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: skipped, ${left}s of the budget left"
        echo "$name skipped" >>"$OUT/steps.txt"
        return
    fi
    echo "=== [$((SECONDS - START))s] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "=== [$((SECONDS - START))s] $name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
    echo "$name $rc" >>"$OUT/steps.txt"
}

{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
} >"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

step versions 30 "$PY" -c "
import platform, torch, triton
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
for name in ('transformers', 'peft', 'pytest'):
    try:
        print(name, __import__(name).__version__)
    except Exception as error:
        print(name, 'unavailable:', error)
"
step install 90 "$PY" -m pip install --no-build-isolation --no-deps -e .
step backends 30 "$PY" -m fastlora
# Correctness first, triton-focused (no -x: every failure is worth seeing): the op suites in every dtype (fp32,
# fp16, bf16) on the GPU, CUDA fp16/bf16 autocast on every target kind, mixed-adapter batches; the persistent TMA
# forward GEMM (FASTLORA_TRITON_GEMM=hopper; not the default until measured): its tests and the op suite's triton
# tests with it on; the gpu-marked checks (a CUDA-graph-captured GPT-2 step trains and draws fresh dropout masks,
# torch.compile reduce-overhead trains, every hopper config against a reference). Then the benchmarks, most
# important first: the hopper route against the tiled GEMM and cuBLAS, what a call costs on the host and how many
# kernels it runs, the captured step's replay against eager, the GPT-2 Medium-shape training step against peft,
# DoRA (bf16, 16384 tokens, 4096->4096 and 4096->14336) against peft's DoRA and fastlora's LoRA, the layer grid
# (eager and graph replays), mixed-adapter batches against peft; then FSDP2 and DDP over nccl (one GPU: one rank)
# against the one-process run, the rest of the suite, the quick layer suite.
PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")  # kernel compiles are CPU-bound: spread them
TAIL=40 step pytest_triton 200 "$PY" -m pytest tests/test_ops_triton.py tests/test_ops.py tests/test_autocast.py \
    tests/test_ops_mixed.py tests/test_dora.py tests/test_dora_triton.py -k "triton or cuda or mixed" -q --maxfail=15 \
    -p no:cacheprovider $PARALLEL
TAIL=30 step pytest_hopper 100 env FASTLORA_TRITON_GEMM=hopper "$PY" -m pytest tests/test_hopper.py tests/test_ops.py \
    -k "hopper or triton" -q --maxfail=10 -p no:cacheprovider $PARALLEL
TAIL=30 step pytest_gpu_checks 150 "$PY" -m pytest tests/test_gpu_checks.py -m gpu -q -p no:cacheprovider
TAIL=45 step bench_hopper 75 "$PY" benchmarks/bench_hopper.py --budget-s 45 --csv "$CSV"
TAIL=40 step bench_host_profile 70 "$PY" benchmarks/bench_host_profile.py --csv "$CSV"
TAIL=10 step bench_graph_step 45 "$PY" benchmarks/bench_graph_step.py --csv "$CSV"
TAIL=20 step bench_train_step 130 "$PY" benchmarks/bench_train_step.py --full --csv "$CSV"
TAIL=20 step bench_dora_gpu 80 "$PY" benchmarks/bench_dora.py --gpu --repeats 5 --csv "$CSV"
TAIL=70 step bench_layer_gpu 150 "$PY" benchmarks/bench_layer.py --gpu --csv "$CSV"
TAIL=40 step bench_mixed 60 "$PY" benchmarks/bench_mixed.py --device cuda --repeats 5 --csv "$CSV"
step distributed_cuda 60 bash tests/distributed_cuda.sh "$PY" "$OUT"
step pytest_rest 90 "$PY" -m pytest tests -x -q -p no:cacheprovider \
    --ignore=tests/test_ops.py --ignore=tests/test_ops_triton.py --ignore=tests/test_ops_mixed.py \
    --ignore=tests/test_autocast.py --ignore=tests/test_distributed.py --ignore=tests/test_gpu_checks.py
step bench_layer_quick 90 "$PY" benchmarks/bench_layer.py --quick --csv "$CSV"

echo "=== steps (name exit-code), $((SECONDS - START))s in all:"
cat "$OUT/steps.txt"
ls -la "$OUT"
