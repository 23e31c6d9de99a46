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
    assert pf["max_abs_difference_pu"] < 1e-9 and pf["opendss_sequential"] > 0
    admm = rec["admm"]["ieee13"]
    for variant in ("numpy_float64", "device_float64", "device_float32", "device_float64_graph"):
        run = admm[variant]["halpern"]
        assert run["converged"] and run["gap_rel"] <= 1e-4 and run["violation"] <= 1e-4
    for variant in ("device_float64", "device_float64_graph"):    # the device-resident loop included
        assert admm[variant]["halpern"]["iterations"] == admm["numpy_float64"]["halpern"]["iterations"]
    zones = admm["zones"]                                   # zoned, DER columns scaled, padded batches
    for variant in ("numpy_float64", "device_float64", "device_float64_padded", "device_float64_graph"):
        run = zones[variant]
        assert run["converged"] and run["gap_rel"] <= 1e-4 and run["violation"] <= 1e-4
        assert run["iterations"] == zones["numpy_float64"]["iterations"]
    assert set(zones["speedup_total"]) == {"device_float64", "device_float64_padded", "device_float64_graph"}
