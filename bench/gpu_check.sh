#!/usr/bin/env bash
# bench/gpu_check.sh: build, test and benchmark dropreg_ext on a CUDA machine (sized for one H200)
# with ONE command that never wastes the run, from the repository root or anywhere:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # or: OUT=/some/dir bash bench/gpu_check.sh
#
# OUT_DIR: the first argument, else $OUT, else bench/out/cuda-h200 (not tracked by git). The run
# writes its whole tree to $GPU_CHECK_WORK (default /tmp/dropreg_gpu_check) and, after every stage,
# packs it into OUT_DIR/gpu_check.tgz and copies the summary to OUT_DIR/summary.txt: two files, so
# the device tool's limit on files coming back (8) never cuts the logs. The raw logs stay in the
# tarball; to commit a run's results, unpack everything but them:
#   tar -xzf gpu_check.tgz -C bench/results/cuda-h200 --exclude=./logs --exclude=./junit
# (.gitignore keeps logs/, junit/ and *.log out of bench/results/ should they be unpacked anyway).
# The tree: machine.txt (nvidia-smi, versions, pip list), stages.tsv, logs/<stage>.log,
# junit/<stage>-<file>.xml, bench-<section>/ (results.json, results.csv, PNGs), summary.txt.
#
# Stages, in order of value, each command under its own `timeout -s INT` (pytest then still prints
# its failures and writes its junit file), PYTHONUNBUFFERED=1. A test stage is one pytest run over
# all the test files, spread over 8 processes by pytest-xdist (in the GPU image): a test that crashes
# its process is reported as that test's failure and the process replaced, and the startup (several
# seconds of imports per process there) is paid in parallel. Without xdist, one process.
#   machine          record the machine; no GPU / torch without CUDA: exit 3 here
#   build            the machine's own python and torch, sm_90 only, all cores; if the CUDA build
#                    fails its log is kept, a CPU-only build installs the package (and its Triton
#                    kernels), and the stages that need the CUDA kernels are skipped
#   cuda-tests       the CUDA backend against the reference (-m cuda -k "not triton")
#   crash-probe      only if a test crashed its process: that test again under cuda-gdb, for the
#                    native backtrace (logs/crash-probe.log)
#   regularizer      the objective on CUDA against plain autograd (test_regularizer.py -m cuda)
#   bench-train      python -m bench --check --only train
#   triton-tests     the compiled Triton kernels (-m cuda -k triton)
#   bench-dropout, bench-ce
#   kernels          python -m bench.gpu_kernels: each op's device time from CUDA-graph replays (no
#                    host overhead), against a device-to-device copy
#   bench-site
#   summary          python -m bench.gpu_summary: stages, test counts, first failures, bandwidth
# The limits add up to 420 s, so the script ends within 7 minutes even if every stage hits its
# limit. Exit status: 0 if every stage passed, else the first failing stage's (124: a time limit).
# On a machine without a GPU it lists the stages with their limits, says what is missing and exits 3.
#
# Measured on an H200 (2026-12-04, torch 2.11.0+cu130, triton 3.6.0), with the earlier layout of one
# pytest process per file: machine 5 s, build 56 s, regularizer 19 s, bench-train 28 s, bench-dropout
# 23 s, bench-ce 23 s, bench-site about 20 s; every test file hit its 6-20 s limit (about 6 s of it
# imports), while all the CUDA and Triton tests but test_fuzz pass in 88 s in one process.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${1:-${OUT:-bench/out/cuda-h200}}"
WORK="${GPU_CHECK_WORK:-/tmp/dropreg_gpu_check}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/junit" || exit 2
export PYTHONUNBUFFERED=1
T0=$SECONDS
FIRST_FAILURE=0
CUDA_BUILT=0

TEST_FILES="tests/test_philox.py tests/test_dropout.py tests/test_cross_entropy.py tests/test_site_penalty.py
  tests/test_special_values.py tests/test_ecosystem.py tests/test_fuzz.py"

plan() {  # the stages and their limits, as run below
  cat <<EOF
gpu_check plan (limit per stage; test stages: one pytest run, 8 xdist workers where xdist is there):
  machine        10 s
  build          80 s   (CPU-only fallback build 40 s, only if the CUDA build fails)
  cuda-tests     65 s   $(echo $TEST_FILES) -m cuda -k "not triton"
  crash-probe    20 s   only if a test crashed its process
  regularizer    25 s   test_regularizer.py -m cuda
  bench-train    35 s   python -m bench --check --only train
  triton-tests   70 s   the same files, -m cuda -k triton
  bench-dropout  30 s
  bench-ce       30 s
  kernels        25 s   python -m bench.gpu_kernels
  bench-site     25 s
  summary         5 s
results: $OUT_DIR/gpu_check.tgz and $OUT_DIR/summary.txt (work tree $WORK)
EOF
}

pack() {  # the work tree into OUT_DIR, atomically, after every stage
  tar -czf "$OUT_DIR/.gpu_check.tgz.part" -C "$WORK" . && mv "$OUT_DIR/.gpu_check.tgz.part" "$OUT_DIR/gpu_check.tgz"
  [ -f "$WORK/summary.txt" ] && cp "$WORK/summary.txt" "$OUT_DIR/summary.txt"
  return 0
}

record() {  # name limit seconds rc
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/stages.tsv"
  local status=ok
  case "$4" in
    0) ;; 5) status="no tests" ;; -1) status=skipped ;; 124) status=TIMEOUT ;; *) status="FAILED (exit $4)" ;;
  esac
  printf '== %-32s %4ss of %4ss  %s\n' "$1" "$3" "$2" "$status"
  case "$4" in 0 | 5 | -1) ;; *) [ "$FIRST_FAILURE" -eq 0 ] && FIRST_FAILURE=$4 ;; esac
  pack
}

run() {  # name limit command...: under timeout -s INT, logged; returns the command's status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== [$name] (limit ${limit} s) $*"
  timeout -s INT --kill-after=5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 137 ] && rc=124  # killed after the grace period: still a time limit
  tail -n 15 "$WORK/logs/$name.log"
  record "$name" "$limit" $((SECONDS - start)) "$rc"
  return "$rc"
}

finish() {
  run summary 5 "${PY:-python3}" -m bench.gpu_summary "$WORK" > /dev/null
  cat "$WORK/summary.txt" 2> /dev/null
  echo "total $((SECONDS - T0)) s; results in $OUT_DIR/gpu_check.tgz (to commit them: tar -xzf it into" \
    "bench/results/cuda-h200 --exclude=./logs --exclude=./junit)"
  pack
  exit "$FIRST_FAILURE"
}

find_python() {  # the first of $PYTHON, python3, python that imports torch
  local candidate
  for candidate in ${PYTHON:-} python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
      echo "$candidate"
      return
    fi
  done
}

# Versions and the GPU, into machine.txt (its first lines head the summary); exits 3 without a GPU.
PROBE='
import importlib.metadata, sys
import torch
names = ["triton", "numpy", "pytest", "hypothesis", "matplotlib", "tqdm", "transformers", "ninja", "setuptools"]
versions = []
for name in names:  # from the installed metadata: importing transformers alone can take seconds
    try:
        versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        versions.append(f"{name} -")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-"
print(f"GPU: {gpu}, capability {cap}; python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print(", ".join(versions))
if not torch.cuda.is_available():
    sys.exit(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})")
'

machine() {
  local missing=() nvcc="" candidate
  if [ -z "$PY" ]; then
    missing+=("no python with torch: neither \$PYTHON, 'python3' nor 'python' can import torch")
  elif ! "$PY" -c "$PROBE"; then
    missing+=("torch.cuda.is_available() is False for $PY: torch cannot use a GPU here")
  fi
  if ! command -v nvidia-smi > /dev/null; then
    missing+=("nvidia-smi not found: no NVIDIA driver on this machine")
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || \
      missing+=("nvidia-smi failed: the driver cannot see a GPU")
  fi
  for candidate in "$(command -v nvcc)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc=$candidate; break; fi
  done
  if [ -z "$nvcc" ]; then
    missing+=("nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA kernels cannot be built")
  else
    "$nvcc" --version | tail -n 2
  fi
  echo "cores $(nproc); $(uname -srm)"
  echo "--- nvidia-smi"; nvidia-smi 2>&1
  echo "--- pip list"; [ -n "$PY" ] && "$PY" -m pip list 2>&1
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: this machine cannot run the GPU check; missing:"
    printf '  - %s\n' "${missing[@]}"
    return 3
  fi
}

build() {  # DROPREG_CUDA=1: setup.py fails loudly instead of silently building without CUDA kernels
  # PIP_BREAK_SYSTEM_PACKAGES: a system python marked EXTERNALLY-MANAGED refuses pip otherwise;
  # --no-deps --no-build-isolation: pip installs nothing and downloads nothing (no network there).
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" DROPREG_CUDA="${1:-1}" PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return
  "$PY" -m dropreg_ext.info
}

pytest_stage() {  # stage limit marker keyword: the test files in one pytest run
  local xdist=()
  "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 8 --max-worker-restart 16)
  # shellcheck disable=SC2086  # TEST_FILES is a list of paths
  run "$1" "$2" "$PY" -m pytest $TEST_FILES -m "$3" -k "$4" "${xdist[@]}" -q -rfE --tb=short \
    -p no:cacheprovider --junitxml="$WORK/junit/$1.xml"
}

crash_probe() {  # the first test that crashed its xdist worker, again alone under cuda-gdb
  local crashed gdb
  crashed=$(grep -o "crashed while running '[^']*'" "$WORK/logs/cuda-tests.log" 2> /dev/null | head -n 1 | cut -d"'" -f2)
  [ -z "$crashed" ] && return 0
  gdb=$(command -v cuda-gdb || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb")
  if [ -x "$gdb" ]; then
    run crash-probe 20 "$gdb" -batch -ex run -ex bt --args "$PY" -X faulthandler -m pytest "$crashed" \
      -p no:xdist -p no:cacheprovider -q
  else
    run crash-probe 20 "$PY" -X faulthandler -m pytest "$crashed" -p no:xdist -p no:cacheprovider -q
  fi
}

bench_section() {  # name limit section
  run "$1" "$2" "$PY" -m bench --check --device cuda --only "$3" --out "$WORK/$1"
}

PY="$(find_python)"
export PY PROBE
export -f machine build
plan
unset TRITON_INTERPRET  # Triton must run compiled on the GPU, not interpreted

run machine 10 bash -c machine
cp "$WORK/logs/machine.log" "$WORK/machine.txt"
[ "$FIRST_FAILURE" -ne 0 ] && { echo "gpu_check: no usable GPU here (see above); nothing else was run"; finish; }

if run build 80 bash -c build; then
  "$PY" -c 'import sys, dropreg_ext; sys.exit(0 if dropreg_ext._ext.HAS_CUDA else 1)' && CUDA_BUILT=1
fi
if [ "$CUDA_BUILT" -eq 0 ]; then
  echo "gpu_check: the CUDA kernels did not build or load (logs/build.log); CPU-only build for the Triton stages"
  run build-cpu-only 40 bash -c "build 0"
fi

if [ "$CUDA_BUILT" -eq 1 ]; then
  pytest_stage cuda-tests 65 cuda "not triton"
  crash_probe
else
  record cuda-tests 0 0 -1
fi
run regularizer 25 "$PY" -m pytest tests/test_regularizer.py -m cuda -q -rfE --tb=short -p no:cacheprovider \
  --junitxml="$WORK/junit/regularizer-test_regularizer.xml"
bench_section bench-train 35 train
pytest_stage triton-tests 70 cuda "triton"
bench_section bench-dropout 30 dropout
bench_section bench-ce 30 ce
run kernels 25 "$PY" -m bench.gpu_kernels --out "$WORK/kernels"
bench_section bench-site 25 site
finish
