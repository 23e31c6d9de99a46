"""Distributed D-OPF (chapter 7): the component-wise ADMM of Ryu, Byeon and Kim on numpy or CuPy,
its MPI version, the OPTDIST-VC feedback volt/var controller and a dual-ascent method."""
from dopfkit.distributed.admm import ADMM, ADMMResult, ADMMSettings, ADMMState
from dopfkit.distributed.decomposition import Decomposition, decompose
from dopfkit.distributed.dual import PACForm, PACResult, pac_form, solve_pac
from dopfkit.distributed.voltvar import (
           Faults,
           OptDistVC,
           centralized_optimum,
           run_closed_loop,
           volt_var_model,
)

__all__ = ["ADMM", "ADMMResult", "ADMMSettings", "ADMMState", "Decomposition", "Faults", "OptDistVC",
           "PACForm", "PACResult", "centralized_optimum", "decompose", "pac_form", "run_closed_loop",
           "solve_pac", "volt_var_model"]
