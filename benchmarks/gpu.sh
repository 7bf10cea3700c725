#!/usr/bin/env bash
# The throughput benchmark on a GPU machine, float32 and bfloat16, batch sweep to 1024.
# Needs jax with CUDA (`pip install -e . 'jax[cuda12]'`); about 5 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
for dtype in float32 bfloat16; do
  python benchmarks/throughput.py --dtype="$dtype" --iters=30 \
    --train_batches=64,256,1024 --score_batches=64,256,1024
done
