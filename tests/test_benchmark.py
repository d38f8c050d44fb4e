"""scripts/benchmark.py runs end to end on tiny settings and writes the JSON and markdown it documents."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_section_writes_interleaved_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "overhead", "--iters", "2", "debug=smoke", "data.num_train=16", "trainer.max_epochs=4",
                "--out", str(tmp_path)])  # fmt: skip
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
