#!/usr/bin/env bash
# Ipopt for Pyomo, the route that works on Debian/Ubuntu without conda:
#   * cyipopt-wheels (a pip dependency of the `core` extra) bundles Ipopt 3.14 + MUMPS;
#   * Pyomo drives it through SolverFactory("cyipopt"), which needs PyNumero's ASL library;
#   * that library is built here against Debian's libamplsolver-dev, into $PYOMO_CONFIG_DIR.
# Called by `make solvers` as: scripts/setup_solvers.sh VENV_PYTHON
# Exit status: 0 = Ipopt works (the Makefile stamps it), 3 = route impossible here (message printed,
# the caller continues), anything else = a real failure.
set -euo pipefail

PY=${1:?usage: setup_solvers.sh VENV_PYTHON}
VENV_DIR=$(cd "$(dirname "$PY")/.." && pwd)
: "${PYOMO_CONFIG_DIR:=$VENV_DIR/pyomo}"
export PYOMO_CONFIG_DIR
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
ASL_INCLUDE_DIR=${ASL_INCLUDE_DIR:-/usr/include/ampl-netlib-solvers}
ASL_LIBRARY=${ASL_LIBRARY:-/usr/lib/$MULTIARCH/libamplsolver.so}
PYNUMERO_LIB=$PYOMO_CONFIG_DIR/lib/libpynumero_ASL.so
here=$(cd "$(dirname "$0")" && pwd)

conda_hint() {
    cat <<'MSG'
------------------------------------------------------------------------------------------
Ipopt for Pyomo could not be set up on this machine (this route needs Debian/Ubuntu's apt-get,
libamplsolver-dev, cmake and a C++ compiler). Everything else works; the chapters that solve
NLP models need Ipopt. The portable alternative is conda-forge, which ships the ipopt executable:

    conda env create -f environment.yml      # python 3.11, ipopt, and this project with its extras
    conda activate dopf-book

and use SolverFactory("ipopt") in place of SolverFactory("cyipopt").
------------------------------------------------------------------------------------------
MSG
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@";
    elif command -v sudo >/dev/null 2>&1; then sudo "$@";
    else echo "need root to run: $*" >&2; return 1; fi
}

# 1. cyipopt (Ipopt + MUMPS in a wheel)
if ! "$PY" -c "import cyipopt" >/dev/null 2>&1; then
    echo "solvers: installing cyipopt-wheels"
    "$PY" -m pip install "cyipopt-wheels==1.7.0.dev0"
fi

# 2. Debian's ASL (runtime and headers), and the build tools when the library must be built -- only
#    what is missing
need_pkgs=()
[ -f "$ASL_LIBRARY" ] || need_pkgs+=(libamplsolver-dev)
if [ ! -f "$PYNUMERO_LIB" ]; then
    command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
    command -v c++ >/dev/null 2>&1 || need_pkgs+=(g++)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "solvers: apt-get install -y ${need_pkgs[*]}"
        if ! { as_root apt-get update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"; }; then
            echo "solvers: apt-get could not install ${need_pkgs[*]}" >&2
            conda_hint
            exit 3
        fi
    else
        conda_hint
        exit 3
    fi
fi

# 3. PyNumero's ASL library, built once into $PYOMO_CONFIG_DIR
build_pynumero() {
    echo "solvers: building PyNumero's ASL library into $PYOMO_CONFIG_DIR"
    "$PY" -m pyomo.contrib.pynumero.build \
        -DASL_INCLUDE_DIR="$ASL_INCLUDE_DIR" -DASL_LIBRARY="$ASL_LIBRARY"
}
[ -f "$PYNUMERO_LIB" ] || build_pynumero

# 4. the venv's activate script exports PYOMO_CONFIG_DIR (appended once); a .pth file sets it as a
#    default for every process of this venv's python (Jupyter kernels started without activating).
activate=$VENV_DIR/bin/activate
if [ -f "$activate" ] && ! grep -q 'PYOMO_CONFIG_DIR' "$activate"; then
    printf '\n# added by `make solvers`: PyNumero library for SolverFactory("cyipopt")\nexport PYOMO_CONFIG_DIR="%s"\n' \
        "$PYOMO_CONFIG_DIR" >> "$activate"
fi
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf 'import os; os.environ.setdefault("PYOMO_CONFIG_DIR", %s)\n' "'$PYOMO_CONFIG_DIR'" > "$site/dopfkit_pyomo_config.pth"

# 5. verify with a tiny model; rebuild once if a stale library is found
if ! "$PY" "$here/check_solvers.py"; then
    echo "solvers: check failed; rebuilding PyNumero once"
    build_pynumero
    "$PY" "$here/check_solvers.py"
fi
