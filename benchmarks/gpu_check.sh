#!/usr/bin/env bash
# The GPU part of issue 6 as one script (about 5 minutes on one H200, under 8 with its time limits):
# the gpu-marked tests, then the benchmark (eager / compiled / CUDA graphs / both).
#   bash benchmarks/gpu_check.sh            # writes into benchmarks/results/ (or $OUT)
# Wheels for packages the GPU machine lacks (torchrl, tensordict and their small
# dependencies) are installed from .whl/ when that folder exists.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EXCLUDE_TD_FROM_PYTREE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch, torchrl, tensordict; print('torch', torch.__version__, 'torchrl', torchrl.__version__, 'tensordict', tensordict.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu_info.txt"
timeout 150 python3 -m pytest -m gpu tests/test_accelerate.py -o addopts="" -p no:cacheprovider -rA -q -W ignore 2>&1 | tail -n 60 | tee "$OUT/gpu_tests.log"
echo "tests exit: $?"
timeout 200 python3 benchmarks/bench_bdpo.py --steps 10 --out "$OUT/gpu.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_bench.log"
echo "bench exit: $?"
# TF32 matmuls (what JAX uses on GPUs by default): the update and acting again
timeout 150 python3 benchmarks/bench_bdpo.py --steps 10 --matmul-precision high --only update --only acting --out "$OUT/gpu_tf32.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_tf32.log"
echo "bench tf32 exit: $?"
