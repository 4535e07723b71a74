#!/usr/bin/env bash
# Example sweep: token-mixing layer x K x sampling type, plus baseline layers that take neither.
#
# Each run gets its own directory under OUTPUT_ROOT, named after its settings and seed
# (e.g. ConvNNAttention_K9_random32_s0). Running the script again skips finished runs (their
# train_eval_results.txt ends with the "Max Accuracy" line) and continues unfinished ones from their
# last.pt (--resume auto), so an interrupted sweep is continued by starting it again. A directory whose
# args.txt holds other flags than the sweep would run (another DATASET, EXTRA_FLAGS, EPOCHS...) is refused,
# named on stderr, and the sweep goes on with the other runs and ends with exit code 1. A run that a live
# process holds (another sweep, a cluster job) is skipped as running elsewhere. Ctrl-C (SIGINT) or SIGTERM
# sent to the sweep's process group stops the runs in progress at their next step and then the whole
# sweep, exit code 130 or 143. Summarise the results with: python scripts/summarize.py "$OUTPUT_ROOT"
#
# JOBS=N keeps up to N runs going at once; DEVICES="0 1 2 3" gives each run one entry of the list as its
# CUDA_VISIBLE_DEVICES (an entry "cpu" runs it with --device cpu). LIST=1 prints one command line per run,
# each a sweep of that run alone, for a job scheduler (scripts/slurm/sweep_array.sbatch), and runs nothing.
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
# Layers that take --K and --sampling_type (the sampling type only changes ConvNN layers; empty: none).
LAYERS=${LAYERS-ConvNNAttention}
K_VALUES=${K_VALUES:-"4 9 16"}
# A sampling type, or type:num_samples for random (candidates) and spatial (side of the grid).
SAMPLINGS=${SAMPLINGS:-"all random:32 spatial:6"}
# Layers run once each, for comparison (empty: none).
BASELINES=${BASELINES-Attention}
# --seed values: every setting is run once per seed, all settings of the first seed first.
SEEDS=${SEEDS:-0}
# Flags shared by every run.
EXTRA_FLAGS=${EXTRA_FLAGS:-"--resize 0 --patch_size 4 --num_layers 6 --augment --scheduler cosine --lr 5e-4"}
# Entries handed out to the runs as CUDA_VISIBLE_DEVICES, one run per entry at a time ("0 1", "0,1 2,3" for
# two GPUs per run, "0 0" for two runs on one GPU, "cpu" for a run with --device cpu; empty: none).
DEVICES=${DEVICES:-}
# Runs going at once; with DEVICES, by default one per entry.
read -r -a devices <<< "$DEVICES"
JOBS=${JOBS:-$(( ${#devices[@]} > 0 ? ${#devices[@]} : 1 ))}
# 1: print the plan (one command line per run) instead of running it.
LIST=${LIST:-}
# -----------------------------------------------------------------------------------------------

if [[ ! $JOBS =~ ^[1-9][0-9]*$ ]]; then
    echo "sweep.sh: JOBS=$JOBS: give the number of runs to keep going at once, a whole number from 1" >&2
    exit 2
fi
if (( ${#devices[@]} > 0 && JOBS > ${#devices[@]} )); then
    echo "sweep.sh: JOBS=$JOBS exceeds the ${#devices[@]} entries of DEVICES=\"$DEVICES\"; lower JOBS or" \
         "repeat entries (\"0 0\" runs two at once on device 0)" >&2
    exit 2
fi
read -r -a launcher <<< "$LAUNCHER"
read -r -a extra_flags <<< "$EXTRA_FLAGS"
# The processes each run starts: torchrun's --nproc_per_node times its --nnodes, 1 without torchrun. A finished
# run counts as this sweep's only with the global batch (--batch_size x processes) it records; where LAUNCHER
# does not say a whole number (--nproc_per_node gpu, --nnodes 1:4), the global batch is not compared.
launched_processes() {
    local per_node=1 nodes=1 i word
    for (( i = 0; i < ${#launcher[@]}; i++ )); do
        word=${launcher[i]}
        case $word in
            --nproc_per_node|--nproc-per-node) per_node=${launcher[i + 1]:-} ;;
            --nproc_per_node=*|--nproc-per-node=*) per_node=${word#*=} ;;
            --nnodes) nodes=${launcher[i + 1]:-} ;;
            --nnodes=*) nodes=${word#*=} ;;
        esac
    done
    [[ $per_node =~ ^[1-9][0-9]*$ && $nodes =~ ^[1-9][0-9]*$ ]] && echo $(( per_node * nodes ))
}
processes=$(launched_processes || true)
processes_check=()
[[ -n $processes ]] && processes_check=(--processes "$processes")
failed_runs=()
refused_runs=()
# Runs go in the background, their console only to their console.log, and the sweep's lines carry times,
# unless one run at a time on no particular device keeps today's foreground runs copied to the terminal.
in_background=
(( JOBS > 1 || ${#devices[@]} > 0 )) && in_background=1
if [[ -n $in_background && -z $LIST ]] && (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )); then
    echo "sweep.sh: JOBS and DEVICES need bash 5.1 or later (wait -n -p), this is bash $BASH_VERSION;" \
         "run the sweep with a newer bash or leave JOBS and DEVICES unset" >&2
    exit 2
fi
# The background runs in progress, by process id.
declare -A running_name=() running_device=() running_since=()
# The background runs that a signal stopped, named when the sweep stops.
interrupted_runs=()
free_devices=("${devices[@]}")

# Ctrl-C sends SIGINT to every process of the terminal's process group: the run in progress stops at
# its next step and writes its stop line. The script only notes the signal (bash runs the trap once
# the run has ended) and starts no further run.
stop_signal=
trap 'stop_signal=INT' INT
trap 'stop_signal=TERM' TERM

# stop_if_signalled WHEN: ends the sweep, naming WHEN ("during NAME"), once a signal has arrived. The runs
# in progress got the signal too (the sweep's process group did): the sweep waits for each to stop.
stop_if_signalled() {
    [[ -z $stop_signal ]] && return
    while (( ${#running_name[@]} > 0 )); do
        await_a_run
    done
    (( ${#interrupted_runs[@]} > 0 )) && set -- "during ${interrupted_runs[*]}"
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

# say EVENT NAME [DETAIL]: the sweep's line for one run event, with the time when runs go in the background.
say() {
    local line
    printf -v line '%-7s %s' "$1" "$2"
    [[ -n ${3:-} ]] && line+=" ($3)"
    [[ -n $in_background ]] && line="$(date '+%Y-%m-%d %H:%M:%S') $line"
    echo "$line"
}

# running_elsewhere DIRECTORY: whether a live process (another sweep, a cluster job) holds the directory's
# lock; prints its process id (0 when it has not written it yet).
running_elsewhere() {
    local owner
    [[ -e $1/.lock ]] || return 1
    owner=$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import run_files
owner = run_files.live_lock_owner(sys.argv[2])
print("" if owner is None else owner)' "$REPOSITORY" "$1") || return 1
    [[ -n $owner ]] && echo "$owner"
}

elsewhere_detail() {
    if (( $1 > 0 )); then
        echo "running elsewhere: process $1"
    else
        echo "running elsewhere"
    fi
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
    if difference=$("$PYTHON" "$REPOSITORY/scripts/check_run_args.py" "${processes_check[@]}" "$directory" "$state" \
                    "$@"); then
        return 1
    fi
    echo "sweep.sh: refused $directory: $difference; move the directory away or choose another OUTPUT_ROOT" >&2
}

# ended NAME DIRECTORY STATUS [SECONDS]: takes note of a run's exit status. A run stopped by a signal (exit
# code 130 or 143) stops the sweep too, also where the shell could not trap the signal (bash cannot trap a
# signal that was ignored when it started). A run refused because another process took its directory
# meanwhile is running elsewhere. A failed run is reported at the end instead of stopping the runs after it.
ended() {
    local name=$1 directory=$2 status=$3 took=${4:+, $4 s} owner
    case $status in
        0) [[ -n $in_background ]] && say done "$name" "${took#, }" ;;
        130) stop_signal=${stop_signal:-INT} ;;
        143) stop_signal=${stop_signal:-TERM} ;;
        *)
            if [[ -n $stop_signal ]]; then
                :
            elif (( status == 2 )) && owner=$(running_elsewhere "$directory"); then
                say skip "$name" "$(elsewhere_detail "$owner")"
            else
                failed_runs+=("$name")
                [[ -n $in_background ]] && say failed "$name" "exit code $status$took, see $directory/console.log"
            fi
            ;;
    esac
    if [[ -n $in_background && ( $status == 130 || $status == 143 ) ]]; then
        say stopped "$name" "exit code $status$took"
        interrupted_runs+=("$name")
    fi
    return 0
}

# await_a_run: waits for one background run to end (or for a signal), and takes note of it.
await_a_run() {
    local pid= status=0
    wait -n -p pid "${!running_name[@]}" || status=$?
    [[ -n ${pid:-} ]] || return 0  # a signal interrupted the wait (which unsets pid)
    local name=${running_name[$pid]}
    [[ -n ${running_device[$pid]+set} ]] && free_devices+=("${running_device[$pid]}")
    ended "$name" "$OUTPUT_ROOT/$name" "$status" $(( SECONDS - running_since[$pid] ))
    unset "running_name[$pid]" "running_device[$pid]" "running_since[$pid]"
}

# run_in_background EVENT NAME DIRECTORY FLAGS...: starts the run once a place (and a device) is free,
# reporting EVENT (start or resume).
run_in_background() {
    local event=$1 name=$2 directory=$3
    shift 3
    while (( ${#running_name[@]} >= JOBS )); do
        await_a_run
        stop_if_signalled "before $name"
    done
    local device_flags=() environment=() entry=
    if (( ${#free_devices[@]} > 0 )); then
        entry=${free_devices[0]}
        free_devices=("${free_devices[@]:1}")
        if [[ $entry == cpu ]]; then
            device_flags=(--device cpu)
            environment=(CUDA_VISIBLE_DEVICES=)
        else
            environment=("CUDA_VISIBLE_DEVICES=$entry")
        fi
    fi
    mkdir -p "$directory"
    say "$event" "$name" "${entry:+device $entry}"
    # A background command of a script ignores SIGINT; the run gets back the sweep's own disposition of it,
    # so that Ctrl-C (sent to the whole process group) reaches it also before training installs its handler.
    (
        trap - INT TERM
        exec env "${environment[@]}" "${launcher[@]}" "$REPOSITORY/vit_main.py" "$@" "${device_flags[@]}" \
            --output_dir "$directory" --resume auto >> "$directory/console.log" 2>&1
    ) &
    running_name[$!]=$name
    running_since[$!]=$SECONDS
    [[ -n $entry ]] && running_device[$!]=$entry
    return 0
}

# run NAME FLAGS...: trains one setting in OUTPUT_ROOT/NAME unless it has finished or another process holds it.
run() {
    local name=$1
    shift
    local directory="$OUTPUT_ROOT/$name"
    local flags=(--dataset "$DATASET" --device "$DEVICE" --num_epochs "$EPOCHS" "${extra_flags[@]}" "$@")
    if [[ -n $LIST ]]; then
        plan_line "$@"
        return
    fi
    stop_if_signalled "before $name"
    if holds_other_run "$directory" "${flags[@]}"; then
        say refuse "$name" "other flags, see stderr"
        refused_runs+=("$name")
        return
    fi
    if is_finished "$directory"; then
        say skip "$name" finished
        return
    fi
    local owner
    if owner=$(running_elsewhere "$directory"); then
        say skip "$name" "$(elsewhere_detail "$owner")"
        return
    fi
    local event=start
    [[ -f $directory/last.pt ]] && event=resume
    if [[ -n $in_background ]]; then
        run_in_background "$event" "$name" "$directory" "${flags[@]}"
        return
    fi
    mkdir -p "$directory"
    say "$event" "$name"
    local status=0
    "${launcher[@]}" "$REPOSITORY/vit_main.py" "${flags[@]}" --output_dir "$directory" --resume auto \
        2>&1 | copy_to_log "$directory/console.log" || status=${PIPESTATUS[0]}
    ended "$name" "$directory" "$status"
    stop_if_signalled "during $name"
}

# quoted VALUE: VALUE as one shell word, in single quotes where it holds anything but plain characters.
quoted() {
    if [[ $1 =~ ^[A-Za-z0-9_./:,=+@%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//"'"/"'\\''"}"
    fi
}

# absolute_path PATH: PATH from the root, taken relative to the working directory when it is not.
absolute_path() {
    if [[ $1 == /* ]]; then
        echo "$1"
    else
        local relative=$1
        while [[ $relative == ./* ]]; do
            relative=${relative#./}
        done
        echo "$PWD/$relative"
    fi
}

# plan_line FLAGS...: prints the command line of a sweep of this one run (its layer, K, sampling and seed
# from FLAGS), with every other setting of this sweep and absolute paths, to be run from any directory.
plan_line() {
    local layer= k= sampling= seed=
    while (( $# > 0 )); do
        case $1 in
            --layer) layer=$2 ;;
            --K) k=$2 ;;
            --sampling_type) sampling=$2 ;;
            --num_samples) [[ $2 == -1 ]] || sampling+=":$2" ;;
            --seed) seed=$2 ;;
        esac
        shift 2
    done
    # LIST, JOBS and DEVICES set to their defaults, so that a scheduler passing on the environment the plan
    # was made in does not make the line print a plan or pin the run to a device of its own choosing.
    local settings=(LIST= JOBS=1 DEVICES= PYTHON="$PYTHON" LAUNCHER="$LAUNCHER"
                    OUTPUT_ROOT="$(absolute_path "$OUTPUT_ROOT")" DATASET="$DATASET" EPOCHS="$EPOCHS" DEVICE="$DEVICE")
    if [[ -n $k ]]; then
        settings+=(LAYERS="$layer" K_VALUES="$k" SAMPLINGS="$sampling" BASELINES=)
    else
        settings+=(LAYERS= BASELINES="$layer")
    fi
    settings+=(SEEDS="$seed" EXTRA_FLAGS="$EXTRA_FLAGS")
    local line setting
    line="cd $(quoted "$PWD") &&"
    for setting in "${settings[@]}"; do
        line+=" ${setting%%=*}=$(quoted "${setting#*=}")"
    done
    echo "$line $(quoted "$REPOSITORY/scripts/sweep.sh")"
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

while (( ${#running_name[@]} > 0 )); do
    await_a_run
    stop_if_signalled "during ${running_name[*]}"
done
report_failed_and_refused_runs
(( ${#failed_runs[@]} + ${#refused_runs[@]} == 0 )) || exit 1
