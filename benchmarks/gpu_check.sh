#!/usr/bin/env bash
# The one prepared GPU check: on a machine with one GPU and no network, within 8 minutes on
# one H200 including the build:
#   1. builds peftcore in place with its CUDA kernels for this GPU (pip, no index, no build
#      isolation: the installed CUDA torch is used; TORCH_CUDA_ARCH_LIST default 9.0a,
#      MAX_JOBS default 16);
#   2. runs the `cuda` tests (tests/test_cuda.py: every op sample vs the reference, opcheck,
#      graph capture, whole-model parity; tests/ops/test_out_variants.py: the .out overloads);
#   3. sweeps the benchmarks (benchmarks/bench_cuda.py: tokens 1-64, ranks 8/16/64, single
#      and 4 / 32 adapters, against PyTorch's unfused path and bitsandbytes).
# Everything lands in $OUT (default benchmarks/results/gpu-check-<time>): build.log,
# ptxas.txt, tests.log, tests.xml, bench_cuda.json, bench_cuda.md, summary.md.
# Environment: PYTHON (default python3), CUDA_HOME (default: /usr/local/cuda-13.0, else
# /usr/local/cuda, else torch's guess), TORCH_CUDA_ARCH_LIST, MAX_JOBS, BUDGET_S (480).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-480}
OUT=${OUT:-benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$OUT/summary.md"; }

if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    [ -x "$d/bin/nvcc" ] && { CUDA_HOME=$d; break; }
  done
  [ -z "${CUDA_HOME:-}" ] && CUDA_HOME=$($PY -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
export PEFTCORE_BUILD_CUDA=1 PEFTCORE_PTXAS_VERBOSE=1

note "# gpu_check $(date -u +%FT%TZ)"
note ""
note "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
note "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
note "- CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# 1. build
t0=$(date +%s)
timeout $(( $(left) - 200 )) $PY -m pip install --no-index --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1
rc=$?
note "- build: rc=$rc in $(( $(date +%s) - t0 )) s ($(grep -a 'peftcore build:' "$OUT/build.log" | tail -n 1))"
$PY benchmarks/ptxas_report.py "$OUT/build.log" "$OUT/ptxas.txt" >/dev/null 2>&1 || true
if [ $rc -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  note "- build FAILED: tests and benchmarks not run"
  exit 1
fi
$PY -c "import peftcore; print(peftcore.show_config())" > "$OUT/show_config.txt" 2>&1

# 2. the cuda tests (leave at least 100 s for the benchmarks)
t0=$(date +%s)
timeout $(( $(left) - 100 )) $PY -m pytest -q -m cuda tests/test_cuda.py tests/ops/test_out_variants.py -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
rc_tests=$?
note "- cuda tests: rc=$rc_tests in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/tests.log")"

# 3. benchmarks (a quick sweep when little time is left)
t0=$(date +%s)
quick=""
[ "$(left)" -lt 200 ] && quick="--quick"
timeout $(( $(left) - 5 )) $PY benchmarks/bench_cuda.py --out "$OUT" $quick > "$OUT/bench.log" 2>&1
rc_bench=$?
note "- benchmarks${quick:+ (quick)}: rc=$rc_bench in $(( $(date +%s) - t0 )) s"
[ -f "$OUT/bench_cuda.md" ] && { note ""; sed -n '/## Goals/,$p' "$OUT/bench_cuda.md" | tee -a "$OUT/summary.md"; }
note ""
note "total $(( $(date +%s) - START )) s; results in $OUT"
[ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ]
