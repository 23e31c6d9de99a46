#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine after `bash scripts/device_prepare.sh` here:
#
#   device run:  command "bash scripts/device_check.sh", carry [".device"], timeout_s 600
#
# The benchmark's numpy peers run beside its GPU half (a lent machine has 16 cores); both halves
# write their JSON after every feeder, so a run cut off at its limit still returns what it finished.
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
# (at most 4 minutes: a hung capture must not cost the benchmark the rest of the command's 10)
DOPFKIT_REQUIRE=gpu timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or requires_gpu" \
    tests/test_powerflow.py tests/test_distributed_admm.py 2>&1 | tee "$OUT/pytest_gpu.log" || rc=1
# the numpy peers on their own cores, side by side with the GPU runs (their timings are one-core
# figures either way), then one record; each half is rewritten after every feeder, so a run cut off at
# its limit still returns what it finished (merge them here with --merge)
# shellcheck disable=SC2086
python3 -m benchmarks.gpu --part cpu --out "$OUT/gpu_cpu.json" ${GPU_BENCH_ARGS:-} \
    > "$OUT/benchmark_cpu.log" 2>&1 &
cpu_half=$!
# shellcheck disable=SC2086
python3 -m benchmarks.gpu --part device --out "$OUT/gpu_device.json" ${GPU_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/benchmark_gpu.log" || rc=1
wait $cpu_half || rc=1
tail -n 30 "$OUT/benchmark_cpu.log"
python3 -m benchmarks.gpu --merge "$OUT/gpu_cpu.json" "$OUT/gpu_device.json" --out "$OUT/gpu.json" || rc=1
exit $rc
