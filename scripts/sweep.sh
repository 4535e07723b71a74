#!/usr/bin/env bash
# Example sweep: token-mixing layer x K x sampling type, plus baseline layers that take neither.
#
# Each run gets its own directory under OUTPUT_ROOT, named after its settings and seed
# (e.g. ConvNNAttention_K9_random32_s0). Running the script again skips finished runs (their
# train_eval_results.txt ends with the "Max Accuracy" line) and continues unfinished ones from their
# last.pt (--resume auto), so an interrupted sweep is continued by starting it again. A directory whose
# args.txt holds other flags than the sweep would run (another DATASET, EXTRA_FLAGS, EPOCHS...) is refused,
# named on stderr, and the sweep goes on with the other runs and ends with exit code 1. Ctrl-C (SIGINT)
# or SIGTERM stops the run in progress at its next step and then the whole sweep, exit code 130 or 143.
# Summarise the results with: python scripts/summarize.py "$OUTPUT_ROOT"
#
# Every setting below can be overridden from the environment, e.g.
#   DATASET=synthetic EPOCHS=3 DEVICE=cpu scripts/sweep.sh
set -euo pipefail

REPOSITORY=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---- Settings ---------------------------------------------------------------------------------
# The project's virtual environment when it has one.
if [[ -x $REPOSITORY/.venv/bin/python ]]; then
    PYTHON=${PYTHON:-$REPOSITORY/.venv/bin/python}
else
    PYTHON=${PYTHON:-python3}
fi
# Command that starts vit_main.py; for data parallelism e.g.
#   LAUNCHER="torchrun --nproc_per_node 4"   (--batch_size is then per process)
LAUNCHER=${LAUNCHER:-$PYTHON}
OUTPUT_ROOT=${OUTPUT_ROOT:-./Output/sweep}
DATASET=${DATASET:-cifar10}
EPOCHS=${EPOCHS:-100}
DEVICE=${DEVICE:-cuda}
# Layers that take --K and --sampling_type (the sampling type only changes ConvNN layers).
LAYERS=${LAYERS:-ConvNNAttention}
K_VALUES=${K_VALUES:-"4 9 16"}
# A sampling type, or type:num_samples for random (candidates) and spatial (side of the grid).
SAMPLINGS=${SAMPLINGS:-"all random:32 spatial:6"}
# Layers run once each, for comparison (empty: none).
BASELINES=${BASELINES-Attention}
# --seed values: every setting is run once per seed, all settings of the first seed first.
SEEDS=${SEEDS:-0}
# Flags shared by every run.
EXTRA_FLAGS=${EXTRA_FLAGS:-"--resize 0 --patch_size 4 --num_layers 6 --augment --scheduler cosine --lr 5e-4"}
# -----------------------------------------------------------------------------------------------

read -r -a launcher <<< "$LAUNCHER"
read -r -a extra_flags <<< "$EXTRA_FLAGS"
failed_runs=()
refused_runs=()

# Ctrl-C sends SIGINT to every process of the terminal's process group: the run in progress stops at
# its next step and writes its stop line. The script only notes the signal (bash runs the trap once
# the run has ended) and starts no further run.
stop_signal=
trap 'stop_signal=INT' INT
trap 'stop_signal=TERM' TERM

# stop_if_signalled WHEN: ends the sweep, naming WHEN ("during NAME"), once a signal has arrived.
stop_if_signalled() {
    [[ -z $stop_signal ]] && return
    report_failed_and_refused_runs
    echo "sweep.sh: stopped by SIG$stop_signal $1; start the sweep again to continue" >&2
    [[ $stop_signal == INT ]] && exit 130
    exit 143
}

report_failed_and_refused_runs() {
    if (( ${#failed_runs[@]} > 0 )); then
        echo "failed: ${failed_runs[*]}" >&2
    fi
    if (( ${#refused_runs[@]} > 0 )); then
        echo "refused: ${refused_runs[*]}" >&2
    fi
}

# tee -a FILE, deaf to the signals: it must copy the run's stop line, written after the signal.
copy_to_log() {
    trap '' INT TERM
    exec tee -a "$1"
}

is_finished() {
    local results="$1/train_eval_results.txt"
    [[ -f $results ]] && grep -q '^Max Accuracy: ' "$results"
}

# holds_other_run DIRECTORY FLAGS...: whether DIRECTORY holds a run trained with other flags than FLAGS,
# which then must not be counted nor continued as this sweep's; says which flag differs on stderr.
holds_other_run() {
    local directory=$1 state=unfinished difference
    shift
    [[ -f $directory/args.txt ]] || return 1
    is_finished "$directory" && state=finished
    # The checker's own errors (a damaged args.txt) also refuse the directory.
    if difference=$("$PYTHON" "$REPOSITORY/scripts/check_run_args.py" "$directory" "$state" "$@"); then
        return 1
    fi
    echo "sweep.sh: refused $directory: $difference; move the directory away or choose another OUTPUT_ROOT" >&2
}

# run NAME FLAGS...: trains one setting in OUTPUT_ROOT/NAME unless it has finished.
run() {
    local name=$1
    shift
    local directory="$OUTPUT_ROOT/$name"
    local flags=(--dataset "$DATASET" --device "$DEVICE" --num_epochs "$EPOCHS" "${extra_flags[@]}" "$@")
    stop_if_signalled "before $name"
    if holds_other_run "$directory" "${flags[@]}"; then
        echo "refuse  $name (other flags, see stderr)"
        refused_runs+=("$name")
        return
    fi
    if is_finished "$directory"; then
        echo "skip    $name (finished)"
        return
    fi
    if [[ -f $directory/last.pt ]]; then
        echo "resume  $name"
    else
        echo "start   $name"
    fi
    mkdir -p "$directory"
    local status=0
    "${launcher[@]}" "$REPOSITORY/vit_main.py" "${flags[@]}" --output_dir "$directory" --resume auto \
        2>&1 | copy_to_log "$directory/console.log" || status=${PIPESTATUS[0]}
    # A run stopped by a signal (exit code 130 or 143) stops the sweep too, also where the shell could not
    # trap the signal (bash cannot trap a signal that was ignored when it started). A failed run is
    # reported at the end instead of stopping the runs after it.
    case $status in
        0) ;;
        130) stop_signal=${stop_signal:-INT} ;;
        143) stop_signal=${stop_signal:-TERM} ;;
        *) [[ -n $stop_signal ]] || failed_runs+=("$name") ;;
    esac
    stop_if_signalled "during $name"
}

for seed in $SEEDS; do
    for layer in $LAYERS; do
        for k in $K_VALUES; do
            for sampling in $SAMPLINGS; do
                sampling_type=${sampling%%:*}
                num_samples=-1
                [[ $sampling == *:* ]] && num_samples=${sampling#*:}
                name="${layer}_K${k}_${sampling_type}"
                [[ $num_samples == -1 ]] || name+="$num_samples"
                run "${name}_s$seed" --layer "$layer" --K "$k" --sampling_type "$sampling_type" \
                    --num_samples "$num_samples" --seed "$seed"
            done
        done
    done
    for layer in $BASELINES; do
        run "${layer}_s$seed" --layer "$layer" --seed "$seed"
    done
done

report_failed_and_refused_runs
(( ${#failed_runs[@]} + ${#refused_runs[@]} == 0 )) || exit 1
