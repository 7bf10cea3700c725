#!/usr/bin/env bash
# Accelerator benchmarks. Needs jax with CUDA (`pip install -e . 'jax[cuda12]'`) or a TPU.
#   bash benchmarks/gpu.sh            # gpu_train.py: bfloat16 and float32 train images/s
#                                     # at batches 64-4096, MFU, and a full 15-epoch
#                                     # CIFAR-10-sized run (45,000 images); ~5 min on an H200
#   bash benchmarks/gpu.sh --all      # then also throughput.py (scoring, memory; ~5 min more)
#   bash benchmarks/gpu.sh --smoke    # tiny sizes on any backend (checks the scripts run)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--smoke" ]]; then
  exec python benchmarks/gpu_train.py --smoke
fi
python -c "import jax; assert jax.default_backend() in ('gpu', 'tpu'), jax.devices()"
python benchmarks/gpu_train.py
if [[ "${1:-}" == "--all" ]]; then
  for dtype in float32 bfloat16; do
    python benchmarks/throughput.py --dtype="$dtype" --iters=30 \
      --train_batches=64,256,1024 --score_batches=64,256,1024
  done
fi
