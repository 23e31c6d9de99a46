#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine after `bash scripts/device_prepare.sh` here:
#
#   device run:  command "bash scripts/device_check.sh", carry [".device"], timeout_s 600
#
# About 6 minutes on a 2-core CPU machine as a dry run; gpu.json is rewritten after every feeder, so
# a run cut off at its limit still returns what it finished.
#
# Installs the carried wheels, runs the GPU unit tests, then `python -m benchmarks.gpu`; everything
# it writes lands in $OUT (nvidia-smi.txt, pytest_gpu.log, benchmark_gpu.log, gpu.json). Copy
# gpu.json to data/results/ and commit it: its "machine" names the GPU. GPU_BENCH_ARGS passes options
# to the benchmark (a dry run without a GPU: GPU_BENCH_ARGS="--device cpu --feeders ieee13").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || { echo "device_check: wheel install failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DOPFKIT_FEEDERS_DIR=$PWD/.device/feeders
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c 'import cupy; print("cupy", cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())'
rc=0
python3 -m pytest -q -p no:cacheprovider -m "gpu or requires_gpu" tests/test_powerflow.py \
    tests/test_distributed_admm.py 2>&1 | tee "$OUT/pytest_gpu.log" || rc=1
# shellcheck disable=SC2086
python3 -m benchmarks.gpu --out "$OUT/gpu.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/benchmark_gpu.log" || rc=1
exit $rc
