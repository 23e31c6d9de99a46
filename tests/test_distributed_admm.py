"""The component-wise ADMM against HiGHS on the centralized LinDist3Flow LP (the independent reference),
and the decomposition's bookkeeping against the network it came from."""
import numpy as np
import pytest
from conftest import requires_gpu

from dopfkit.distributed import ADMM, ADMMSettings, decompose
from dopfkit.opf import pv_problem
from dopfkit.opf.standard_form import solve_highs


@pytest.fixture(scope="module")
def case13():
    p = pv_problem("ieee13")
    dec = decompose(p)
    return p, dec, solve_highs(dec.lp)


def test_decomposition_follows_the_feeder_graph(case13):
    p, dec, _ = case13
    r = p.radial
    buses = set(r.nodes.str.rsplit(".", n=1).str[0])
    parents = {r.nodes[b.parent[0]].rsplit(".", 1)[0] for b in r.branches}
    leaves = buses - parents
    assert dec.graph["nodes"] == len(buses) and dec.graph["lines"] == len(r.branches)
    assert dec.graph["leaves"] == len(leaves)
    assert dec.n_subsystems == len(buses) + len(r.branches) - len(leaves)
    assert {x.rsplit(" + leaf ", 1)[1] for x in dec.names if " + leaf " in x} == leaves
    # every copy of a column belongs to a different subsystem, and columns shared by a bus and a
    # line (voltages, flows) have at least two copies
    pairs = dec.copy_owner.astype(np.int64) * dec.lp.A.shape[1] + dec.copy_col
    assert len(np.unique(pairs)) == len(pairs)
    assert dec.n_copies[dec.lp.columns["P"]].min() >= 2


def test_local_closed_forms_hold_at_the_centralized_optimum(case13):
    """With the HiGHS optimum copied into every subsystem, A_s x_s = b_s, so the projection leaves
    it unchanged: P_s x_s + k_s = x_s. This checks the row ownership, the dense blocks and the SVD."""
    _, dec, sol = case13
    assert sol.status == "Optimal"
    x = sol.x[dec.copy_col]
    for g in dec.groups:
        xs = x[g.start:g.stop].reshape(g.size, g.n)
        proj = np.einsum("gij,gj->gi", g.P, xs) + g.k
        np.testing.assert_allclose(proj, xs, atol=1e-7)
        assert (g.rank <= g.n).all()


def _check_against_highs(dec, sol, res):
    assert res.converged
    gap = abs(res.objective - sol.objective) / abs(sol.objective)
    assert gap <= 1e-4, f"objective {res.objective} vs HiGHS {sol.objective}"
    assert res.violation <= 1e-4
    assert (res.z >= dec.lp.lower - 1e-12).all() and (res.z <= dec.lp.upper + 1e-12).all()


def test_paper_admm_matches_highs_on_ieee13(case13):
    _, dec, sol = case13
    res = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, max_iter=20_000))
    _check_against_highs(dec, sol, res)


def test_accelerated_admm_matches_highs_on_ieee13_in_fewer_iterations(case13):
    _, dec, sol = case13
    plain = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, max_iter=20_000))
    fast = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, anderson=20, max_iter=20_000))
    _check_against_highs(dec, sol, fast)
    assert fast.iterations * 5 < plain.iterations


def test_restarted_halpern_admm_matches_highs_on_ieee13_in_fewer_iterations(case13):
    _, dec, sol = case13
    plain = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, max_iter=20_000))
    fast = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-3, halpern=True, reflect=1.0, max_iter=20_000))
    _check_against_highs(dec, sol, fast)
    assert fast.iterations * 5 < plain.iterations


@pytest.fixture(scope="module")
def case123():
    dec = decompose(pv_problem("ieee123"))
    return dec, solve_highs(dec.lp)


def test_accelerated_admm_matches_highs_on_ieee123(case123):
    dec, sol = case123
    res = ADMM(dec).solve(ADMMSettings(rho=100, tol=1e-4, anderson=20, max_iter=20_000))
    _check_against_highs(dec, sol, res)


def test_single_precision_follows_double_precision(case13, case123):
    """float32 (the GPU paper's precision) on numpy, through the same code as CuPy. The paper's
    algorithm keeps its residual history (IEEE 13); restarted Halpern converges too (IEEE 123), which
    needs its restart on growth: without it rounding errors accumulate along the anchored steps and the
    residual climbs (to 7e-2 after 1800 steps) instead of reaching 1e-3."""
    dec = case13[1]
    plain = ADMMSettings(rho=100, tol=1e-3, max_iter=20_000)
    d64, d32 = ADMM(dec).solve(plain), ADMM(dec, dtype=np.float32).solve(plain)
    assert d32.dtype == "float32" and d32.converged
    assert abs(d32.iterations - d64.iterations) <= 0.05 * d64.iterations
    n = min(d32.iterations, d64.iterations)
    assert np.median(np.abs(d32.primal_residual[:n] / d64.primal_residual[:n] - 1)) < 1e-3
    dec, sol = case123
    halpern = ADMMSettings(rho=10, tol=1e-3, halpern=True, reflect=1.0, max_iter=10_000)
    h64, h32 = ADMM(dec).solve(halpern), ADMM(dec, dtype=np.float32).solve(halpern)
    assert h32.converged and h32.iterations <= 2 * h64.iterations
    assert abs(h32.objective - sol.objective) <= 1e-3 * abs(sol.objective) and h32.violation <= 1e-4


def test_zones_are_connected_subtrees_that_refine_into_components():
    """Every bus in one zone, each zone connected (a bus's parent is in its zone unless the bus
    heads it), every zone but the source's at least ``zone_buses`` buses, and each component-wise
    subsystem's rows inside one zone."""
    from dopfkit.distributed.decomposition import bus_zones, feeder_tree
    p = pv_problem("ieee123")
    components = decompose(p)
    tree = feeder_tree(p, components.lp)
    zone = bus_zones(tree, 10)
    heads = np.unique(zone)
    assert (zone[heads] == heads).all()
    inner = ~np.isin(np.arange(len(zone)), heads)
    assert (zone[tree.parent[inner]] == zone[inner]).all()
    size = np.bincount(zone)[heads]
    assert (size[heads != tree.root] >= 10).all() and size.sum() == len(tree.bus_names)
    zoned = decompose(p, components.lp, zone_buses=10)
    assert zoned.n_subsystems == len(heads)
    pairs = np.unique(np.c_[components.row_owner, zoned.row_owner], axis=0)
    assert len(pairs) == components.n_subsystems                  # one zone per component
    assert zoned.depth() < components.depth()


def test_depth_counts_hops_between_subsystems_that_share_a_column():
    """A chain of four subsystems, row i touching columns i and i+1: three hops from the first."""
    import scipy.sparse as sp

    from dopfkit.distributed.decomposition import decompose_rows
    from dopfkit.opf.standard_form import StandardFormLP
    A = sp.csr_matrix(np.eye(4, 5) + np.eye(4, 5, 1))
    lp = StandardFormLP(c=np.zeros(5), A=A, b=np.ones(4), lower=np.zeros(5), upper=np.ones(5),
                        columns={}, rows={})
    names = [f"s{i}" for i in range(4)]
    assert decompose_rows(lp, np.arange(4), names, ["node"] * 4, {"root": 0}).depth() == 3
    assert decompose_rows(lp, np.arange(4), names, ["node"] * 4, {"root": 2}).depth() == 2


@pytest.mark.parametrize("name, zone_buses", [("ieee13", 4), ("ieee123", 10)])
def test_zoned_admm_matches_highs_in_fewer_iterations(name, zone_buses, case13, case123):
    """Zones of a few buses: the same LP, the same answer, fewer hops for agreement to travel."""
    dec, sol = (case13[1], case13[2]) if name == "ieee13" else case123
    zoned = decompose(case13[0] if name == "ieee13" else pv_problem(name), dec.lp, zone_buses=zone_buses)
    s = ADMMSettings(rho=30, tol=1e-3, halpern=True, reflect=1.0, max_iter=20_000)
    res = ADMM(zoned).solve(s)
    _check_against_highs(zoned, sol, res)
    assert res.iterations < ADMM(dec).solve(s).iterations


@pytest.mark.parametrize("zone_buses, buckets", [(1, 1), (1, 3), (12, 2)])
def test_padded_batches_give_the_same_iterates(case123, zone_buses, buckets):
    """Merging the size groups into zero-padded batches (fewer kernel launches on a GPU) changes
    nothing but the order of the arithmetic; every copy sits in exactly one slot."""
    from dopfkit.distributed.decomposition import padded_groups
    dec = case123[0]
    if zone_buses > 1:
        dec = decompose(pv_problem("ieee123"), dec.lp, zone_buses=zone_buses)
    batches = padded_groups(dec.groups, buckets)
    assert len(batches) <= buckets
    slots = np.concatenate([index.ravel() for index, _, _ in batches])
    assert np.array_equal(np.sort(slots[slots >= 0]), np.arange(len(dec.copy_col)))
    for index, P, k in batches:
        pad = index < 0
        assert not P[pad].any() and not k[pad].any()
    s = ADMMSettings(rho=10, tol=1e-3, halpern=True, reflect=1.0, max_iter=5_000)
    plain, padded = ADMM(dec).solve(s), ADMM(dec, buckets=buckets).solve(s)
    assert padded.iterations == plain.iterations
    np.testing.assert_allclose(padded.z, plain.z, atol=1e-10)


def test_column_sums_by_gather_equal_bincount():
    """The GPU's global update sums the copies by a padded gather; numpy's bincount is the reference.
    Column 2 has no copy, column 4 has the most."""
    from dopfkit.distributed.admm import column_sums, copies_by_column
    copy_col = np.array([4, 0, 4, 1, 3, 4, 0, 5, 4])
    values = np.random.default_rng(3).normal(size=len(copy_col))
    index = copies_by_column(copy_col, 6)
    assert index.shape == (6, 4)
    np.testing.assert_allclose(column_sums(np.append(values, 0.0), index), np.bincount(copy_col, values, 6),
                               atol=1e-15)


@pytest.mark.parametrize("dtype, settings", [
    (np.float64, dict(rho=100.0, max_iter=75)),                 # 10 graph blocks and a 5-step tail
    (np.float64, dict(rho=10.0, halpern=True, reflect=1.0)),    # the restart test on the device
    (np.float32, dict(rho=10.0, halpern=True, reflect=1.0)),
    (np.float64, dict(rho=10.0, relax=1.6, max_iter=300)),
])
def test_device_resident_loop_gives_the_same_iterates(case13, dtype, settings):
    """graph=True keeps the control state (Halpern's anchor, restarts, the residual history) in
    arrays updated in place, the form a CUDA graph replays; on numpy it runs eagerly and must retrace
    the host loop exactly: the same iterations, residuals and answer, bit for bit."""
    _, dec, _ = case13
    admm = ADMM(dec, dtype=dtype)
    host = admm.solve(ADMMSettings(tol=1e-3, check_every=7, **settings))
    resident = admm.solve(ADMMSettings(tol=1e-3, check_every=7, graph=True, **settings))
    assert resident.iterations == host.iterations and resident.converged == host.converged
    np.testing.assert_array_equal(resident.primal_residual, host.primal_residual)
    np.testing.assert_array_equal(resident.dual_residual, host.dual_residual)
    np.testing.assert_array_equal(resident.z, host.z)
    np.testing.assert_array_equal(resident.state.lam, host.state.lam)


@pytest.mark.parametrize("reflect", [0.0, 1.0])
def test_halpern_follows_its_rules_written_plainly(reflect):
    """_Halpern keeps its point in two halves and its control in device scalars, with the restart
    test as a select (what a CUDA graph or a fused kernel needs). Against the rules written plainly
    (one vector, Python floats, an if), on a firmly nonexpansive affine map T(s) = (s + C s + b) / 2
    whose fixed point is known: the same restarts, the same iterates to rounding, and the fixed point."""
    from dopfkit.distributed.admm import _Halpern
    from dopfkit.distributed.kernels import ElementwiseSteps
    rng = np.random.default_rng(7)
    n, rho = 30, 3.0
    C = rng.normal(size=(2 * n, 2 * n))
    C *= 0.95 / np.linalg.norm(C, 2)
    b = rng.normal(size=2 * n)
    T = lambda v: (v + C @ v + b) / 2                                       # noqa: E731
    fixed = np.linalg.solve(np.eye(2 * n) - C, b)
    halpern = _Halpern(ElementwiseSteps(np), reflect=reflect)
    x, lam = rng.normal(size=n), rng.normal(size=n)
    s = np.concatenate([x, lam / rho])                                      # the plain version's point
    anchor, k, r_anchor, r_prev = None, 0, np.inf, np.inf
    restarts = ([], [])                   # (plain, dopfkit) restart steps while the residual is not noise
    for step in range(400):
        t = T(np.concatenate([x, lam / rho]))
        x, lam = halpern.update(x, lam, t[:n], t[n:] * rho, rho)
        t = (1 + reflect) * T(s) - reflect * s
        r = float(np.linalg.norm(t - s))
        if r <= 0.2 * r_anchor or r >= 2.0 * r_anchor or (r <= 0.8 * r_anchor and r > r_prev):
            anchor, k, r_anchor = s, 0, r
            restarts[0].append(step)
        r_prev = r
        s = (k + 1) / (k + 2) * t + anchor / (k + 2)
        k += 1
        if halpern.k == 1:
            restarts[1].append(step)
        np.testing.assert_allclose(np.concatenate([x, lam / rho]), s, rtol=1e-9, atol=1e-12)
        if r < 1e-10:
            break
    assert restarts[0] == restarts[1] and len(restarts[0]) > 3
    assert np.linalg.norm(s - fixed) < 1e-8 * np.linalg.norm(fixed)


def test_graph_rejects_what_it_cannot_replay(case13):
    admm = ADMM(case13[1])
    for bad in (dict(adaptive=True), dict(anderson=5), dict(timing=True)):
        with pytest.raises(ValueError, match="graph=True"):
            admm.solve(ADMMSettings(graph=True, **bad))


def test_der_scale_is_admm_on_the_rescaled_lp_and_keeps_its_answer(case123):
    """``der_scale`` = ADMM on the LP in ``x / d``, built here by hand from the standard form and
    decomposed unscaled, then mapped back; the answer still matches HiGHS on the original LP."""
    from dopfkit.distributed.decomposition import decompose_rows
    dec, sol = case123
    d = 0.3
    scaled = decompose(pv_problem("ieee123"), dec.lp, zone_buses=10, der_scale=d)
    D = np.ones(dec.lp.A.shape[1])
    for block in ("p_der", "q_der", "slack"):
        D[dec.lp.columns[block]] = d
    assert (D < 1).sum() > 0 and scaled.scale is not None
    by_hand_lp = dec.lp.scaled(D)
    np.testing.assert_allclose(by_hand_lp.A @ (sol.x / D), dec.lp.b, atol=1e-7)   # same feasible set
    by_hand = decompose_rows(by_hand_lp, scaled.row_owner, list(scaled.names), scaled.kinds, scaled.graph)
    s = ADMMSettings(rho=10, tol=1e-3, halpern=True, reflect=1.0, max_iter=20_000)
    res, ref = ADMM(scaled).solve(s), ADMM(by_hand).solve(s)
    assert res.iterations == ref.iterations
    np.testing.assert_allclose(res.z, D * ref.z, atol=1e-10)
    _check_against_highs(scaled, sol, res)
    unscaled = ADMM(decompose(pv_problem("ieee123"), dec.lp, zone_buses=10)).solve(s)
    assert unscaled.iterations != res.iterations                # the scale does change the iteration
    with pytest.raises(ValueError, match="der_scale"):
        decompose(pv_problem("ieee13"), der_scale=2.0)


def test_warm_start_from_the_previous_step_needs_fewer_iterations():
    """A time step later the load is 2 % higher: starting from the last iterates beats a cold start
    (plain ADMM; with Anderson acceleration the counts are too erratic for a warm start to show)."""
    p = pv_problem("ieee13")
    settings = ADMMSettings(rho=100, tol=1e-3, max_iter=20_000)
    first = ADMM(decompose(p)).solve(settings)
    p.load_scale = 1.02
    dec = decompose(p)
    cold = ADMM(dec).solve(settings)
    warm = ADMM(dec).solve(settings, warm_start=first.state)
    sol = solve_highs(dec.lp)
    _check_against_highs(dec, sol, warm)
    assert warm.iterations < cold.iterations


def test_quadratic_objective_goes_to_the_global_update():
    p = pv_problem("ieee13", objective="losses")
    dec = decompose(p)
    from dopfkit.opf.standard_form import solve_clarabel
    ref = solve_clarabel(dec.lp)
    res = ADMM(dec).solve(ADMMSettings(rho=10, tol=1e-4, anderson=20, max_iter=20_000))
    assert res.converged
    assert abs(res.objective - ref.objective) <= 1e-4 * abs(ref.objective) + 1e-7


def test_inconsistent_local_equations_are_named():
    import scipy.sparse as sp

    from dopfkit.distributed.decomposition import decompose_rows
    from dopfkit.opf.standard_form import StandardFormLP
    # x0 + x1 = 1 and x0 + x1 = 2 in one subsystem: no local point exists
    lp = StandardFormLP(c=np.zeros(2), A=sp.csr_matrix(np.ones((2, 2))), b=np.array([1.0, 2.0]),
                        lower=np.zeros(2), upper=np.ones(2), columns={}, rows={})
    with pytest.raises(ValueError, match="bus 7"):
        decompose_rows(lp, np.array([0, 0]), ["bus 7"], ["node"])


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, buckets", [(np.float64, None), (np.float32, None), (np.float64, 3)])
def test_cupy_path_matches_numpy(case13, dtype, buckets):
    _, dec, sol = case13
    settings = ADMMSettings(rho=100, tol=1e-3, max_iter=20_000)
    cpu = ADMM(dec).solve(settings)
    gpu = ADMM(dec, device="gpu", dtype=dtype, buckets=buckets).solve(settings)
    assert gpu.converged and gpu.device == "gpu"
    if dtype == np.float64:
        assert gpu.iterations == cpu.iterations
        np.testing.assert_allclose(gpu.z, cpu.z, atol=1e-8)
    else:   # single precision: the paper reports near-identical residual histories
        assert abs(gpu.iterations - cpu.iterations) <= 0.05 * cpu.iterations
        assert abs(gpu.objective - sol.objective) <= 1e-3 * abs(sol.objective)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("settings", [dict(rho=100.0, max_iter=20_000),
                                      dict(rho=10.0, halpern=True, reflect=1.0, max_iter=20_000)])
def test_cuda_graph_replays_the_eager_gpu_loop(case13, settings):
    """One CUDA graph per 50 iterations against the eager CuPy loop (the same kernels on another
    stream: equal up to cuBLAS's per-stream workspace) and against numpy."""
    _, dec, sol = case13
    s = dict(tol=1e-3, check_every=50, **settings)
    gpu = ADMM(dec, device="gpu", buckets=3)
    eager = gpu.solve(ADMMSettings(**s))
    graph = gpu.solve(ADMMSettings(graph=True, **s))
    cpu = ADMM(dec).solve(ADMMSettings(**s))
    assert graph.converged and graph.iterations == eager.iterations == cpu.iterations
    np.testing.assert_allclose(graph.z, eager.z, atol=1e-10)
    np.testing.assert_allclose(graph.z, cpu.z, atol=1e-8)
    assert abs(graph.objective - sol.objective) <= 1e-4 * abs(sol.objective)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, settings", [(np.float64, dict(rho=100.0)),
                                             (np.float64, dict(rho=100.0, relax=1.6)),
                                             (np.float64, dict(rho=10.0, halpern=True, reflect=1.0)),
                                             (np.float32, dict(rho=10.0, halpern=True, reflect=1.0))])
def test_fused_kernels_follow_the_unfused_gpu_loop(case13, dtype, settings):
    """fuse=True compiles each elementwise step into one kernel (cupy.fuse): the iterates of the same
    steps run one operation at a time, eagerly and replayed as a CUDA graph, up to the rounding the
    compiler saves by contracting a * b + c into one FMA inside a fused kernel."""
    _, dec, sol = case13
    s = dict(tol=1e-3, max_iter=20_000, check_every=50, **settings)
    gpu = ADMM(dec, device="gpu", dtype=dtype, buckets=3)
    plain = gpu.solve(ADMMSettings(**s))
    for graph in (False, True):
        fused = gpu.solve(ADMMSettings(fuse=True, graph=graph, **s))
        assert fused.converged and fused.dtype == np.dtype(dtype).name and fused.state.x.dtype == dtype
        if dtype == np.float64:
            assert fused.iterations == plain.iterations
            np.testing.assert_allclose(fused.z, plain.z, atol=1e-8)
            assert abs(fused.objective - sol.objective) <= 1e-4 * abs(sol.objective)
        else:   # float32 rounding moves the crossing by a few iterations: one check_every period
            assert abs(fused.iterations - plain.iterations) <= max(0.05 * plain.iterations, s["check_every"])
            assert abs(fused.objective - sol.objective) <= 1e-3 * abs(sol.objective)


def test_one_block_projection_is_the_orthogonal_projection(case13):
    """benchmarks.admm_pace's sparse KKT projection against the pseudo-inverse on IEEE 13."""
    from benchmarks.admm_pace import projector
    lp = case13[1].lp
    A = lp.A.toarray()
    y = np.random.default_rng(0).normal(size=A.shape[1])
    reference = y - np.linalg.pinv(A) @ (A @ y - lp.b)
    np.testing.assert_allclose(projector(lp.A, lp.b)(y), reference, atol=1e-8)
