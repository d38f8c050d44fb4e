"""Start-up time of the CLI: ``segtrain --help``, and ``segtrain debug=smoke`` up to its first training step.

    python scripts/startup_time.py [--runs 3] [OVERRIDE ...]

Each measurement is a fresh process; times are seconds since that process started (from /proc, so the
interpreter's own start-up counts).  The training runs print where the time went (wall and CPU seconds
at each phase: imports, data sets, model, optimizer, the dry validation pass, the first step), then the
medians.  The machine's load average is printed too: on a shared machine, time under load is not the
program's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs inside the measured process: marks phases by wrapping the trainer's building blocks.
PROBE = r"""
import os, sys, time
def _since_start():
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(open("/proc/uptime").read().split()[0]) - start
T0 = time.perf_counter() - _since_start()
def mark(what):
    print(f"@@ {time.perf_counter() - T0:.3f} {time.process_time():.3f} {what}", file=sys.stderr, flush=True)
mark("interpreter up")
import segtrain.apps.train as cli
mark("segtrain.apps.train imported")
def wrap(mod, name, label):
    f = getattr(mod, name)
    def g(*a, **k):
        mark(label)
        return f(*a, **k)
    setattr(mod, name, g)
import segtrain.build as build, segtrain.trainer as tr, segtrain.hooks.preflight as pf
mark("segtrain.build imported (torch ...)")
wrap(build, "build_datasets", "build data sets")
wrap(build, "build_model", "build model")
wrap(build, "build_optimizer", "build optimizer")
before = pf.Preflight.before_train
def dry(self, trainer):
    mark("dry validation pass")
    return before(self, trainer)
pf.Preflight.before_train = dry
step = tr.Trainer.train_step
def first(self, micro):
    mark("FIRST STEP starts")
    out = step(self, micro)
    mark("first step done")
    tr.Trainer.train_step = step
    return out
tr.Trainer.train_step = first
sys.argv = ["segtrain", *sys.argv[1:]]
cli.main()
"""


def help_time() -> float:
    exe = Path(sys.executable).parent / "segtrain"  # the console script (a checkout on PYTHONPATH has none)
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "segtrain"]
    t0 = time.perf_counter()
    subprocess.run([*command, "--help"], capture_output=True, check=True)
    return time.perf_counter() - t0


def first_step(overrides: list[str]) -> list[tuple[float, float, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["debug=smoke", "trainer.max_iters=1", "trainer.progress=false", f"hydra.run.dir={tmp}/run", *overrides]
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
    marks = []
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            wall, cpu, what = line[3:].split(" ", 2)
            marks.append((float(wall), float(cpu), what))
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra overrides for the training runs")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    helps = [help_time() for _ in range(args.runs)]
    print(f"segtrain --help: {', '.join(f'{t:.2f}' for t in helps)} s; median {statistics.median(helps):.2f} s")
    starts, ends = [], []
    for i in range(args.runs):
        marks = first_step(args.overrides)
        print(f"\nrun {i + 1}: seconds since process start (wall / CPU)")
        for wall, cpu, what in marks:
            print(f"  {wall:6.2f} / {cpu:5.2f}  {what}")
        starts.append(next(w for w, _, m in marks if m == "FIRST STEP starts"))
        ends.append(next(w for w, _, m in marks if m == "first step done"))
    print(
        f"\nfirst training step of debug=smoke starts at {statistics.median(starts):.2f} s (median of {args.runs}), "
        f"done at {statistics.median(ends):.2f} s"
    )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
