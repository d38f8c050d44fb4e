"""scripts/benchmark.py runs end to end on tiny settings and writes the JSON and markdown it documents."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_overhead_section_writes_interleaved_ratios(tmp_path):
    bench = load_benchmark()
    # on the CPU: the section's plumbing (a CUDA window of a few ms is too noisy for the ratio bounds below)
    bench.main(["--quick", "overhead", "--iters", "2", "debug=smoke", "device=cpu", "data.num_train=16",
                "trainer.max_epochs=4", "--out", str(tmp_path)])  # fmt: skip
    out = json.loads((tmp_path / "benchmark.json").read_text())["overhead"]
    assert out["epochs"] == 4 and out["batch"] == 4 and out["model"] == "unet"
    assert [r["epoch"] for r in out["epochs_measured"]] == [1, 2, 3, 4]
    assert all("bare" in r for r in out["epochs_measured"][:-1]) and "bare" not in out["epochs_measured"][-1]
    for key in ("overhead_ratio", "end_to_end_ratio", "end_to_end_ratio_first_epoch"):
        assert 0.1 < out[key] < 10, (key, out[key])
    assert out["end_to_end_ratio"] <= out["overhead_ratio"]  # wall time includes the loader waits
    assert "overhead_ratio" in (tmp_path / "benchmark.md").read_text()


def test_startup_time_script_finds_every_phase():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "startup_time.py"), "--runs", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for phase in ("segtrain --help:", "build data sets", "build model", "dry validation pass", "FIRST STEP starts",
                  "first training step of debug=smoke starts at"):  # fmt: skip
        assert phase in proc.stdout, phase


def test_profiler_chatter_is_held_back_and_other_lines_pass(capfd):
    import os

    with load_benchmark().kineto_quiet():
        os.write(2, b"USDT:2026-11-27 18:58:33 2804:2804 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-11-27 18:58:34 2804:2804 DeviceProperties.cpp:56] gpuGetDeviceCount failed\n")
        os.write(2, b"a real warning from a kernel\n")
    err = capfd.readouterr().err
    assert "a real warning from a kernel" in err and "profiler_start" not in err and "gpuGetDeviceCount" not in err


def test_compare_networks_script_trains_each_for_its_budget(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_networks", ROOT / "scripts" / "compare_networks.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    args = ["--budget", "1", "--networks", "unet,segformer-b0", "--out", str(tmp_path), "debug=smoke", "device=cpu"]
    result = compare.main([*args, "data.num_val=4"])
    rows = result["runs"]["synthetic"]
    assert list(rows) == ["unet", "segformer-b0"]
    for r in rows.values():
        assert 0 <= r["miou"] <= 1 and r["steps"] >= 1 and r["seconds"] >= 1 and r["train_images_per_sec"] > 0
    assert "| segformer-b0 |" in (tmp_path / "compare.md").read_text()
