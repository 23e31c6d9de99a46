"""Array backend: numpy on the CPU, CuPy on an NVIDIA GPU, one implementation for both."""
from __future__ import annotations

import numpy as np


def gpu_available() -> bool:
    """True when CuPy is installed and sees a CUDA device (never raises)."""
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:  # ImportError, or a CUDA driver error on a machine without a GPU
        return False


def array_module(device: str = "cpu"):
    """``numpy`` for ``"cpu"``, ``cupy`` for ``"gpu"`` (with a clear error where there is none)."""
    if device == "cpu":
        return np
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError("device='gpu' needs CuPy and an NVIDIA GPU: pip install 'dopfkit[gpu]' "
                               "(cupy-cuda12x) on a machine with CUDA; use device='cpu' otherwise")
        import cupy
        return cupy
    raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")


def to_host(a) -> np.ndarray:
    """A numpy array of ``a``, copied from the GPU where it lives there."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
