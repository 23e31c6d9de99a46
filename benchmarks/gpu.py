"""GPU benchmark: the CuPy paths beside their CPU peers, all measured in one run on the GPU machine.
Writes data/results/gpu.json.

    python -m benchmarks.gpu [--feeders ...] [--admm-feeders ...] [--out PATH] [--device gpu|cpu]
                             [--part all|cpu|device] [--merge CPU_JSON DEVICE_JSON]

* Batched power flow (chapter 2): 1000 load scenarios per feeder, dopfkit's batch on the GPU (float64)
  against OpenDSS solving them one after another (warm-started: its fastest sequential mode) and
  dopfkit's CPU batch on the same machine (``dopfkit_device``: the GPU batch; ``dopfkit_cpu``: numpy),
  with the largest |V_gpu - V_cpu|, also with each bus's common mode removed. Target: GPU throughput
  at least 10 times OpenDSS's.
* ADMM (chapter 7): the restarted Halpern iteration to convergence on numpy (one BLAS thread) and on
  CuPy in float64 and float32, each against HiGHS on the centralized LP; and the paper's algorithm over
  a fixed number of iterations for the time per iteration (``numpy_float64``, ``device_float64``,
  ``device_float32``, ``device_float64_padded``: size groups merged into a few padded batches;
  ``device_float64_graph``: the padded batches with the loop kept on the device and every 50
  iterations replayed as one CUDA graph; ``device_float64_graph_fused``: the same with each elementwise
  step compiled into one kernel by cupy.fuse, against ``_graph`` the measure of whether fusing pays);
  and the zoned decomposition (chapter 7) on numpy and the GPU.
  Target: IEEE 8500's total time on the GPU at least 20 times below the CPU run.

On IEEE 8500 only the numpy peer and the padded, graph and fused GPU runs go to convergence; the others are
timed per iteration. ``--part cpu`` and ``--part device`` split a run into the numpy peers and the rest,
so that a machine with many cores runs them side by side (``scripts/device_check.sh`` does), and
``--merge`` joins the halves.

``--device cpu`` runs the same code with numpy in place of CuPy (a dry run on a machine without a
GPU: nothing it measures is a GPU figure, and the record says so). ``scripts/device_check.sh`` runs
this on a lent GPU machine.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")          # numpy on one core, as in benchmarks.admm

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import dopfkit as dk  # noqa: E402
from benchmarks import write_results  # noqa: E402
from benchmarks.admm import HALPERN_RHO, centralized, run  # noqa: E402
from benchmarks.powerflow import dopfkit_batch, machine, opendss_sequential  # noqa: E402
from dopfkit.backend import gpu_available, to_host  # noqa: E402
from dopfkit.distributed import ADMM, ADMMSettings, decompose  # noqa: E402
from dopfkit.opendss import without_common_mode  # noqa: E402
from dopfkit.opf import pv_problem  # noqa: E402
from dopfkit.powerflow import ZBusSolver  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "gpu.json"
FEEDERS = ["ieee13", "ieee34", "ieee37", "ieee123", "ieee8500", "ieee9500"]
ADMM_FEEDERS = ["ieee13", "ieee123", "ieee8500"]
# (buses per zone, rho, der_scale): admm.json's fewest iterations within 1e-4 of HiGHS for the zoned
# runs (IEEE 13's: the dry-run test's case)
ZONES = {"ieee13": (4, 10.0, 0.3), "ieee123": (12, 10.0, 1.0), "ieee8500": (70, 5.0, 0.3)}
TOL, MAX_ITER, FIXED_ITER = 1e-3, 60_000, 2_000
BUCKETS = 4              # "_padded": the size groups merged into 4 zero-padded batches (fewer launches)
# above LARGE columns (IEEE 8500) only these runs go to convergence, the others are timed per iteration:
# a lent GPU has minutes, and float32 does not converge there (chapter 7)
LARGE = 10_000
CONVERGE_LARGE = ("numpy_float64", "device_float64_padded", "device_float64_graph",
                  "device_float64_graph_fused")


def _runs(device: str) -> tuple:
    """(label, device, dtype, buckets, loop settings) of every ADMM run; the first is the CPU peer."""
    graph, fused = {"graph": True}, {"graph": True, "fuse": True}
    return (("numpy_float64", "cpu", np.float64, None, {}),
            ("device_float64", device, np.float64, None, {}),
            ("device_float32", device, np.float32, None, {}),
            ("device_float64_padded", device, np.float64, BUCKETS, {}),
            ("device_float64_graph", device, np.float64, BUCKETS, graph),
            ("device_float64_graph_fused", device, np.float64, BUCKETS, fused))


def _guarded(untried: bool, measure, /, *args, **kwargs):
    """``measure(*args, **kwargs)``; for a run of what no GPU has run yet (CUDA graphs, fused kernels),
    its error as the record where it fails, so that a first try on a lent GPU cannot cost the rest of
    the run."""
    if not untried:
        return measure(*args, **kwargs)
    try:
        return measure(*args, **kwargs)
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"


def _halpern_and_paper(admm: ADMM, reference: float, halpern: dict | None, fixed: dict,
                       loop: dict) -> dict:
    """The paper's step timed over a fixed number of iterations, and the Halpern run to convergence
    (``halpern`` None: not run, to keep a large feeder within the device's time)."""
    paper = admm.solve(ADMMSettings(**fixed, **loop))
    rec = {"paper_per_iteration_ms": 1e3 * paper.times["iteration"]}
    if halpern is not None:
        rec["halpern"] = run(admm, reference, **halpern, **loop)
    return rec


def _loop(device: str, loop: dict) -> dict:
    """A run's loop settings: ``loop`` (graph, fuse), and on a GPU the residuals read back every 50
    iterations (one sync each); the dry run keeps numpy's every-iteration check, so that its iterates
    can be compared with numpy's one for one."""
    return {**({} if device == "cpu" else {"check_every": 50}), **loop}


def bench_powerflow(name: str, device: str, batch: np.ndarray) -> dict:
    net = dk.load_feeder(name)
    rec = {"nodes": net.n, "scenarios": len(batch),
           "opendss_sequential": 1.0 / opendss_sequential(batch)}
    cpu = ZBusSolver(net)
    rec["dopfkit_cpu"] = dopfkit_batch(cpu, batch)
    dev = ZBusSolver(net, device=device, linear="dense")     # the GPU's path, also in a dry run
    dev.solve(batch[:8])                                   # warm-up: CUDA context, kernels, schedule
    rec["dopfkit_device"] = dopfkit_batch(dev, batch, chunk=len(batch))
    v_cpu, v_dev = (solver.solve(batch[:50], raise_on_fail=False).V for solver in (cpu, dev))
    difference = v_cpu - to_host(v_dev)
    rec["max_abs_difference_pu"] = float(np.abs(difference).max())
    # IEEE 9500's floating 480 V buses: the common mode rests on rounding (chapter 2's audit)
    rec["max_differential_difference_pu"] = float(np.abs(without_common_mode(difference, net.nodes)).max())
    rec["ratio_to_opendss"] = rec["dopfkit_device"] / rec["opendss_sequential"]
    return rec


def bench_admm(name: str, device: str, part: str = "all") -> dict:
    """``part``: "all" runs, "cpu" only the numpy peers, "device" only the GPU runs (the two halves
    run side by side on a lent machine, :func:`merge` joins them)."""
    runs = [r for r in _runs(device) if part == "all" or r[0].startswith("numpy") == (part == "cpu")]
    problem = pv_problem(name)
    dec = decompose(problem)
    lp = dec.lp
    highs = centralized(lp)
    large = lp.A.shape[1] > LARGE
    rec = {"columns": lp.A.shape[1], "subsystems": dec.n_subsystems, "highs_objective": highs.objective,
           "halpern_rho": HALPERN_RHO[name]}
    halpern = {"rho": HALPERN_RHO[name], "tol": TOL, "halpern": True, "reflect": 1.0, "max_iter": MAX_ITER}
    fixed = {"rho": 100.0, "tol": 0.0, "max_iter": FIXED_ITER}
    for label, dev, dtype, buckets, loop in runs:
        admm = ADMM(dec, device=dev, dtype=dtype, buckets=buckets)
        # CUDA context and kernel caches; with fuse, every fused kernel of both loops compiles here, not
        # inside a timed solve (20 iterations < check_every: no graph is captured)
        for warm in ({}, {"halpern": True, "reflect": 1.0}):
            admm.solve(ADMMSettings(rho=100.0, max_iter=20, tol=0.0, **warm, **_loop(dev, loop)))
        converge = not large or label in CONVERGE_LARGE
        rec[label] = r = _guarded(bool(loop), _halpern_and_paper, admm, highs.objective,
                                  halpern if converge else None, fixed, _loop(dev, loop))
        print(f"  {name} {label}: " + (r if isinstance(r, str) else
              (f"Halpern {r['halpern']['iterations']} iterations, {r['halpern']['total_s']:.2f} s; "
               if "halpern" in r else "") + f"paper's step {r['paper_per_iteration_ms']:.3f} ms"),
              flush=True)
    if name in ZONES:                                      # fewer, larger, dense blocks
        k, rho, der_scale = ZONES[name]
        zoned = decompose(problem, lp, zone_buses=k, der_scale=der_scale)
        zones = rec["zones"] = {"zone_buses": k, "der_scale": der_scale, "subsystems": zoned.n_subsystems,
                                "size_groups": len(zoned.groups)}
        for label, dev, dtype, buckets, loop in runs:
            if dtype == np.float32:
                continue
            admm = ADMM(zoned, device=dev, buckets=buckets)
            zones[label] = r = _guarded(bool(loop), run, admm, highs.objective, rho=rho, tol=TOL,
                                        halpern=True, reflect=1.0, max_iter=MAX_ITER, **_loop(dev, loop))
            print(f"  {name} zones of {k}, {label}: " + (r if isinstance(r, str) else
                  f"{r['iterations']} iterations, {r['total_s']:.2f} s"), flush=True)
    return add_speedups(rec)


def add_speedups(rec: dict) -> dict:
    """Total time of the numpy peer over each GPU run's, where both are in the record."""
    def ratios(group: dict, total):
        base = total(group.get("numpy_float64"))
        return {k: base / total(v) for k, v in group.items()
                if k.startswith("device_") and base is not None and total(v) is not None}
    rec["speedup_total_halpern"] = ratios(
        rec, lambda r: r["halpern"]["total_s"] if isinstance(r, dict) and "halpern" in r else None)
    if "zones" in rec:
        rec["zones"]["speedup_total"] = ratios(
            rec["zones"], lambda r: r["total_s"] if isinstance(r, dict) and "total_s" in r else None)
    return rec


def merge(cpu: dict, device: dict) -> dict:
    """One record from the two halves of a run (``--part cpu`` and ``--part device``), speedups
    recomputed; the machine and settings are the device half's."""
    out = {**device, "parts": "cpu and device halves run side by side on this machine"}
    for name, rec in cpu.get("admm", {}).items():
        both = out["admm"].setdefault(name, {})
        for key, value in rec.items():
            if isinstance(value, dict) and isinstance(both.get(key), dict):
                both[key] = {**both[key], **value}
            else:
                both.setdefault(key, value)
        add_speedups(both)
    return out



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feeders", nargs="*", default=FEEDERS)
    ap.add_argument("--admm-feeders", nargs="*", default=ADMM_FEEDERS)
    ap.add_argument("--scenarios", type=int, default=1000)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--part", choices=("all", "cpu", "device"), default="all",
                    help="cpu: only ADMM's numpy peers; device: the rest (run both side by side)")
    ap.add_argument("--merge", nargs=2, type=Path, metavar=("CPU_JSON", "DEVICE_JSON"),
                    help="join the two halves into --out and exit")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.merge:
        cpu, device = (json.loads(p.read_text()) for p in args.merge)
        write_results(merge(cpu, device), args.out)
        print(f"wrote {args.out}")
        return json.loads(args.out.read_text())
    if args.device == "gpu" and not gpu_available():
        raise SystemExit("benchmarks.gpu: no CUDA GPU with CuPy here; use --device cpu for a dry run")
    batch = np.random.default_rng(2024).uniform(0.5, 1.2, args.scenarios)
    results = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": args.device, "part": args.part,
               "settings": {"scenarios": args.scenarios, "admm_tol": TOL, "admm_max_iter": MAX_ITER,
                            "paper_fixed_iterations": FIXED_ITER, "numpy_threads": 1,
                            "converge_above_columns": {"columns": LARGE, "runs": list(CONVERGE_LARGE)}},
               "powerflow": {}, "admm": {}}
    for name in args.feeders if args.part != "cpu" else []:
        t = time.perf_counter()
        results["powerflow"][name] = rec = bench_powerflow(name, args.device, batch)
        print(f"{name}: {rec['dopfkit_device']:.0f} scenarios/s on {args.device}, CPU batch "
              f"{rec['dopfkit_cpu']:.0f}, OpenDSS {rec['opendss_sequential']:.0f} "
              f"({rec['ratio_to_opendss']:.1f}x OpenDSS; {time.perf_counter() - t:.0f} s)", flush=True)
        write_results(results, args.out)                   # keep what is done if the run is cut off
    for name in args.admm_feeders:
        results["admm"][name] = bench_admm(name, args.device, args.part)
        write_results(results, args.out)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
