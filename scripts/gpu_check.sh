#!/usr/bin/env bash
# Every check of ConvNN-Attention that needs a GPU, in one run of under 8 minutes on one H100/H200-class GPU
# (docs/gpu_check.md). Each step runs under its own `timeout`, writes OUT_DIR/logs/STEP.log, and the run goes
# on after a step that failed; OUT_DIR/summary.md says which passed. Nothing is downloaded.
#
#   scripts/gpu_check.sh OUT_DIR              run every step (exit status 1 when one did not pass)
#   DRY_RUN=1 scripts/gpu_check.sh OUT_DIR    print each step's command, "[STEP] timeout SECONDS COMMAND...", only
#
# The correctness steps (device check, training runs, recipe) run side by side first; the timed steps
# (benchmarks, profile) then run one after another, alone on the GPU. DEVICE (default cuda) and STEPS (a
# space-separated subset of the step names, default all) are for checking the script itself on a CPU, as are
# SYNTHETIC_SIZES and the steps' limits in seconds below.
set -u

REPOSITORY=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x $REPOSITORY/.venv/bin/python ]]; then
    PYTHON=${PYTHON:-$REPOSITORY/.venv/bin/python}
else
    PYTHON=${PYTHON:-python3}
fi
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
DRY_RUN=${DRY_RUN:-0}
STEPS=${STEPS:-"environment check_device train_layers train_torchrun recipe benchmark_layers_float32
benchmark_layers_bfloat16 benchmark_models_float32 benchmark_models_bfloat16 profile"}
# Small epochs of the synthetic set (generated in memory, no files): 16 steps of 128 images an epoch.
SYNTHETIC_SIZES=${SYNTHETIC_SIZES:-2048,512}
LAYERS=(Attention ConvNNAttention KvtAttention LocalAttention SparseAttention Conv1d BranchConv BranchAttention)

# Seconds each step may take; the correctness steps run side by side, so they count once: 100 + 2 x 30 + 2 x 130
# + 15 = 435 s, and at most 5 s more a step for processes that ignore the end of their time and are killed.
PARALLEL_SECONDS=${PARALLEL_SECONDS:-100}
BENCHMARK_LAYERS_SECONDS=${BENCHMARK_LAYERS_SECONDS:-30}
BENCHMARK_MODELS_SECONDS=${BENCHMARK_MODELS_SECONDS:-130}
PROFILE_SECONDS=${PROFILE_SECONDS:-15}

cd "$REPOSITORY" || exit 2
LOGS=$OUT/logs
RUNS=$OUT/runs
if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$LOGS" "$RUNS" || exit 2
    rm -f "$LOGS"/*.status
fi

wanted() { [[ " ${STEPS//$'\n'/ } " == *" $1 "* ]]; }

# run_step NAME SECONDS COMMAND...: COMMAND under `timeout SECONDS`, its output in LOGS/NAME.log and its exit status
# and seconds in LOGS/NAME.status.
run_step() {
    local name=$1 seconds=$2
    shift 2
    if [[ $DRY_RUN == 1 ]]; then
        printf '[%s] timeout %s' "$name" "$seconds"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    local started=$SECONDS
    timeout --kill-after=5 "$seconds" "$@" >"$LOGS/$name.log" 2>&1
    echo "$? $((SECONDS - started)) $seconds" >"$LOGS/$name.status"
}

# in_background COMMAND...: COMMAND as a background job, or in the foreground for a dry run (so that its commands
# print in order).
in_background() {
    if [[ $DRY_RUN == 1 ]]; then "$@"; else "$@" & fi
}

# The model of the training runs: 32 px synthetic images in 4 px patches (65 tokens), 2 blocks of width 96.
TRAIN_SHAPE=(--dataset synthetic --resize 0 --patch_size 4 --num_layers 2 --d_hidden 96 --num_heads 3 --d_mlp 192
             --batch_size 128 --device "$DEVICE" --num_workers 0 --overwrite)
TRAIN_FLAGS=(--num_epochs 3 --data_loader device --use_amp --amp_dtype bfloat16 --use_compiled)
# Several compiling processes at once: a few compile workers each, so that together they fit the machine's cores.
TRAIN_ENVIRONMENT=(env CONVNN_SYNTHETIC_SIZES="$SYNTHETIC_SIZES" TORCHINDUCTOR_COMPILE_THREADS=2)

# Phase 1, correctness: side by side.
if wanted environment; then  # versions of torch, CUDA, the driver and Triton, and the GPU's name
    in_background run_step environment "$PARALLEL_SECONDS" "$PYTHON" -m torch.utils.collect_env
fi
if wanted check_device; then
    in_background run_step check_device "$PARALLEL_SECONDS" "$PYTHON" scripts/check_device.py --device "$DEVICE"
fi
if wanted train_layers; then
    for layer in "${LAYERS[@]}"; do
        in_background run_step "train_$layer" "$PARALLEL_SECONDS" "${TRAIN_ENVIRONMENT[@]}" "$PYTHON" vit_main.py \
            "${TRAIN_SHAPE[@]}" "${TRAIN_FLAGS[@]}" --layer "$layer" --output_dir "$RUNS/$layer"
    done
fi
if wanted train_torchrun; then
    in_background run_step train_torchrun "$PARALLEL_SECONDS" "${TRAIN_ENVIRONMENT[@]}" "$PYTHON" \
        -m torch.distributed.run --standalone --nproc_per_node 1 vit_main.py "${TRAIN_SHAPE[@]}" "${TRAIN_FLAGS[@]}" \
        --layer ConvNNAttention --output_dir "$RUNS/ConvNNAttention_torchrun"
fi
if wanted recipe; then
    in_background run_step recipe "$PARALLEL_SECONDS" "${TRAIN_ENVIRONMENT[@]}" "$PYTHON" vit_main.py \
        "${TRAIN_SHAPE[@]}" --num_epochs 2 --data_loader device --use_amp --amp_dtype bfloat16 --layer ConvNNAttention \
        --mixup 0.8 --cutmix 1.0 --random_erasing 0.25 --drop_path 0.1 --ema_decay 0.99 --output_dir "$RUNS/recipe"
fi
wait

# Phase 2, timings: one at a time.
for dtype in float32 bfloat16; do
    amp=()
    [[ $dtype == bfloat16 ]] && amp=(--amp --amp_dtype bfloat16)
    if wanted "benchmark_layers_$dtype"; then
        run_step "benchmark_layers_$dtype" "$BENCHMARK_LAYERS_SECONDS" "$PYTHON" scripts/benchmark.py \
            --device "$DEVICE" "${amp[@]}" --parts layers,operations --repeats 20 --warmup 3 \
            --json "$OUT/benchmark_layers_$dtype.json"
    fi
done
for dtype in float32 bfloat16; do
    amp=()
    [[ $dtype == bfloat16 ]] && amp=(--amp --amp_dtype bfloat16)
    if wanted "benchmark_models_$dtype"; then
        run_step "benchmark_models_$dtype" "$BENCHMARK_MODELS_SECONDS" "$PYTHON" scripts/benchmark.py \
            --device "$DEVICE" "${amp[@]}" --parts models --model_cases 32/4/0.1,224/16/0.1 --repeats 20 --warmup 3 \
            --json "$OUT/benchmark_models_$dtype.json"
    fi
done
if wanted profile; then
    run_step profile "$PROFILE_SECONDS" "$PYTHON" scripts/benchmark_convnn.py --profile --device "$DEVICE" --batch 32 \
        --tokens 197 --width 192 --K 9 --repeats 20
fi

[[ $DRY_RUN == 1 ]] && exit 0

# Lines of the logs that go into the summary: tables, the device check's verdict, the profile's totals.
SUMMARY_LINES='^\||^[0-9]+ combinations|^aggregation on|Triton kernels could not|^Where one|^[A-Za-z]+: [0-9.]+ ms'

# Summary: a row per step, the device check's and the benchmarks' tables, and every fallback to the CPU passes.
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE"
    echo
    echo "| step | result | seconds | limit |"
    echo "|---|---|---|---|"
    passed=0 failed=0
    while IFS= read -r status_file; do
        name=$(basename "$status_file" .status)
        read -r code elapsed limit <"$status_file"
        case $code in
            0) result=passed; passed=$((passed + 1)) ;;
            124 | 137) result="timed out"; failed=$((failed + 1)) ;;
            *) result="failed (exit $code)"; failed=$((failed + 1)) ;;
        esac
        echo "| $name | $result | $elapsed | $limit |"
    done < <(ls -tr "$LOGS"/*.status 2>/dev/null)  # in the order the steps ended
    echo
    echo "$passed passed, $failed did not pass; each step's output is in logs/STEP.log."
    fallbacks=()
    for log in "$LOGS"/*.log; do
        grep -q TritonFallbackWarning "$log" 2>/dev/null && fallbacks+=("$(basename "$log")")
    done
    echo
    if ((${#fallbacks[@]})); then
        echo "The Triton kernels could not compile or launch (the CPU passes ran instead) in: ${fallbacks[*]}"
        grep -h -m1 TritonFallbackWarning "$LOGS/${fallbacks[0]}"
    else
        echo "No step fell back from the Triton kernels to the CPU passes."
    fi
    for log in check_device benchmark_layers_float32 benchmark_layers_bfloat16 benchmark_models_float32 \
               benchmark_models_bfloat16 profile; do
        if [[ -s $LOGS/$log.log ]]; then
            echo
            echo "## $log"
            echo
            grep -E "$SUMMARY_LINES" "$LOGS/$log.log"
        fi
    done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
[[ $failed == 0 ]]
