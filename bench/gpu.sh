#!/usr/bin/env bash
# The GPU run of bench.throughput, as one prepared script for a lent GPU machine with no package index:
# its Python has torch and transformers; the rest comes from .gpu/ (wheels, a redis-server, the course
# data), carried beside the checkout. Figures and logs go to $OUT (default bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PATH=$PWD/.gpu/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --find-links .gpu/wheels celery redis flask gunicorn pydantic minsearch accelerate psutil 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# Each shape as shape[:continuous]: phi-3-mini twice, static microbatches and continuous batching, in (b) and (c).
for run in ${RUNS:-flan-t5-xl phi-3-mini:off phi-3-mini:auto}; do
  shape=${run%%:*}; continuous=${run#*:}; [ "$continuous" = "$run" ] && continuous=off
  timeout "${SHAPE_TIMEOUT_S:-110}" python3 -m bench.throughput --device cuda --shape "$shape" --skip a \
    --continuous "$continuous" --n "${N:-2048}" --data .gpu/data --json "$OUT/$shape-$continuous-cuda.json" \
    2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/$shape-$continuous-cuda.log"
done
# The simulated spec against the real shape's timings: the same command on the simulated H200.
timeout 100 python3 -m bench.throughput --shape sim-xl --skip a --n 1024 --data .gpu/data --json "$OUT/sim-xl.json" \
  2>&1 | tee "$OUT/sim-xl.log"
