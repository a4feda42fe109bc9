#!/usr/bin/env bash
# GPU check, one command, on a bare GPU machine (torch + triton + nvcc + ninja installed, no network):
#   bash benchmarks/gpu_check.sh
# from the repository root. It
#   1. reports the machine (GPU, driver, torch, triton, nvcc) and which optional packages are missing
#      (opacus, diffusers, peft; installed from wheels in .whl/ if that folder exists, never from a network);
#   2. builds the extension in place (CUDA kernels included; sm_80 + sm_90, see setup.py), prints how long
#      it took, and FAILS the check if a GPU is visible but the extension has no CUDA kernels (nvcc not
#      found, DPKERNELS_NO_CUDA set): their tests would otherwise all skip;
#   3. runs the GPU tests: pytest -m gpu tests (every autotune config of every Triton kernel included);
#   4. runs the GPU benchmarks at full size: the whole DP step (benchmarks/test_bench_step_gpu.py) and the
#      kernels (benchmarks/test_bench_kernels_gpu.py), each with --benchmark-json;
#   5. prints a short status, then the tables (benchmarks/report.py) last.
# Outputs (logs, JSON, report.md) go to $OUT if set, else to _gpu/ (git-ignored).
# Time: the build gets DPK_GPU_BUILD_S seconds (default 240, both build attempts together) and the GPU tests
# their own DPK_GPU_TEST_S (default 240), so a slow build cannot eat the tests' time; the benchmarks share
# what is left of DPK_GPU_BUDGET_S (default 530, the whole run, under a 10-minute command limit). Every
# phase runs under `timeout -s INT`, so an interrupted pytest still writes the JSON of what it finished.
# Selection: DPK_GPU_TEST_ARGS (extra pytest arguments for the GPU tests, e.g. "-n 8" with pytest-xdist),
# DPK_GPU_STEP_K (a pytest -k expression choosing the step benchmarks, e.g. "transformer or ldm"),
# DPK_GPU_KERNEL_BENCH=0 (skip the kernel benchmarks), DPK_SKIP_BUILD=1 (use the dpkernels/_C*.so already there).
# Python: $PYTHON, else `python`, else `python3` on PATH.
# Exit status: 0 if the build (with CUDA kernels) and the GPU tests passed, 1 otherwise (benchmarks never
# fail the check).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT_DIR="${OUT:-_gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [[ -z "$PY" ]]; then
    echo "gpu_check: FAILED: neither python nor python3 is on PATH (set PYTHON=/path/to/python)" >&2
    exit 1
fi
BUDGET="${DPK_GPU_BUDGET_S:-530}"
BUILD_BUDGET="${DPK_GPU_BUILD_S:-240}"
TEST_BUDGET="${DPK_GPU_TEST_S:-240}"
START=$SECONDS
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"   # parallel nvcc/ninja jobs
export PYTHONUNBUFFERED=1
STATUS=()

log() { echo "[gpu_check +$((SECONDS - START))s] $*"; }

# Seconds for the next phase: at most $1, leaving $2 seconds for the phases after it.
phase_time() {
    local want=$1 reserve=$2 left
    left=$((BUDGET - (SECONDS - START) - reserve))
    ((left < want)) && want=$left
    ((want < 15)) && want=15
    echo "$want"
}

run_phase() {  # run_phase NAME SECONDS LOGFILE CMD... : time-bounded, logged, status recorded
    local name=$1 secs=$2 logfile=$3 rc
    shift 3
    log "$name (limit ${secs}s): $*"
    timeout -s INT -k 20 "$secs" "$@" >"$logfile" 2>&1
    rc=$?
    tail -n 25 "$logfile"
    if ((rc == 124 || rc == 137)); then
        STATUS+=("$name: TIMED OUT after ${secs}s (log: $logfile)")
    elif ((rc == 0)); then
        STATUS+=("$name: ok")
    else
        STATUS+=("$name: FAILED rc=$rc (log: $logfile)")
    fi
    return $rc
}

# 1. machine ------------------------------------------------------------------------------------------
log "machine (python: $PY)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: MISSING (Triton kernels and their tests will be skipped)")
EOF
(nvcc --version 2>/dev/null | tail -n 2) || echo "nvcc: not on PATH (CUDA kernels will not be built)"
ninja --version 2>/dev/null | sed 's/^/ninja /' || echo "ninja: MISSING (the build falls back to slower distutils)"
lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)):' || true

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "no CUDA device visible to torch: nothing to check here"
    exit 1
fi

for pkg in opacus diffusers peft pytest_benchmark; do
    if ! "$PY" -c "import $pkg" 2>/dev/null; then
        if [[ -d .whl ]]; then
            log "$pkg missing: installing from .whl/ (no index, no network)"
            "$PY" -m pip install --no-index --find-links .whl "${pkg//_/-}" >"$OUT_DIR/pip_$pkg.log" 2>&1 \
                || tail -n 5 "$OUT_DIR/pip_$pkg.log"
        fi
        if ! "$PY" -c "import $pkg" 2>/dev/null; then
            STATUS+=("$pkg: MISSING (benchmarks and tests that need it are skipped)")
            log "$pkg: MISSING"
        fi
    fi
done

# 2. build: its own budget, both attempts together --------------------------------------------------------
BUILD_OK=0
BUILD_START=$SECONDS
if [[ "${DPK_SKIP_BUILD:-0}" == 1 ]]; then  # a prebuilt extension (carried from an earlier build of the same sources)
    log "build skipped (DPK_SKIP_BUILD=1): using $(ls dpkernels/_C*.so 2>/dev/null || echo 'NO dpkernels/_C*.so')"
    echo "dpkernels: CUDA kernels: prebuilt extension, build skipped" >"$OUT_DIR/build.log"
    STATUS+=("build: skipped (DPK_SKIP_BUILD=1)")
    BUILD_OK=1
elif run_phase build "$BUILD_BUDGET" "$OUT_DIR/build.log" "$PY" setup.py build_ext --inplace; then
    BUILD_OK=1
else
    rc=$?
    left=$((BUILD_BUDGET - (SECONDS - BUILD_START)))
    if ((rc != 124 && rc != 137 && left >= 30)); then  # a quick failure: the pip route may still work
        log "build_ext --inplace failed; trying pip install -e . (${left}s of the build budget left)"
        run_phase build-pip "$left" "$OUT_DIR/build_pip.log" \
            "$PY" -m pip install --no-build-isolation --no-deps -e . && BUILD_OK=1
    fi
fi
log "build took $((SECONDS - BUILD_START))s (budget ${BUILD_BUDGET}s)"
BUILD_LINE=$(grep -h "dpkernels: CUDA kernels" "$OUT_DIR"/build*.log 2>/dev/null | tail -n 1)
echo "${BUILD_LINE:-no 'dpkernels: CUDA kernels' line in the build log}"

# A GPU is visible (checked above): the extension must have its CUDA kernels, or every CUDA test would skip.
CUDA_EXT_OK=0
EXT_CUDA=$("$PY" -c 'import dpkernels.ops as o; print(o.extension_has("cuda"))' 2>"$OUT_DIR/extension.log")
if [[ "$EXT_CUDA" == "True" ]]; then
    CUDA_EXT_OK=1
    log "extension CUDA kernels: yes"
else
    if [[ "$EXT_CUDA" == "False" ]]; then
        msg="a GPU is visible but the extension was built WITHOUT its CUDA kernels (${BUILD_LINE:-see build.log})"
    else
        msg="the extension is not importable (log: $OUT_DIR/extension.log)"
        tail -n 5 "$OUT_DIR/extension.log"
    fi
    log "FAILED: $msg"
    STATUS+=("extension: FAILED: $msg")
    # the check fails anyway; the tests still run the Triton kernels, the CUDA-extension ones skip, not fail
    export DPK_ALLOW_NO_CUDA_KERNELS=1
fi

# 3. GPU tests: their own budget, whatever the build took ------------------------------------------------------
TESTS_OK=0
read -r -a TEST_ARGS <<<"${DPK_GPU_TEST_ARGS:-}"
run_phase gpu-tests "$TEST_BUDGET" "$OUT_DIR/gpu_tests.log" \
    "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" "${TEST_ARGS[@]}" \
    && TESTS_OK=1

# 4. GPU benchmarks, full size --------------------------------------------------------------------------------
JSONS=()
STEP_K=()
[[ -n "${DPK_GPU_STEP_K:-}" ]] && STEP_K=(-k "$DPK_GPU_STEP_K")
KERNEL_BENCH="${DPK_GPU_KERNEL_BENCH:-1}"
run_phase step-benchmarks "$(phase_time 200 $((KERNEL_BENCH == 0 ? 0 : 80)))" "$OUT_DIR/step_gpu.log" \
    "$PY" -m pytest -m gpu benchmarks/test_bench_step_gpu.py -q -rs -p no:cacheprovider \
    --bench-size full --benchmark-json="$OUT_DIR/step_gpu.json" -W ignore::UserWarning "${STEP_K[@]}"
[[ -s "$OUT_DIR/step_gpu.json" ]] && JSONS+=("$OUT_DIR/step_gpu.json")

if [[ "$KERNEL_BENCH" == 0 ]]; then
    STATUS+=("kernel-benchmarks: skipped (DPK_GPU_KERNEL_BENCH=0)")
elif [[ -f benchmarks/test_bench_kernels_gpu.py ]]; then
    run_phase kernel-benchmarks "$(phase_time 150 15)" "$OUT_DIR/kernels_gpu.log" \
        "$PY" -m pytest -m gpu benchmarks/test_bench_kernels_gpu.py -q -rs -p no:cacheprovider \
        --bench-size full --benchmark-json="$OUT_DIR/kernels_gpu.json" \
        --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-warmup=on
    [[ -s "$OUT_DIR/kernels_gpu.json" ]] && JSONS+=("$OUT_DIR/kernels_gpu.json")
else
    STATUS+=("kernel-benchmarks: benchmarks/test_bench_kernels_gpu.py not found")
fi

# 5. status, then the tables last --------------------------------------------------------------------------------
echo
log "status"
printf '  %s\n' "${STATUS[@]}"
echo
if ((${#JSONS[@]})); then
    "$PY" -m benchmarks.report "${JSONS[@]}" | tee "$OUT_DIR/report.md"
else
    echo "no benchmark JSON was written"
fi
if ((BUILD_OK && CUDA_EXT_OK && TESTS_OK)); then
    log "gpu_check: OK"
    exit 0
fi
log "gpu_check: FAILED (build ok: $BUILD_OK, CUDA kernels: $CUDA_EXT_OK, GPU tests ok: $TESTS_OK)"
exit 1
