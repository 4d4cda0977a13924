#!/usr/bin/env bash
# bench/gpu_check.sh: build, test and benchmark dropreg_ext on a CUDA machine (sized for an H200)
# with ONE command, from the repository root or anywhere:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # or: OUT=/some/dir bash bench/gpu_check.sh
#
# OUT_DIR: the first argument, else $OUT, else bench/results/cuda-h200. Everything lands there:
# stages.txt (one line per stage: seconds, exit code), logs/<stage>.log, results.json, results.csv
# and the PNG plots of `python -m bench`.
#
# Stages, each under its own `timeout`; the limits add up to 470 s, so the script ends within 8 min:
#   check    20 s  nvidia-smi answers, nvcc exists, a python with torch sees the GPU
#   build   130 s  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) pip install --no-build-isolation --no-deps -e .
#                  with the machine's own python, torch and triton (no venv; torch is never installed),
#                  then checks that the CUDA kernels loaded
#   tests    90 s  python -m pytest tests -q -m cuda   (TRITON_INTERPRET unset: Triton runs compiled)
#   bench   220 s  python -m bench --full --device cuda --out OUT_DIR
#   summary  10 s  python -m bench.report --print OUT_DIR, then the stage table
# A failed check or build stops the script; a failed test or bench stage is recorded and the rest
# still runs. Exit status: 0 if every stage passed, else the first failing stage's status
# (124 = that stage hit its time limit; 3 = no usable GPU).
#
# Measured stage times: NOT RUN ON A GPU YET. After the first real run, replace this line with
#   check=?s build=?s tests=?s bench=?s summary=?s total=?s  (date, GPU, torch, triton versions)

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${1:-${OUT:-bench/results/cuda-h200}}"
mkdir -p "$OUT_DIR/logs" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOGS="$OUT_DIR/logs"
STAGES="$OUT_DIR/stages.txt"
: > "$STAGES"
T0=$SECONDS
FIRST_FAILURE=0

record() {  # name seconds rc
  local status=ok
  [ "$3" -ne 0 ] && status="FAILED (exit $3)"
  [ "$3" -eq 124 ] && status="TIMEOUT"
  printf '%-8s %5ss  %s\n' "$1" "$2" "$status" | tee -a "$STAGES"
  if [ "$3" -ne 0 ] && [ "$FIRST_FAILURE" -eq 0 ]; then FIRST_FAILURE=$3; fi
}

run_stage() {  # name limit_s command...: run it under timeout, log it, record it; returns its status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== [$name] (limit ${limit} s) $*"
  timeout --kill-after=2 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  record "$name" $((SECONDS - start)) "$rc"
  return "$rc"
}

finish() {
  printf '%-8s %5ss\n' total $((SECONDS - T0)) | tee -a "$STAGES"
  echo "results in $OUT_DIR"
  exit "$FIRST_FAILURE"
}

# --- the stages, as functions run by `timeout ... bash -c <name>` --------------------------------
find_python() {  # the first of $PYTHON, python, python3 that imports torch
  local candidate
  for candidate in ${PYTHON:-} python python3; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
      echo "$candidate"
      return
    fi
  done
}

# Prints the python, torch, triton and GPU; exits non-zero when torch sees no GPU. (A variable and
# not a heredoc inside check(): bash cannot export a function that contains a heredoc.)
TORCH_PROBE='
import sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA build {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed (the triton backend will be absent)")
if not torch.cuda.is_available():
    sys.exit(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})")
print(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
'

check() {  # names everything that is missing
  local missing=() nvcc found=""
  if ! command -v nvidia-smi > /dev/null; then
    missing+=("nvidia-smi not found: no NVIDIA driver on this machine")
  elif ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    missing+=("nvidia-smi failed: the driver cannot see a GPU")
  fi
  if [ -z "$PY" ]; then
    missing+=("no python with torch: neither \$PYTHON, 'python' nor 'python3' can import torch")
  elif ! "$PY" -c "$TORCH_PROBE"; then
    missing+=("torch.cuda.is_available() is False for $PY: torch cannot use a GPU here")
  fi
  for nvcc in "$(command -v nvcc)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$nvcc" ] && [ -x "$nvcc" ]; then found=$nvcc; break; fi
  done
  if [ -z "$found" ]; then
    missing+=("nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA kernels cannot be built")
  else
    echo "nvcc: $found"
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: this machine cannot run the GPU check; missing:"
    printf '  - %s\n' "${missing[@]}"
    return 3
  fi
}

build() {  # against this machine's torch; DROPREG_CUDA=1 makes setup.py fail loudly without CUDA kernels
  # PIP_BREAK_SYSTEM_PACKAGES: system pythons marked EXTERNALLY-MANAGED (PEP 668) refuse any pip
  # install otherwise; --no-deps keeps pip from touching torch or anything else.
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" DROPREG_CUDA=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return
  "$PY" -m dropreg_ext.info || return
  "$PY" -c 'import sys, dropreg_ext; sys.exit(0 if dropreg_ext._ext.HAS_CUDA else "CUDA kernels did not load")'
}

PY="$(find_python)"
export PY TORCH_PROBE
export -f check build

run_stage check 20 bash -c check || finish
run_stage build 130 bash -c build || finish
unset TRITON_INTERPRET  # Triton must run compiled on the GPU, not interpreted
run_stage tests 90 "$PY" -m pytest tests -q -m cuda -p no:cacheprovider
run_stage bench 220 "$PY" -m bench --full --device cuda --out "$OUT_DIR"
# Summary last: the headline numbers from results.json, then the stage table.
if [ -f "$OUT_DIR/results.json" ]; then
  run_stage summary 10 "$PY" -m bench.report --print "$OUT_DIR"
fi
echo "== stages (also in $STAGES)"
cat "$STAGES"
finish
