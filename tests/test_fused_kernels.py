"""Chapter 7's fused CuPy kernels, traced by CuPy and compiled by NVRTC on a machine without a GPU.

On its first call on a GPU, ``cupy.fuse`` traces a step of :mod:`dopfkit.distributed.kernels` into
CUDA source for the argument types it is given, and NVRTC compiles that source. Neither needs a
device, so this module does both here, for every argument signature the solver passes (recorded from
numpy solves of IEEE 13 in float32 and float64, plain, over-relaxed and with Halpern's iteration):

* CuPy's fusion traces every step (where it cannot, ``cupy.fuse`` falls back without a word to its
  experimental fusion, which is not what the GPU benchmark means to time);
* a kernel whose arguments are all float32 computes in float32 (a Python float in a step would
  promote it to float64, which costs a factor of 2 to 64 on a GPU);
* every kernel compiles for the GPUs the book targets: compute capability 7.5 (Colab's T4) and 9.0
  (the H100/H200 of the GPU benchmark).

What it cannot check is the run; ``test_distributed_admm.py``'s GPU tests do that. Tracing and
code generation go through CuPy's internals, so the module runs on the CuPy the lock pins and skips
on another version; its device pointer is null and never dereferenced.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from dopfkit.distributed import ADMM, ADMMSettings, decompose, kernels
from dopfkit.opf import pv_problem

cupy = pytest.importorskip("cupy", reason="the compile check needs CuPy (pip install -e '.[dev]')")
CUPY_PIN = "14.2.0"
if cupy.__version__ != CUPY_PIN:
    pytest.skip(f"reads CuPy {CUPY_PIN}'s internals; this is CuPy {cupy.__version__}",
                allow_module_level=True)

from cupy._core import _carray, _kernel, _reduction, _scalar  # noqa: E402
from cupy._core import core as _core  # noqa: E402
from cupy._core import fusion as _fusion  # noqa: E402
from cupy.cuda import memory, nvrtc  # noqa: E402

try:
    nvrtc.getVersion()
except Exception as e:  # noqa: BLE001  (the library is found at run time, or not)
    pytest.skip(f"NVRTC is not loadable ({e}); pip install nvidia-cuda-nvrtc-cu12",
                allow_module_level=True)

ARCHES = ("compute_75", "compute_90")
# On CuPy these arguments are 0-d device arrays (a reduction's result and what is computed from it on
# the device, never read back to the host); numpy hands them over as numpy scalars.
DEVICE_SCALARS = {"halpern_control": (0,), "halpern_point": (1, 5, 6)}
# cupy._core._kernel's argument kinds (its _ArgKind enum)
_NDARRAY, _INDEXER, _SCALAR = 1, 2, 3


def _kind(a):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return ("array", a.dtype.str, a.ndim)
    if isinstance(a, np.generic):
        return ("scalar", a.dtype.str)
    return ("python", type(a).__name__)


@pytest.fixture(scope="module")
def signatures():
    """``{step name: {argument kinds}}`` seen in numpy solves that take every fused path."""
    seen: dict[str, set] = {}

    class Recording(kernels.ElementwiseSteps):
        def __init__(self, xp, fuse=False):
            super().__init__(xp, fuse)
            for step in kernels.STEPS:
                setattr(self, step.__name__, self._recorded(step.__name__, getattr(self, step.__name__)))

        @staticmethod
        def _recorded(name, run):
            def step(*args):
                seen.setdefault(name, set()).add(tuple(_kind(a) for a in args))
                return run(*args)
            return step

    dec = decompose(pv_problem("ieee13"))
    variants = [dict(rho=100.0), dict(rho=100.0, relax=1.6),
                dict(rho=10.0, halpern=True, reflect=1.0, graph=True, check_every=50),
                dict(rho=10.0, halpern=True)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dopfkit.distributed.admm.ElementwiseSteps", Recording)
        for dtype in (np.float64, np.float32):
            for v in variants:
                ADMM(dec, dtype=dtype).solve(ADMMSettings(tol=1e-3, max_iter=200, **v))
    return seen


def _null_array(ndim, dtype):
    """A CuPy array header over a null device pointer: what tracing and code generation read."""
    dtype = np.dtype(dtype)
    mem = memory.UnownedMemory(0, 3 ** ndim * dtype.itemsize, None, 0)
    return cupy.ndarray((3,) * ndim, dtype=dtype, memptr=memory.MemoryPointer(mem, 0))


def _arguments(step, signature):
    args = []
    for i, kind in enumerate(signature):
        if kind is None:
            args.append(None)
        elif kind[0] == "array" or i in DEVICE_SCALARS.get(step.__name__, ()):
            args.append(_null_array(kind[2] if kind[0] == "array" else 0, kind[1]))
        elif kind[0] == "scalar":
            args.append(np.dtype(kind[1]).type(0.5))
        else:
            args.append({"float": 0.5, "int": 1, "bool": True}[kind[1]])
    return args


def _trace(step, args):
    """What ``cupy.fuse`` does on a first call: CuPy's fusion of the step for these argument types
    (an ElementwiseKernel, or a ReductionKernel for a step with a sum); unlike ``cupy.fuse``, an
    error is raised, not swallowed."""
    history = _fusion._FusionHistory()
    local = _fusion._thread_local
    local.history, local.is_old_fusing = history, True
    try:
        return history.get_fusion(functools.partial(step, cupy), args, f"admm_{step.__name__}")[0]
    finally:
        local.history, local.is_old_fusing = None, False


def _arg_info(a):
    if isinstance(a, cupy.ndarray):
        return _kernel._ArgInfo(_NDARRAY, cupy.ndarray, a.dtype, a.ndim, True, True)
    return _kernel._ArgInfo(_SCALAR, _scalar.CScalar, np.asarray(a).dtype, 0, True, True)


def _cuda_source(kernel, args):
    """The CUDA source CuPy compiles at the kernel's first launch (a reduction with 512 threads per
    block, CuPy's default, over a 1-d input)."""
    inputs = [a for a in args if a is not None]
    ndim = max(a.ndim for a in inputs if isinstance(a, cupy.ndarray))
    reduction = isinstance(kernel, _reduction.ReductionKernel)
    outputs = [_null_array(0 if reduction else ndim, p.dtype) for p in kernel.out_params]
    infos = tuple(_arg_info(a) for a in inputs + outputs)
    if reduction:
        infos += (_indexer(ndim), _indexer(0), _arg_info(np.int32(1)))   # _in_ind, _out_ind, _block_stride
        index_type = _kernel._TypeMap((("IndexT", np.dtype(np.int32)),))
        code = _reduction._ReductionKernel_get_cached_function_code(
            kernel.nin, kernel.nout, kernel._params, infos, index_type,
            kernel.name, 512, kernel.reduce_type, kernel.identity, kernel.map_expr, kernel.reduce_expr,
            kernel.post_map_expr, kernel.preamble, ())
    else:
        code = _kernel._get_elementwise_kernel_code(
            infos + (_indexer(ndim),), _kernel._TypeMap(()), kernel.params, kernel.operation, kernel.name,
            kernel.preamble)
    return "".join(f"#include <{h}>\n" for h in _core._cupy_header_list) + code


def _indexer(ndim):
    return _kernel._ArgInfo(_INDEXER, _carray.Indexer, None, ndim, True, True)


def _compile(source, arch):
    program = nvrtc.createProgram(source, "admm_step.cu", [], [])
    try:
        nvrtc.compileProgram(program, [*_core.assemble_cupy_compiler_options(()), f"-arch={arch}"])
    except nvrtc.NVRTCError as e:
        raise AssertionError(f"NVRTC ({arch}): {e}\n{nvrtc.getProgramLog(program)}") from e
    return nvrtc.getPTX(program)


def _cases(signatures):
    for step in kernels.STEPS:
        for signature in sorted(signatures.get(step.__name__, ()), key=repr):
            yield step, signature


def test_every_step_was_recorded(signatures):
    assert set(signatures) == {s.__name__ for s in kernels.STEPS}
    for name, positions in DEVICE_SCALARS.items():   # the table above still matches the solver
        for signature in signatures[name]:
            assert all(signature[i][0] == "scalar" for i in positions), (name, signature)


def test_fused_steps_trace_and_keep_float32(signatures):
    float32 = np.dtype(np.float32)
    for step, signature in _cases(signatures):
        args = _arguments(step, signature)
        kernel = _trace(step, args)
        assert isinstance(kernel, (_kernel.ElementwiseKernel, _reduction.ReductionKernel))
        # the iterates stay float32 (only Halpern's control scalars are float64, by design) ...
        if float32 in {a.dtype for a in args if isinstance(a, cupy.ndarray) and a.ndim} \
                and step is not kernels.halpern_control:
            assert {p.dtype for p in kernel.out_params} <= {float32}, step.__name__
        # ... and a step given nothing but float32 computes in float32
        if {a.dtype for a in args if isinstance(a, (cupy.ndarray, np.generic))} == {float32}:
            code = kernel.preamble if isinstance(kernel, _reduction.ReductionKernel) else kernel.operation
            assert "double" not in code, f"{step.__name__} {signature}: float32 promoted to float64"


@pytest.mark.parametrize("arch", ARCHES)
def test_fused_kernels_compile(signatures, arch):
    sources = {_cuda_source(_trace(step, args), args)
               for step, signature in _cases(signatures)
               for args in [_arguments(step, signature)]}
    assert len(sources) >= len(kernels.STEPS)
    for source in sources:
        assert b".entry" in _compile(source, arch)
