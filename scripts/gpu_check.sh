#!/usr/bin/env bash
# GPU check, run from the repo root on the (offline) GPU machine:  bash scripts/gpu_check.sh OUTDIR
# Installs the carried wheels in .whl/ into /tmp/site when hydra is missing, then runs the test suite, a
# torch.compile smoke run and the benchmarks (end to end at 512 px, the networks against their peers, compile),
# each under a timeout, and prints a summary. Each step's timeout is also cut to what is left of
# GPU_CHECK_BUDGET seconds (default 540) for the whole; the most wanted results come first.
# For a dry run elsewhere: GPU_CHECK_PYTEST_ARGS replaces the test selection ("tests"),
# GPU_CHECK_DEVICE replaces "cuda", PYTHON replaces python3.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3} DEV=${GPU_CHECK_DEVICE:-cuda} DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
read -ra TESTS <<<"${GPU_CHECK_PYTEST_ARGS:-tests}"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # `pip install -e .` fails offline: use the checkout
SUMMARY=()

step() {  # step NAME MAX_SECONDS FUNCTION: runs FUNCTION with $T = its timeout, records rc and wall time
  local name=$1 t0=$SECONDS rc left=$((DEADLINE - SECONDS - 20))
  T=$(($2 < left ? $2 : left))
  echo; echo "=== $name (timeout ${T}s)"
  if ((T < 30)); then rc=skipped; else "$3"; rc=$?; fi
  SUMMARY+=("$(printf '%-9s rc=%-7s %4ss' "$name" "$rc" $((SECONDS - t0)))")
}

install_wheels() {
  if "$PY" -c "import hydra, albumentations" 2>/dev/null; then echo "hydra importable: install skipped"; return 0; fi
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else  # a venv without pip: a wheel is a zip of site-packages (only scripts/headers in *.data/ are lost)
    echo "no pip: unzipping the wheels"; for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site || return; done
  fi && export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH#"$PWD"}  # checkout first, then the wheels
}

print_versions() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "torchvision", "hydra", "omegaconf", "albumentations", "optuna"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:15s}{mod.__version__:14s}{mod.__file__}")
    except Exception as e:
        print(f"{m:15s}FAILED: {e!r}")
import torch
print("CUDA", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device)")
EOF
}

run_tests() {  # -v: every result is in the log as it happens, so a step timeout still shows what failed
  local per_test=() session=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout 120)
    "$PY" -m pytest --help 2>/dev/null | grep -q -- --session-timeout && session=(--session-timeout $((T - 25)))
  fi
  timeout -k 15 "$T" "$PY" -m pytest -v -rfE -n 12 "${per_test[@]}" "${session[@]}" -p no:cacheprovider \
    -o addopts="" --junitxml "$OUT/junit.xml" -m "not slow" "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/pytest.log"
  local failing; failing=$(grep -oE '(FAILED|ERROR) tests/[^ ]+' "$OUT/pytest.log" | sort -u)
  echo "--- failing tests:"; [[ -n $failing ]] && echo "$failing"
  echo "--- $(grep -c . <<<"$failing") failing (full log: pytest.log, junit.xml)"
  return $rc
}

run_bench() {  # on CUDA: the loop end to end against a bare one at 512 px, then the networks against their peers
  local dev=device="$DEV" left
  timeout -k 15 $((T / 2)) "$PY" scripts/benchmark.py overhead --out "$OUT/bench_e2e" $dev model=deeplabv3plus \
    data.image_size=512 data.batch_size=8 data.num_train=1024 trainer.max_epochs=4 2>&1 | tee "$OUT/bench.log"
  left=$((DEADLINE - SECONDS - 30))
  timeout -k 15 $((left * 2 / 3)) "$PY" scripts/benchmark.py models peers --out "$OUT/bench_models" $dev 2>&1 |
    tee -a "$OUT/bench.log"
  left=$((DEADLINE - SECONDS - 30))
  ((left > 45)) && timeout -k 15 "$left" "$PY" scripts/benchmark.py compile --size 128 --batch 16 \
    --out "$OUT/bench_compile" $dev model=deeplabv3plus 2>&1 | tee -a "$OUT/bench.log"
  return 0
}

run_compile() {  # a fresh run dir: an old last.pt there would be resumed
  rm -rf /tmp/gpu_compile
  local t0=$SECONDS
  timeout -k 15 "$T" "$PY" -m segtrain debug=smoke device="$DEV" device.compile=true trainer.progress=false \
    hydra.run.dir=/tmp/gpu_compile >"$OUT/compile.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/compile.log"; echo "--- torch.compile smoke run: rc=$rc wall $((SECONDS - t0))s"
  return $rc
}

step install 120 install_wheels
step versions 60 print_versions
step pytest 280 run_tests
step compile 90 run_compile
step bench 400 run_bench
echo; echo "=== summary (total ${SECONDS}s)"; printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
