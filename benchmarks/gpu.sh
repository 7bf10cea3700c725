#!/usr/bin/env bash
# The accelerator check, one script, < 8 min on one H100/H200, one JSON:
#   1. the tests that matter on an accelerator (float32 at 'highest' matmul precision: the
#      fixtures are exact float32, TF32 would miss them by ~1e-3): parity with the authors'
#      Skip-GANomaly and GANomaly on the GPU's `lax` graph, the shard_map step against
#      plain jit (8 simulated CPU devices, then the GPU's own devices) with the
#      conv_impl='lax' and bfloat16 runs;
#   2. benchmarks/gpu_train.py: bfloat16 and float32 train images/s at batches 64-4096 with
#      MFU, scoring images/s, a full 15-epoch CIFAR-10-sized run per dtype, within the time
#      left, the test summary included.
# It needs a python with jax (CUDA or TPU), flax, optax, orbax-checkpoint, numpy, pillow,
# absl-py, pytest: the device image's. The project is not installed (PYTHONPATH=.); the
# pure-Python packages the image lacks (benchmarks/gpu_wheels.txt) come as wheels in .whl/
# (download them here first, see that file) and are installed into a temporary folder.
#   bash benchmarks/gpu.sh [--out DIR]     # DIR: where the JSON and test reports go
#                                          # (default benchmarks/results; on the device
#                                          # tool: --out "$OUT")
#   bash benchmarks/gpu.sh --smoke [--out DIR]   # tiny sizes, any backend (~1 min on 2 cores)
# Runs with whatever jax the python has (jax 0.11.2 on the device image, outside the
# pyproject pin jax<0.11, which only a machine with jax 0.11 can check).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SMOKE=0
OUT_DIR=benchmarks/results
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if ((SMOKE)) && [[ "$OUT_DIR" == benchmarks/results ]]; then OUT_DIR=/tmp/gpu_smoke; fi
mkdir -p "$OUT_DIR"
START=$SECONDS
BUDGET_S=${GPU_BUDGET_S:-450}  # Whole script; the device tool allows 600 s a command.

# Carried wheels: each listed one whose module the python lacks.
SITE=$(mktemp -d)
while read -r requirement module; do
  [[ -z "$requirement" || "$requirement" == \#* ]] && continue
  "$PYTHON" -c "import $module" 2>/dev/null && continue
  wheel=$(ls .whl/"${requirement%%==*}"*.whl .whl/"$(tr - _ <<<"${requirement%%==*}")"*.whl \
    2>/dev/null | head -1 || true)
  [[ -n "$wheel" ]] || { echo "missing $module and no wheel of $requirement in .whl/" >&2; exit 1; }
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel"
done < benchmarks/gpu_wheels.txt
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ((SMOKE)); then
  # XLA's fastest compile (as the tests use): the smoke checks that everything runs.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  # Two quick tests of the device subset's modules (the same imports, without training).
  TESTS=(tests/test_reference_parity.py::test_reference_running_variance_is_unbiased
    tests/test_layers.py::test_plan_is_lax_off_cpu_and_checks_impl)
  DEVICE_TESTS=()
  TRAIN_ARGS=(--smoke)
else
  "$PYTHON" -c "import jax; assert jax.default_backend() in ('gpu', 'tpu'), jax.devices()"
  TESTS=(tests/test_reference_parity.py tests/test_ganomaly_parity.py tests/test_multidevice.py)
  DEVICE_TESTS=(tests/test_multidevice.py)
  TRAIN_ARGS=()
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"

# Tests: several pytest workers share the GPU, so none may take 75% of its memory.
# Without pytest-xdist, pyproject's addopts (--numprocesses ...) would be an error.
XDIST=$("$PYTHON" -c 'import xdist' 2>/dev/null && echo 1 || echo 0)
run_tests() {  # SECONDS WORKERS JUNIT_PATH TESTS...: a failure goes into the JSON, not fatal.
  local limit=$1 junit=$3 parallel=(-n "$2"); shift 3
  ((XDIST)) || parallel=(-o addopts=-ra)
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml="$junit" "$@" || echo "tests failed or timed out: $*"
}
rm -f "$OUT_DIR"/tests*.xml  # A report left by an earlier run would pass for this one's.
JUNIT="$OUT_DIR/tests.xml"
run_tests 240 "$( ((SMOKE)) && echo 0 || echo 3)" "$JUNIT" "${TESTS[@]}"
if ((${#DEVICE_TESTS[@]})); then
  (export MULTIDEVICE_ON_DEVICE=1; run_tests 150 0 "$OUT_DIR/tests_on_device.xml" "${DEVICE_TESTS[@]}")
  JUNIT="$JUNIT,$OUT_DIR/tests_on_device.xml"
fi

LEFT=$((BUDGET_S - (SECONDS - START)))
echo "tests done after $((SECONDS - START)) s; benchmarks get $LEFT s"
"$PYTHON" benchmarks/gpu_train.py "${TRAIN_ARGS[@]}" --out "$OUT_DIR" --tests_junit "$JUNIT" \
  --deadline_s "$((LEFT > 60 ? LEFT : 60))"
rm -rf "$SITE"
