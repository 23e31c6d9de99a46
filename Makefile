# Build, test and run the D-OPF book and its library dopfkit.
#
#   make book     set up everything, run the chapters that changed, build the HTML book (_build/html)
#   make test     set up everything, run the unit tests and check the chapter notebooks with nbval
#
# Every set-up step is stamped inside .venv; the stamps are keyed on the content of pyproject.toml and
# requirements-lock.txt, so a second run does nothing and a change of pins re-installs.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
VENV_ABS := $(abspath $(VENV))
PY := $(VENV_ABS)/bin/python
EXTRAS ?= core,notebooks,docs,hpc,dev
LOCK := requirements-lock.txt
# the lock was frozen on CPython 3.11 and some of its pins need 3.11.5+; on another Python the extras'
# pins alone are used
LOCK_PYTHON := 3.11
LOCK_PYTHON_OK := (3, 11, 5) <= sys.version_info[:3] < (3, 12)

KEY := $(shell cat pyproject.toml $(LOCK) 2>/dev/null | cksum | cut -d' ' -f1)
VENV_STAMP := $(VENV)/.stamp-venv-$(KEY)
SOLVERS_STAMP := $(VENV)/.stamp-solvers-$(KEY)
KERNEL_STAMP := $(VENV)/.stamp-kernel-$(KEY)

# PyNumero's ASL library (Ipopt for Pyomo through cyipopt) lives in the venv; every command below sees it.
export PYOMO_CONFIG_DIR := $(VENV_ABS)/pyomo
# the venv's Jupyter kernels come first, whatever a user has registered elsewhere
export JUPYTER_PATH := $(VENV_ABS)/share/jupyter$(if $(JUPYTER_PATH),:$(JUPYTER_PATH))

# Feeder data: tests/conftest.py and .ci/run find ../shared/feeders/ieee; do the same for the
# notebooks when the caller has not chosen a directory (dopfkit otherwise uses its download cache).
ifeq ($(origin DOPFKIT_FEEDERS_DIR),undefined)
  ifneq ($(wildcard ../shared/feeders/ieee),)
    export DOPFKIT_FEEDERS_DIR := $(abspath ../shared/feeders/ieee)
  endif
endif

# OpenBLAS picks its kernels by CPU (AVX2 "Haswell", AVX-512 "SkylakeX", ...), and they round
# differently: the last digits of a few solver-noise figures in the chapters move with them (chapter 3's
# SOCP set-points: Clarabel ends that solve at full or at reduced accuracy). The stored outputs were
# made with the Haswell kernels, which any CPU with AVX2 runs, so tests and notebooks use them wherever
# Linux reports AVX2 and nbval compares like with like (without AVX2 they would not run at all).
# `make benchmarks` measures the machine's own kernels; OPENBLAS_CORETYPE= (empty) lets OpenBLAS
# choose everywhere.
ifneq ($(shell grep -m1 -ow avx2 /proc/cpuinfo 2>/dev/null),)
  export OPENBLAS_CORETYPE ?= Haswell
endif
BLAS_NATIVE := $(if $(filter file,$(origin OPENBLAS_CORETYPE)),env -u OPENBLAS_CORETYPE)

NOTEBOOKS := $(sort $(wildcard chapters/*.ipynb))
# ruff reads notebooks too: the chapters' code is held to the library's rules
LINTED := dopfkit tests scripts $(wildcard benchmarks) $(NOTEBOOKS)
EXECUTED := _build/.executed
NB_STAMPS := $(patsubst chapters/%.ipynb,$(EXECUTED)/%.stamp,$(NOTEBOOKS))
LIB_SOURCES := $(shell find dopfkit -name '*.py' -o -name '*.json' 2>/dev/null)
PAPERMILL := $(PY) -m papermill --progress-bar -k python3 --cwd chapters
NB_CLEAN := $(PY) scripts/clean_nb_metadata.py
NBVAL_ARGS := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: help venv solvers kernel notebooks book html test benchmarks lint lock clean distclean

help:
	@echo "make book        venv + solvers + run changed chapters + jupyter-book build (-W -n) -> _build/html"
	@echo "make test        venv + solvers + ruff + pytest tests + nbval on chapters/*.ipynb"
	@echo "make venv        create .venv ($(PYTHON), 3.10-3.12) and install dopfkit[$(EXTRAS)] with the lock"
	@echo "make solvers     Ipopt for Pyomo: cyipopt-wheels + PyNumero ASL (Debian libamplsolver-dev)"
	@echo "make notebooks   re-execute every chapters/*.ipynb in place with papermill"
	@echo "make html        only the jupyter-book build, from the stored notebook outputs"
	@echo "make benchmarks  python -m benchmarks.powerflow, .opf, .admm, .admm_pace, .admm_ablation and .voltvar (data/results/*.json)"
	@echo "make lint        ruff check"
	@echo "make lock        re-freeze requirements-lock.txt from .venv"
	@echo "make clean       remove build outputs (make distclean also removes .venv)"

# ---------------------------------------------------------------------------------------------- venv
# $(call check_python,INTERPRETER,HINT): fail with a clear message unless it is Python 3.10-3.12
check_python = { $(1) -c 'import sys; v = sys.version_info[:2]; (3, 10) <= v <= (3, 12) or sys.exit("error: this project needs Python 3.10-3.12, but %s is Python %d.%d. $(2)" % (sys.executable, *v))' \
  || { rc=$$?; [ $$rc -eq 1 ] || echo "error: $(1) does not run (exit status $$rc). $(2)" >&2; exit 1; }; }

venv: $(VENV_STAMP)

$(VENV_STAMP):
	@# no working pip (no venv, or one whose creation was interrupted): (re)create it
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; this project needs Python 3.10-3.12 (set PYTHON=...)" >&2; exit 1; }; \
	  $(call check_python,$(PYTHON),Choose another one: make venv PYTHON=python3.11); \
	  echo "venv: creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	  $(PYTHON) -m venv --clear $(VENV); \
	fi
	@$(call check_python,$(PY),Remove it (rm -rf $(VENV)) and run: make venv PYTHON=python3.11)
	@pyver=$$($(PY) -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'); \
	if $(PY) -c 'import sys; sys.exit(0 if $(LOCK_PYTHON_OK) else 1)'; then constraints="-c $(LOCK)"; \
	else constraints=""; echo "venv: $(LOCK) was frozen on Python $(LOCK_PYTHON) (3.11.5+); on $$pyver only the extras' pins apply"; fi; \
	echo "venv: pip install $$constraints -e .[$(EXTRAS)]"; \
	$(PY) -m pip install $$constraints -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.stamp-venv-*
	@touch $@

# ------------------------------------------------------------------------------------------- solvers
solvers: $(SOLVERS_STAMP)

$(SOLVERS_STAMP): $(VENV_STAMP) scripts/setup_solvers.sh scripts/check_solvers.py
	@rc=0; bash scripts/setup_solvers.sh "$(PY)" || rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -f $(VENV)/.stamp-solvers-*; touch $@; \
	elif [ $$rc -eq 3 ]; then echo "solvers: continuing without Ipopt for Pyomo (see above)"; \
	else exit $$rc; fi

# ------------------------------------------------------------------------------------------ notebooks
# The venv's python as the "python3" kernel (papermill and Jupyter Lab use it; nbval uses the current env).
kernel: $(KERNEL_STAMP)

$(KERNEL_STAMP): $(VENV_STAMP)
	@$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" \
	  --env PYOMO_CONFIG_DIR "$(PYOMO_CONFIG_DIR)" >/dev/null
	@rm -f $(VENV)/.stamp-kernel-*
	@touch $@

# `make notebooks` re-executes every chapter; `make book` re-executes only the chapters that changed
# (or whose library code changed) since they were last run.
notebooks: $(VENV_STAMP) $(SOLVERS_STAMP) $(KERNEL_STAMP)
	@if [ -z "$(NOTEBOOKS)" ]; then echo "notebooks: no chapters/*.ipynb yet"; fi
	@for nb in $(NOTEBOOKS); do \
	  echo "notebooks: executing $$nb"; \
	  $(PAPERMILL) "$$nb" "$$nb"; \
	  $(NB_CLEAN) "$$nb"; \
	  stem=$$(basename "$$nb" .ipynb); mkdir -p $(EXECUTED); touch "$(EXECUTED)/$$stem.stamp"; \
	done

$(EXECUTED)/%.stamp: chapters/%.ipynb $(LIB_SOURCES) | $(VENV_STAMP) $(SOLVERS_STAMP) $(KERNEL_STAMP)
	@echo "notebooks: executing $<"
	@$(PAPERMILL) "$<" "$<"
	@$(NB_CLEAN) "$<"
	@mkdir -p $(@D)
	@touch $@

JB_BUILD := $(VENV_ABS)/bin/jupyter-book build . --builder html -W -n --keep-going

book: $(VENV_STAMP) $(SOLVERS_STAMP) $(NB_STAMPS)
	$(JB_BUILD)
	@echo "book: open _build/html/index.html"

# the HTML build alone, from the stored outputs (no notebook is executed)
html: $(VENV_STAMP)
	$(JB_BUILD)
	@echo "book: open _build/html/index.html"

# ----------------------------------------------------------------------------------------------- test
test: $(VENV_STAMP) $(SOLVERS_STAMP)
	@echo "test: OpenBLAS kernels $${OPENBLAS_CORETYPE:-chosen by OpenBLAS} (see the top of the Makefile)"
	$(VENV_ABS)/bin/ruff check $(LINTED)
	$(PY) -m pytest tests
	@if [ -z "$(NOTEBOOKS)" ]; then \
	  echo "nbval: no chapters/*.ipynb yet, nothing to check"; \
	else \
	  echo "$(PY) -m pytest $(NBVAL_ARGS) chapters/"; \
	  rc=0; $(PY) -m pytest $(NBVAL_ARGS) chapters/ || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "nbval: no notebook cells collected"; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	fi

# ------------------------------------------------------------------------------------------- the rest
benchmarks: $(VENV_STAMP) $(SOLVERS_STAMP)
	$(BLAS_NATIVE) $(PY) -m benchmarks.powerflow
	$(BLAS_NATIVE) $(PY) -m benchmarks.opf
	$(BLAS_NATIVE) $(PY) -m benchmarks.admm
	$(BLAS_NATIVE) $(PY) -m benchmarks.admm_pace
	$(BLAS_NATIVE) $(PY) -m benchmarks.admm_ablation
	$(BLAS_NATIVE) $(PY) -m benchmarks.voltvar

lint: $(VENV_STAMP)
	$(VENV_ABS)/bin/ruff check $(LINTED)

lock: $(VENV_STAMP)
	@{ echo '# Constraints for: pip install -c requirements-lock.txt -e ".[$(EXTRAS)]"'; \
	   echo '# The full environment behind the book (CPython $(LOCK_PYTHON), Linux x86_64), made with `make lock`'; \
	   echo '# (pip freeze --exclude-editable). Regenerate after changing the pins in pyproject.toml.'; \
	   $(PY) -m pip freeze --exclude-editable; } > $(LOCK).tmp
	@mv $(LOCK).tmp $(LOCK)
	@echo "lock: wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"

clean:
	rm -rf _build .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
