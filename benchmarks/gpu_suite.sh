#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run, on a CUDA machine whose python3 already
# has jax with CUDA, flax, optax, torch with CUDA and transformers:
#
#     OUT=gpu-results bash benchmarks/gpu_suite.sh
#
# 1. the parity tests (tests/test_parity.py: codes equal to transformers' at the default, highest
#    matmul precision) and 2. benchmarks/precision.py (code agreement of the faster precisions)
#    run side by side, as neither is timed; then, alone on the GPU, 3. benchmarks/benchmark.py
#    (encodec-jax against transformers on the same GPU, full float32, then both with TF32) and
#    4. benchmarks/streaming.py. Each step's output goes to $OUT/<step>.log.
# STEPS picks some of them (default: all). On an H200 (2026-12-04) the whole suite needed more
# than one 10-minute call: the parity tests alone took over 6 minutes (XLA autotunes every new
# convolution shape), so run STEPS="parity precision", then STEPS="benchmark benchmark_tf32
# streaming". Each step's time limit (PARITY_S, ...) is in seconds.
# Pure-Python dependencies the machine lacks (soundfile, soxr) can travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-suite-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-suite-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Two processes share the GPU in the first phase; JAX would otherwise take 75 % of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

STEPS=${STEPS:-parity precision benchmark benchmark_tf32 streaming}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: start $(date +%T)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? at $(date +%T)"
    tail -n 40 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import jax, flax, optax, torch, transformers, numpy; print("jax", jax.__version__,
jax.devices(), "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
"transformers", transformers.__version__, "numpy", numpy.__version__)' || exit 1

step parity "${PARITY_S:-420}" python3 -m pytest tests/test_parity.py -q -p no:cacheprovider \
    --durations=8 &
step precision "${PRECISION_S:-300}" python3 benchmarks/precision.py &
wait
step benchmark "${BENCHMARK_S:-270}" python3 benchmarks/benchmark.py --repeats 5 \
    --json "$OUT/benchmark.json"
step benchmark_tf32 "${TF32_S:-150}" python3 benchmarks/benchmark.py --repeats 5 \
    --precision default --no-memory
step streaming "${STREAMING_S:-120}" python3 benchmarks/streaming.py --steps 200
