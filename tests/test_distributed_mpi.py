"""The MPI ADMM against the single-process ADMM (same iterates) and HiGHS (the independent reference),
and the partition against the feeder it cuts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_mpiexec

from dopfkit.distributed import ADMM, ADMMSettings, decompose
from dopfkit.distributed.mpi import column_parts, partition, pv_problem, run_mpi_admm, tree_order
from dopfkit.opf.standard_form import solve_highs

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SETTINGS = ADMMSettings(rho=100, tol=1e-3, max_iter=20_000)


@pytest.fixture(scope="module")
def case13():
    dec = decompose(pv_problem("ieee13"))
    return dec, ADMM(dec).solve(SETTINGS), solve_highs(dec.lp)


def test_tree_partition_covers_the_feeder_and_cuts_few_columns():
    dec = decompose(pv_problem("ieee123"))
    order = tree_order(dec)
    assert np.array_equal(np.sort(order), np.arange(dec.n_subsystems))
    # depth-first: the feeder alternates bus, line, bus from the source
    assert list(dec.kinds[order[:5]]) == ["node", "line", "node", "line", "node"]
    for n in (2, 4):
        parts = partition(dec, n)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(dec.n_subsystems))
        count, first = column_parts(dec, parts)
        # a column has a copy on some part exactly when some subsystem holds one
        assert np.array_equal(count > 0, dec.n_copies > 0)
        assert (first[count > 0] >= 0).all() and (first[count == 0] == -1).all()
        tree_cut = int((count > 1).sum())
        naive_cut = int((column_parts(dec, partition(dec, n, order="index"))[0] > 1).sum())
        # a depth-first range is a connected piece of the radial feeder: few cut columns
        assert 0 < 5 * tree_cut < naive_cut


def test_anderson_is_refused_before_any_mpi_call(case13):
    dec = case13[0]
    with pytest.raises(ValueError, match="anderson"):
        run_mpi_admm(dec, comm=None, settings=ADMMSettings(anderson=10))


@pytest.mark.mpi
def test_one_rank_reproduces_the_single_process_run(case13):
    from mpi4py import MPI
    dec, ref, _ = case13
    out = run_mpi_admm(dec, MPI.COMM_SELF, SETTINGS)
    assert out["iterations"] == ref.iterations and out["shared_columns"] == 0
    np.testing.assert_array_equal(out["z"], ref.z)


@pytest.mark.mpi
@pytest.mark.parametrize("exchange", ["shared", "full"])
def test_two_ranks_reproduce_the_single_process_run_and_highs(case13, exchange, tmp_path):
    require_mpiexec(MPIEXEC)
    dec, ref, sol = case13
    out_file = tmp_path / "out.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "dopfkit.distributed.mpi", "--feeder", "ieee13",
           "--rho", "100", "--tol", "1e-3", "--max-iter", "20000", "--exchange", exchange,
           "--json", str(out_file)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(out_file.read_text())
    assert out["ranks"] == 2 and out["converged"] and out["shared_columns"] > 0
    # the same iterates: only the summation order of the reductions differs
    assert out["iterations"] == ref.iterations
    np.testing.assert_allclose(out["z"], ref.z, rtol=0, atol=1e-10)
    assert abs(out["objective"] - ref.objective) <= 1e-10 * abs(ref.objective)
    assert sol.status == "Optimal"
    assert abs(out["objective"] - sol.objective) <= 1e-4 * abs(sol.objective)
    assert out["communication_s"] > 0 and out["compute_s"] > 0


@pytest.mark.mpi
def test_two_ranks_reproduce_the_accelerated_run(case13, tmp_path):
    """Halpern's restart test uses the residual norm over every rank, so both ranks restart together
    and the iterates are those of one process."""
    require_mpiexec(MPIEXEC)
    dec = case13[0]
    ref = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, max_iter=20_000, halpern=True, reflect=1.0))
    out_file = tmp_path / "out.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "dopfkit.distributed.mpi", "--feeder", "ieee13",
           "--rho", "100", "--tol", "1e-3", "--max-iter", "20000", "--halpern", "--json", str(out_file)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(out_file.read_text())
    assert out["iterations"] == ref.iterations < 2000
    np.testing.assert_allclose(out["z"], ref.z, rtol=0, atol=1e-10)
