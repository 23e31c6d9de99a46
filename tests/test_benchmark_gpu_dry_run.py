"""The GPU benchmark's dry run (numpy in place of CuPy): a lent GPU machine has minutes to spare, so
the script it runs (scripts/device_check.sh -> benchmarks.gpu) must be known to work before it goes."""
import json

from benchmarks import gpu


def test_gpu_benchmark_dry_run_writes_a_consistent_record(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--device", "cpu", "--feeders", "ieee13", "--admm-feeders", "ieee13", "--scenarios", "40",
              "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["device"] == "cpu"
    pf = rec["powerflow"]["ieee13"]
    # the dense path against the sparse LU: rounding alone (test_dense_linear_path_reproduces_opendss)
    assert pf["max_abs_difference_pu"] < 1e-7 and pf["opendss_sequential"] > 0
    assert pf["max_differential_difference_pu"] <= 2 * pf["max_abs_difference_pu"]
    admm = rec["admm"]["ieee13"]
    for variant in ("numpy_float64", "device_float64", "device_float32", "device_float64_graph",
                    "device_float64_graph_fused"):
        run = admm[variant]["halpern"]
        assert run["converged"] and run["gap_rel"] <= 1e-4 and run["violation"] <= 1e-4
    for variant in ("device_float64", "device_float64_graph", "device_float64_graph_fused"):
        # the device-resident loop included
        assert admm[variant]["halpern"]["iterations"] == admm["numpy_float64"]["halpern"]["iterations"]
    zones = admm["zones"]                                   # zoned, DER columns scaled, padded batches
    for variant in ("numpy_float64", "device_float64", "device_float64_padded", "device_float64_graph",
                    "device_float64_graph_fused"):
        run = zones[variant]
        assert run["converged"] and run["gap_rel"] <= 1e-4 and run["violation"] <= 1e-4
        assert run["iterations"] == zones["numpy_float64"]["iterations"]
    assert set(zones["speedup_total"]) == {"device_float64", "device_float64_padded", "device_float64_graph",
                                           "device_float64_graph_fused"}


def test_gpu_benchmark_halves_merge_into_one_record(tmp_path):
    """device_check.sh runs the numpy peers and the GPU runs side by side, then merges them."""
    common = ["--device", "cpu", "--feeders", "ieee13", "--admm-feeders", "ieee13", "--scenarios", "20"]
    gpu.main([*common, "--part", "cpu", "--out", str(tmp_path / "cpu.json")])
    gpu.main([*common, "--part", "device", "--out", str(tmp_path / "device.json")])
    halves = [json.loads((tmp_path / f).read_text()) for f in ("cpu.json", "device.json")]
    assert halves[0]["powerflow"] == {} and "ieee13" in halves[1]["powerflow"]
    assert set(halves[0]["admm"]["ieee13"]["zones"]) >= {"numpy_float64"}
    assert "numpy_float64" not in halves[1]["admm"]["ieee13"]
    gpu.main(["--merge", str(tmp_path / "cpu.json"), str(tmp_path / "device.json"),
              "--out", str(tmp_path / "gpu.json")])
    admm = json.loads((tmp_path / "gpu.json").read_text())["admm"]["ieee13"]
    numpy_run = admm["numpy_float64"]["halpern"]
    for label in ("device_float64", "device_float64_padded", "device_float64_graph"):
        run = admm[label]["halpern"]
        assert run["iterations"] == numpy_run["iterations"]
        assert admm["speedup_total_halpern"][label] == numpy_run["total_s"] / run["total_s"]
    zones = admm["zones"]
    assert {"numpy_float64", "device_float64_graph"} <= set(zones)
    assert zones["speedup_total"]["device_float64_graph"] == \
        zones["numpy_float64"]["total_s"] / zones["device_float64_graph"]["total_s"]


def test_large_feeder_converges_only_the_named_runs(monkeypatch):
    """Above LARGE columns the float32 and unpadded GPU runs are timed per iteration only."""
    monkeypatch.setattr(gpu, "LARGE", 0)
    monkeypatch.setattr(gpu, "ZONES", {})
    rec = gpu.bench_admm("ieee13", "cpu")
    assert "halpern" not in rec["device_float32"] and rec["device_float32"]["paper_per_iteration_ms"] > 0
    assert set(rec["speedup_total_halpern"]) == {"device_float64_padded", "device_float64_graph",
                                                 "device_float64_graph_fused"}
