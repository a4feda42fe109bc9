#!/usr/bin/env bash
# Everything issue 21 asks of a lent GPU, in one time-boxed command, from the repository root:
#   bash benchmarks/gpu_run.sh [PHASE ...]     (default: check profile train scale compile)
# Phases, in this order, each under its own time limit, none stopping the ones after it:
#   check    benchmarks/gpu_check.sh: build with the CUDA kernels, pytest -m gpu tests, the step benchmarks
#            (item 1, item 2a/2b; knobs: DPK_GPU_* as that script says)
#   profile  benchmarks/gpu_profile.py: where the step's GPU time goes, ours beside non-private, transformer and
#            the fmnist LDM (what the issue asks for when a goal is missed)
#   train    python -m dpldm.train --preset fmnist on the GPU for DPK_TRAIN_S seconds (item 3): a short public
#            pre-training (DPK_PRETRAIN_STEPS, the preset's own takes far longer), then DP steps until the time
#            is up; speed read off log.jsonl by benchmarks/train_speed.py, GPU memory by nvidia-smi
#   scale    benchmarks/gpu_scale.py: largest batch per variant, transformer width 1024 (item 2c)
#   compile  benchmarks/bench_compile.py on the GPU, transformer and the fmnist LDM step (item 4)
#   steps    only the step benchmarks of gpu_check.sh (DPK_GPU_STEP_K; DPK_STEP_ARGS, e.g. "--bench-autocast
#            bf16") and their report, no build, no tests
#   retest   only pytest -m gpu tests (after a fix: DPK_RETEST_ARGS, e.g. "-k clipped_sum", or DPK_RETEST_IDS, a
#            file of test ids, one a line: what an interrupted run left); needs a carried extension

# Inputs that a bare GPU machine lacks travel with the working tree (git-ignored, named in the device tool's
# carry): .whl/ (opacus, diffusers, mlxtend, ... wheels; installed with --no-deps into a private folder) and
# .gpu_data/fashion-mnist/ (the Debian package's idx.gz files, copied to where dpldm.data looks for them).
# A prebuilt extension (dpkernels/_C*.so, carried) is used as it is when DPK_SKIP_BUILD=1.
# Seen on an H200 (2026-12-04, benchmarks/RESULTS.md): start-up and wheels ~10 s, build 50 s, the 180 GPU tests
# ~180 s with -n 8..16, the step benchmarks ~20 s per variant (transformer + ldm: ~4 min), the fmnist train phase
# more than 55 s before its first DP step. A 15-minute device lease holds about two of these runs: split the
# phases (e.g. `check` without steps, then `steps profile train`), and carry the built extension to the second.
# Per-phase limits (seconds): DPK_CHECK_S (300; gpu_check's build DPK_GPU_BUILD_S 120 and tests DPK_GPU_TEST_S
# 110 inside it), DPK_PROFILE_S (25 per model), DPK_TRAIN_S (60), DPK_SCALE_S (45), DPK_COMPILE_S (45 per
# model); a phase also leaves time for the ones after it (DPK_AFTER_*_S).
# Outputs: logs and JSON in $WORK (default _gpu/run), packed after every phase into $OUT/gpu_run.tgz (if OUT is
# set), with summary.md beside it and the built extension (for a later call to carry). The whole run stops
# starting phases after DPK_RUN_BUDGET_S seconds (default 420).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

START=$SECONDS
BUDGET="${DPK_RUN_BUDGET_S:-420}"
WORK="${WORK:-_gpu/run}"
mkdir -p "$WORK"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1 DPLDM_NO_BAR=1
PHASES=("$@")
((${#PHASES[@]})) || PHASES=(check profile train scale compile)
# One H200 (sm_90) and 16 cores: compile for it alone, in parallel; the GPU tests in 8 processes (Triton compiles
# are CPU-bound); the step benchmarks of items 2a/2b (the older 32x32 UNet workload is left out for time).
export DPKERNELS_CUDA_ARCHS="${DPKERNELS_CUDA_ARCHS:-90}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" DPK_GPU_STEP_K="${DPK_GPU_STEP_K-transformer or ldm}"
export DPK_GPU_KERNEL_BENCH="${DPK_GPU_KERNEL_BENCH:-0}"
SUMMARY="$WORK/summary.md"
: >"$SUMMARY"

log() { echo "[gpu_run +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }
pack() {  # everything so far goes back, even if a later phase is killed; the train run's models stay (over 16 MiB)
    [[ -n "${OUT:-}" ]] || return 0
    tar -czf "$OUT/gpu_run.tgz.part" --exclude=train_runs -C "$(dirname "$WORK")" "$(basename "$WORK")" \
        && mv "$OUT/gpu_run.tgz.part" "$OUT/gpu_run.tgz"
    cp "$SUMMARY" "$OUT/summary.md"
}
limit() {  # seconds for a phase: at most $1, leaving $2 for the phases after it
    local want=$1 l
    l=$(($(left) - $2))
    ((l < want)) && want=$l
    echo "$want"
}

# --- machine and inputs ----------------------------------------------------------------------------------------
log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
"$PY" -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' \
    2>&1 | tee -a "$SUMMARY"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    SITE="${DPK_SITE:-/tmp/dpk_site}"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        >"$WORK/pip.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "wheels from .whl/ installed into $SITE: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
        log "wheels from .whl/ FAILED to install (see pip.log)"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${DPK_GPU_TEST_ARGS+x}" ]] && "$PY" -c 'import xdist' 2>/dev/null; then
    export DPK_GPU_TEST_ARGS="-n 8"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [[ -d .gpu_data/fashion-mnist && ! -d $FMNIST ]]; then
    mkdir -p "$(dirname "$FMNIST")" && cp -r .gpu_data/fashion-mnist "$FMNIST" && log "Fashion-MNIST copied to $FMNIST"
fi
pack

# --- phases -------------------------------------------------------------------------------------------------------
phase_check() {
    local cap
    cap=$(limit "${DPK_CHECK_S:-300}" "${DPK_AFTER_CHECK_S:-110}")
    # gpu_check.sh: build and tests under their own limits, the step benchmarks on what is left of $cap
    OUT="$WORK" DPK_GPU_BUDGET_S="$cap" DPK_GPU_BUILD_S="${DPK_GPU_BUILD_S:-120}" \
        DPK_GPU_TEST_S="${DPK_GPU_TEST_S:-110}" timeout -s INT -k 20 $((cap + 30)) bash benchmarks/gpu_check.sh \
        >"$WORK/gpu_check.log" 2>&1
    log "check: gpu_check.sh rc=$? (limit ${cap}s); its status:"
    sed -n '/\] status$/,/^$/p' "$WORK/gpu_check.log" | tee -a "$SUMMARY"
    [[ -f "$WORK/report.md" ]] && cat "$WORK/report.md" >>"$SUMMARY"
    for so in dpkernels/_C*.so; do [[ -f $so && -n "${OUT:-}" ]] && cp "$so" "$OUT/"; done
}

phase_profile() {
    local secs model
    for model in transformer ldm; do
        secs=$(limit "${DPK_PROFILE_S:-25}" "${DPK_AFTER_PROFILE_S:-120}")
        ((secs < 10)) && { log "profile $model: no time left"; continue; }
        timeout -s INT -k 10 "$secs" "$PY" -m benchmarks.gpu_profile --model "$model" --variants nonprivate ours \
            --top 25 >"$WORK/profile_$model.log" 2>&1
        log "profile $model: rc=$? (limit ${secs}s)"
        grep -E "^== " "$WORK/profile_$model.log" | tee -a "$SUMMARY"
    done
}

phase_train() {
    local secs run gpumem
    secs=$(limit "${DPK_TRAIN_S:-60}" "${DPK_AFTER_TRAIN_S:-60}")
    run="$WORK/train_runs"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$WORK/train_gpu_mem.csv" 2>/dev/null &
    local smi=$!
    timeout -s INT -k 15 "$secs" "$PY" -m dpldm.train --preset fmnist --runs "$run" --out "$run/dp" \
        --set pretrain.steps="${DPK_PRETRAIN_STEPS:-30}" --set pretrain_autoencoder.steps="${DPK_PRETRAIN_STEPS:-30}" \
        --no-sample --checkpoint-every 100000 >"$WORK/train.log" 2>&1
    log "train: rc=$? (limit ${secs}s; 124 = stopped by the limit, as planned)"
    kill "$smi" 2>/dev/null
    gpumem=$(sort -n "$WORK/train_gpu_mem.csv" 2>/dev/null | tail -n 1)
    cp "$run/dp/log.jsonl" "$WORK/train_log.jsonl" 2>/dev/null
    tail -n 5 "$WORK/train.log"
    "$PY" -m benchmarks.train_speed "$run/dp/log.jsonl" ${gpumem:+--gpu-mem-mib "$gpumem"} 2>&1 | tee -a "$SUMMARY"
}

phase_scale() {
    local secs
    secs=$(limit "${DPK_SCALE_S:-45}" "${DPK_AFTER_SCALE_S:-0}")
    read -r -a extra <<<"${DPK_SCALE_ARGS:-}"
    timeout -s INT -k 15 $((secs + 20)) "$PY" -m benchmarks.gpu_scale --budget-s "$secs" --json "$WORK/scale.json" \
        "${extra[@]}" >"$WORK/scale.log" 2>&1
    log "scale: rc=$?"
    sed -n '/^transformer stack/,$p' "$WORK/scale.log" | tee -a "$SUMMARY"
}

phase_compile() {
    local secs model
    for model in transformer ldm; do
        secs=$(limit "${DPK_COMPILE_S:-45}" 0)
        ((secs < 20)) && { log "compile $model: no time left"; continue; }
        timeout -s INT -k 15 "$secs" "$PY" -m benchmarks.bench_compile --device cuda --model "$model" --size full \
            --steps 10 --warmup 3 --no-plain >"$WORK/compile_$model.log" 2>&1
        log "compile $model: rc=$? (limit ${secs}s)"
        sed -n "/^$model /,\$p" "$WORK/compile_$model.log" | tee -a "$SUMMARY"
    done
}

phase_steps() {
    local secs sel=()
    secs=$(limit "${DPK_STEPS_S:-200}" "${DPK_AFTER_STEPS_S:-0}")
    [[ -n "${DPK_GPU_STEP_K:-}" ]] && sel=(-k "$DPK_GPU_STEP_K")
    read -r -a more <<<"${DPK_STEP_ARGS:-}"  # e.g. "--bench-autocast bf16"
    sel+=("${more[@]}")
    timeout -s INT -k 20 "$secs" "$PY" -m pytest -m gpu benchmarks/test_bench_step_gpu.py -q -rs -p no:cacheprovider \
        --bench-size full --benchmark-json="$WORK/step_gpu.json" -W ignore::UserWarning "${sel[@]}" \
        >"$WORK/step_gpu.log" 2>&1
    log "steps: rc=$? (limit ${secs}s)"
    tail -n 15 "$WORK/step_gpu.log"
    [[ -s "$WORK/step_gpu.json" ]] && "$PY" -m benchmarks.report "$WORK/step_gpu.json" | tee "$WORK/report.md" >>"$SUMMARY"
}

phase_retest() {
    local secs which=(tests)
    secs=$(limit "${DPK_RETEST_S:-400}" "${DPK_AFTER_RETEST_S:-0}")
    read -r -a args <<<"${DPK_GPU_TEST_ARGS:-} ${DPK_RETEST_ARGS:-}"
    [[ -n "${DPK_RETEST_IDS:-}" ]] && mapfile -t which <"$DPK_RETEST_IDS"
    timeout -s INT -k 20 "$secs" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
        --junitxml="$WORK/retest.xml" "${args[@]}" "${which[@]}" >"$WORK/retest.log" 2>&1
    log "retest: rc=$?"
    tail -n 30 "$WORK/retest.log" | tee -a "$SUMMARY"
}

for phase in "${PHASES[@]}"; do
    if (($(left) < 20)); then
        log "$phase: not started, the run's ${BUDGET}s are spent"
        continue
    fi
    log "phase $phase ($(left)s left)"
    "phase_$phase"
    pack
done
log "done"
pack
tail -n 80 "$SUMMARY"
