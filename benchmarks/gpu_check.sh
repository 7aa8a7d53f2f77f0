#!/usr/bin/env bash
# One prepared check for a lent GPU machine without network (its image has torch, triton,
# transformers, peft, pytest, pytest-benchmark): install fastlora, print the card, run the test
# suite on the GPU (every dtype, bf16 included), then time the triton backend. Every step is
# capped with `timeout` (and by what is left of an 8-minute budget, most important steps
# first), logged to $OUT/<step>.log, and a failing step does not stop the next.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # $OUT defaults to benchmarks/results/gpu-<UTC time>
#
# The device tool brings back at most 8 files from $OUT: logs are written to a work folder and
# packed into $OUT/logs.tar.gz at exit; $OUT keeps the card, the step codes, gpu_bench.{md,json} and hopper_bench.md.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
OUT="$(mktemp -d)"
mkdir -p "$RESULTS"
pack() {
    for f in card.txt steps.txt gpu_bench.md gpu_bench.json host_profile.md graph_step.json hopper_bench.md; do
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
for name in ('transformers', 'peft', 'pytest', 'pytest_benchmark'):
    try:
        print(name, __import__(name).__version__)
    except Exception as error:
        print(name, 'unavailable:', error)
"
step install 90 "$PY" -m pip install --no-build-isolation --no-deps -e .
step backends 30 "$PY" -m fastlora
# Correctness first, triton-focused (no -x: every failure is worth seeing): the op suites in every dtype (fp32,
# fp16, bf16) on the GPU, CUDA fp16/bf16 autocast on every target kind, mixed-adapter batches. Then what a call
# costs on the host and how many kernels it runs (host_profile.py), a GPT-2 step captured in a CUDA graph
# (graph_step.py), the layer and training-step timings, mixed-adapter batches against peft, FSDP2 and DDP over nccl
# (one GPU: one rank) against the one-process run, the rest of the suite.
PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")  # kernel compiles are CPU-bound: spread them
TAIL=40 step pytest_triton 200 "$PY" -m pytest tests/test_ops_triton.py tests/test_ops.py tests/test_autocast.py \
    tests/test_ops_mixed.py -k "triton or cuda or mixed" -q --maxfail=15 -p no:cacheprovider $PARALLEL
# The persistent TMA forward GEMM (FASTLORA_TRITON_GEMM=hopper; not the default until measured): its tests and the op
# suite's triton tests with it on (correctness in fp16 and bf16 first), then its forward against the tiled GEMM and
# cuBLAS (every config checked against a reference, then eager and CUDA-graph times; hopper_bench.md).
TAIL=30 step pytest_hopper 100 env FASTLORA_TRITON_GEMM=hopper "$PY" -m pytest tests/test_hopper.py tests/test_ops.py \
    -k "hopper or triton" -q --maxfail=10 -p no:cacheprovider $PARALLEL
TAIL=45 step hopper_bench 75 "$PY" benchmarks/hopper_bench.py --out "$OUT" --budget-s 45
TAIL=30 step host_profile 70 "$PY" benchmarks/host_profile.py --out "$OUT"
TAIL=10 step graph_step 70 "$PY" benchmarks/graph_step.py --out "$OUT"
TAIL=70 step gpu_bench 200 "$PY" benchmarks/gpu_bench.py --out "$OUT"
TAIL=40 step mixed_bench 60 "$PY" benchmarks/mixed.py --device cuda --repeats 5
step distributed_cuda 60 bash tests/distributed_cuda.sh "$PY" "$OUT"
step pytest_rest 90 "$PY" -m pytest tests -x -q -p no:cacheprovider \
    --ignore=tests/test_ops.py --ignore=tests/test_ops_triton.py --ignore=tests/test_ops_mixed.py \
    --ignore=tests/test_autocast.py --ignore=tests/test_distributed.py
if [ -f benchmarks/run.py ]; then
    step run_quick 90 "$PY" benchmarks/run.py --quick --no-plot --out "$OUT"
fi

echo "=== steps (name exit-code), $((SECONDS - START))s in all:"
cat "$OUT/steps.txt"
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
ls -la "$OUT"
