"""The sweep script (skip finished runs, resume unfinished ones, start absent ones) and the summary
of output directories written by real short runs."""

import csv
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_files
import vit_main
from scripts import check_run_args, summarize
from tests.helpers import TINY_MODEL_FLAGS, Interrupted, interrupt_in_epoch, texts_outside_or_overlapping

REPOSITORY = Path(__file__).resolve().parents[1]
SWEEP = REPOSITORY / "scripts" / "sweep.sh"


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def interrupted_run(argv, monkeypatch):
    """Runs ``argv`` until it crashes in epoch 2: last.pt holds epoch 1 and no summary line is written."""
    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, 2)
        with pytest.raises(Interrupted):
            vit_main.main(argv)


# ---------------------------------------------------------------------------------------------
# sweep.sh
# ---------------------------------------------------------------------------------------------


def sweep_environment(output_root, **settings):
    return {**os.environ, "PYTHON": sys.executable, "OUTPUT_ROOT": str(output_root), "DATASET": "synthetic",
            "EPOCHS": "2", "DEVICE": "cpu", "LAYERS": "ConvNNAttention", "K_VALUES": "2 3 4", "SAMPLINGS": "all",
            "BASELINES": "", "EXTRA_FLAGS": " ".join(TINY_MODEL_FLAGS), "CONVNN_SYNTHETIC_SIZES": "200,100",
            # One thread: on a shared CPU, several threads per process slow a run down many times.
            "OMP_NUM_THREADS": "1", **settings}


def run_sweep(output_root) -> str:
    finished = subprocess.run(["bash", str(SWEEP)], env=sweep_environment(output_root), capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


@pytest.mark.slow
def test_sweep_skips_finished_runs_resumes_unfinished_ones_and_starts_absent_ones(tiny_argv, tmp_path,
                                                                                   monkeypatch):
    root = tmp_path / "sweep"
    # K=2 finished: a results file that ends with the summary line (its content is never read again).
    finished = root / "ConvNNAttention_K2_all_s0"
    finished.mkdir(parents=True)
    finished_results = "[Epoch 001] ...\nAverage Epoch Time: 1.0000s\nMax Accuracy: 50.0000% at epoch 1\n"
    (finished / "train_eval_results.txt").write_text(finished_results)
    # K=3 interrupted in epoch 2, with the flags the sweep passes; K=4 absent.
    unfinished = root / "ConvNNAttention_K3_all_s0"
    interrupted_run(tiny_argv(unfinished, "--layer", "ConvNNAttention", "--K", "3", "--num_epochs", "2"), monkeypatch)
    first_epoch = read_rows(unfinished / "metrics.csv")
    assert len(first_epoch) == 1

    output = run_sweep(root)
    assert "skip    ConvNNAttention_K2_all_s0 (finished)" in output
    assert "resume  ConvNNAttention_K3_all_s0" in output and "Resuming from" in output
    assert "start   ConvNNAttention_K4_all_s0" in output
    assert (finished / "train_eval_results.txt").read_text() == finished_results
    assert sorted(os.listdir(finished)) == ["train_eval_results.txt"]
    for name in ("ConvNNAttention_K3_all_s0", "ConvNNAttention_K4_all_s0"):
        assert summarize.is_finished(str(root / name))
        rows = read_rows(root / name / "metrics.csv")
        assert [row["epoch"] for row in rows] == ["1", "2"]
    assert read_rows(unfinished / "metrics.csv")[0] == first_epoch[0]

    again = run_sweep(root)
    assert again.count("skip    ") == 3 and "start" not in again and "resume" not in again


def wait_for(path, process, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.2)


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ctrl_c_once_training(sweep, directories):
    """Sends SIGINT to the sweep's process group (as Ctrl-C does) once every run of ``directories`` is training;
    returns the sweep's output. The group is killed if it is still there afterwards."""
    try:
        for directory in directories:
            wait_for(directory / "metrics.csv", sweep)
        os.killpg(sweep.pid, signal.SIGINT)
        return sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("start", [None, ignore_sigint], ids=["trapped", "ignored when the sweep started"])
def test_ctrl_c_stops_the_whole_sweep_and_its_stop_line_reaches_console_log(tmp_path, start):
    """Also where bash cannot trap SIGINT (it was ignored when bash started, as under some launchers):
    the run still stops on it (exit code 130), and that ends the sweep."""
    root = tmp_path / "sweep"
    first, second = root / "ConvNNAttention_K2_all_s0", root / "ConvNNAttention_K3_all_s0"
    # A new session, so that the test can signal the sweep's process group as a terminal does on Ctrl-C.
    sweep = subprocess.Popen(["bash", str(SWEEP)], env=sweep_environment(root, EPOCHS="1000", K_VALUES="2 3"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=start)
    stdout, stderr = ctrl_c_once_training(sweep, [first])
    assert sweep.returncode == 130, stdout + stderr
    assert "start   ConvNNAttention_K3_all_s0" not in stdout and not second.exists()
    assert "vit_main.py: stopped by SIGINT" in (first / "console.log").read_text()
    assert stderr.splitlines()[-1] == ("sweep.sh: stopped by SIGINT during ConvNNAttention_K2_all_s0; "
                                       "start the sweep again to continue")


def recording_python(path):
    """An executable at ``path`` that appends the command line it was started with to $CALLS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\necho "$0 $*" >> "$CALLS"\n')
    path.chmod(0o755)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("with_venv", [True, False], ids=["venv", "no venv"])
def test_python_defaults_to_the_projects_venv(tmp_path, with_venv):
    repository = tmp_path / "repository"
    (repository / "scripts").mkdir(parents=True)
    (repository / "scripts" / "sweep.sh").write_text(SWEEP.read_text())
    expected = recording_python(repository / ".venv" / "bin" / "python" if with_venv else tmp_path / "bin" / "python3")
    recording_python(tmp_path / "bin" / "python")  # never the bare name: it may be another Python or none
    environment = {name: value for name, value in sweep_environment(tmp_path / "sweep", K_VALUES="2").items()
                   if name not in ("PYTHON", "LAUNCHER")}
    environment.update(CALLS=str(tmp_path / "calls"), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    subprocess.run(["bash", str(repository / "scripts" / "sweep.sh")], env=environment, check=True,
                   capture_output=True, timeout=60)

    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith(f"{expected} {repository / 'vit_main.py'} --dataset synthetic")


def recording_sweep(tmp_path, launcher_arguments="", **settings):
    """Runs sweep.sh with a launcher that records its command lines instead of training; returns the finished
    process and the recorded calls. ``launcher_arguments`` follow the launcher in LAUNCHER, as torchrun's would."""
    launcher = recording_python(tmp_path / "bin" / "launcher")
    environment = {**sweep_environment(tmp_path / "sweep", **settings),
                   "LAUNCHER": f"{launcher} {launcher_arguments}".strip(), "CALLS": str(tmp_path / "calls")}
    finished = subprocess.run(["bash", str(SWEEP)], env=environment, capture_output=True, text=True, timeout=300)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return finished, calls


@pytest.mark.slow
def test_every_setting_runs_once_per_seed_in_a_directory_named_after_it(tmp_path):
    finished, calls = recording_sweep(tmp_path, SEEDS="0 7", K_VALUES="2", BASELINES="Attention")
    assert finished.returncode == 0, finished.stderr
    root = tmp_path / "sweep"
    expected = [("ConvNNAttention_K2_all_s0", "0"), ("Attention_s0", "0"), ("ConvNNAttention_K2_all_s7", "7"),
                ("Attention_s7", "7")]
    assert len(calls) == len(expected)
    for call, (name, seed) in zip(calls, expected):
        assert f" --seed {seed} --output_dir {root / name} --resume auto" in call, call


def sweep_run_arguments(directory, k, **changes):
    """args.txt as vit_main writes it for the sweep's run of ``k`` (sweep_environment's settings), changed by
    ``changes``."""
    flags = ["--dataset", "synthetic", "--device", "cpu", "--num_epochs", "2", *TINY_MODEL_FLAGS, "--layer",
             "ConvNNAttention", "--K", str(k), "--sampling_type", "all", "--num_samples", "-1", "--seed", "0",
             "--output_dir", str(directory), "--resume", "auto"]
    arguments = vars(vit_main.build_parser().parse_args(flags))
    directory.mkdir(parents=True)
    run_files.RunOutputs(str(directory)).write_args({**arguments, "data_path": os.path.abspath("Data"), **changes})


@pytest.mark.slow
def test_a_run_directory_trained_with_other_flags_is_refused_not_counted(tmp_path):
    root = tmp_path / "sweep"
    finished_line = "Average Epoch Time: 1.0000s\nMax Accuracy: 50.0000% at epoch 1\n"
    cases = {  # K: (finished, changed flags)
        2: (True, {"device": "cuda", "num_workers": 4}),  # where and how fast it ran: skipped as finished
        3: (True, {"dataset": "cifar10"}),  # another DATASET
        4: (True, {"num_epochs": 1}),  # a finished run of another length
        5: (False, {"augment": True}),  # EXTRA_FLAGS without --augment: vit_main would keep it on
        6: (False, {"num_epochs": 1}),  # vit_main continues it to the sweep's epochs, and records that
    }
    for k, (finished, changes) in cases.items():
        directory = root / f"ConvNNAttention_K{k}_all_s0"
        sweep_run_arguments(directory, k, **changes)
        if finished:
            (directory / "train_eval_results.txt").write_text(finished_line)

    result, calls = recording_sweep(tmp_path, K_VALUES="2 3 4 5 6")

    assert result.returncode == 1
    assert "skip    ConvNNAttention_K2_all_s0 (finished)" in result.stdout
    assert [call.split(" --output_dir ")[1].split()[0] for call in calls] == [str(root / "ConvNNAttention_K6_all_s0")]
    advice = "; move the directory away or choose another OUTPUT_ROOT"
    assert result.stderr.splitlines() == [
        f"sweep.sh: refused {root / 'ConvNNAttention_K3_all_s0'}: args.txt has --dataset cifar10, the sweep runs "
        f"--dataset synthetic{advice}",
        f"sweep.sh: refused {root / 'ConvNNAttention_K4_all_s0'}: args.txt has --num_epochs 1, the sweep runs "
        f"--num_epochs 2{advice}",
        f"sweep.sh: refused {root / 'ConvNNAttention_K5_all_s0'}: args.txt has --augment True, the sweep runs "
        f"--augment False{advice}",
        "refused: ConvNNAttention_K3_all_s0 ConvNNAttention_K4_all_s0 ConvNNAttention_K5_all_s0",
    ]


@pytest.mark.slow
def test_a_finished_run_of_another_global_batch_is_refused(tmp_path):
    # One process trained it; the sweep's launcher starts two per run, which doubles the global batch.
    root = tmp_path / "sweep"
    directory = root / "ConvNNAttention_K2_all_s0"
    sweep_run_arguments(directory, 2, processes=1, global_batch=64)
    (directory / "train_eval_results.txt").write_text("Average Epoch Time: 1.0000s\nMax Accuracy: 50.0000% at "
                                                       "epoch 1\n")
    result, _ = recording_sweep(tmp_path, "--nproc_per_node 2", K_VALUES="2")
    assert result.returncode == 1
    assert "args.txt has --global_batch 64, the sweep runs --global_batch 128" in result.stderr
    # The same directory counts as finished for a sweep of one process per run.
    result, calls = recording_sweep(tmp_path, K_VALUES="2")
    assert result.returncode == 0 and "skip    ConvNNAttention_K2_all_s0 (finished)" in result.stdout and not calls


def test_the_check_compares_only_what_decides_the_result(tmp_path):
    planned = check_run_args.parsed_values(["--lr", "0.01", "--K", "4"])
    stored = {**planned, "device": "cpu", "num_workers": "0", "data_path": "/data", "output_dir": "/elsewhere"}
    assert check_run_args.differing_flags(stored, planned, finished=True) == []
    del stored["softmax_topk_val"]  # an older args.txt: the flag did not exist, it ran as its default does
    assert check_run_args.differing_flags(stored, planned, finished=True) == []
    stored.update(num_epochs="3", batch_size="128")
    assert check_run_args.differing_flags(stored, planned, finished=False) == []
    assert check_run_args.differing_flags(stored, planned, finished=True) == ["batch_size", "num_epochs"]
    stored.update(num_epochs="150", batch_size="256", lr="0.001", new_flag="1")
    names = check_run_args.differing_flags(stored, planned, finished=True)
    assert names == ["lr", "new_flag"]
    assert check_run_args.difference_line(stored, planned, names) == (
        "args.txt has --lr 0.001, the sweep runs --lr 0.01 (and --new_flag differ too)")
    assert check_run_args.difference_line(stored, planned, ["new_flag"]) == (
        "args.txt has --new_flag 1, which this vit_main.py does not know")
    del stored["K"]
    assert check_run_args.differing_flags(stored, planned, finished=True) == ["K", "lr", "new_flag"]
    assert check_run_args.difference_line(stored, planned, ["K"]) == "args.txt has no --K, the sweep runs --K 4"


def test_a_damaged_args_txt_is_refused_with_its_reason(tmp_path, capsys):
    (tmp_path / "args.txt").write_text("K=4\n")
    assert check_run_args.main([str(tmp_path), "finished", "--K", "4"]) == 1
    assert capsys.readouterr().out == "args.txt line 1 is not 'name: value': 'K=4'\n"


# ---------------------------------------------------------------------------------------------
# sweep.sh: several runs at once (JOBS, DEVICES), the plan for a scheduler (LIST), runs held elsewhere
# ---------------------------------------------------------------------------------------------


def timed_launcher(path):
    """A launcher that stands for a run of ``FAKE_SECONDS`` (default 1): it appends to $CALLS one line when it
    begins (time, CUDA_VISIBLE_DEVICES, its arguments) and one when it ends, and stops on SIGTERM with
    vit_main's exit code 143."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '#!/bin/bash\n'
        'name=$(basename "${@: -3:1}")\n'
        'echo "begin $name $(date +%s.%N) devices=${CUDA_VISIBLE_DEVICES-unset} $*" >> "$CALLS"\n'
        'trap \'echo "stopped $name $(date +%s.%N)" >> "$CALLS"; exit 143\' TERM\n'
        'sleep "${FAKE_SECONDS:-1}" & wait\n'
        'echo "end $name $(date +%s.%N)" >> "$CALLS"\n')
    path.chmod(0o755)
    return path


def timed_sweep_environment(tmp_path, **settings):
    return {**sweep_environment(tmp_path / "sweep", **settings), "CALLS": str(tmp_path / "calls"),
            "LAUNCHER": str(timed_launcher(tmp_path / "bin" / "launcher"))}


def run_events(calls_path):
    """{run name: {"begin": seconds, "end" or "stopped": seconds, "devices": ..., "arguments": ...}}."""
    events = {}
    for line in calls_path.read_text().splitlines():
        kind, name, seconds, *rest = line.split(" ", 3)
        record = events.setdefault(name, {})
        record[kind] = float(seconds)
        if kind == "begin":
            devices, arguments = rest[0].split(" ", 1)
            record.update(devices=devices.split("=", 1)[1], arguments=arguments)
    return events


def most_at_once(events):
    """The largest number of runs whose [begin, end] intervals overlap at one instant."""
    changes = sorted([(record["begin"], 1) for record in events.values()]
                     + [(record.get("end", record.get("stopped")), -1) for record in events.values()])
    running = most = 0
    for _, change in changes:
        running += change
        most = max(most, running)
    return most


def test_jobs_keeps_that_many_runs_going_and_reports_each_with_its_time(tmp_path):
    environment = timed_sweep_environment(tmp_path, JOBS="2", K_VALUES="2 3 4 5")
    finished = subprocess.run(["bash", str(SWEEP)], env=environment, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stdout + finished.stderr

    events = run_events(tmp_path / "calls")
    assert sorted(events) == [f"ConvNNAttention_K{k}_all_s0" for k in (2, 3, 4, 5)]
    assert all("end" in record for record in events.values())
    assert most_at_once(events) == 2
    lines = finished.stdout.splitlines()
    assert len(lines) == 8  # a start and a done line per run
    for k in (2, 3, 4, 5):
        (start,) = [line for line in lines if f" start   ConvNNAttention_K{k}_all_s0" in line]
        (done,) = [line for line in lines if f" done    ConvNNAttention_K{k}_all_s0 (" in line]
        for line in (start, done):
            time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
    # The runs' console goes to their console.log alone: the sweep's own lines stay one per event.
    assert (tmp_path / "sweep" / "ConvNNAttention_K2_all_s0" / "console.log").exists()


def test_each_run_gets_a_free_entry_of_devices_and_cpu_entries_run_on_the_cpu(tmp_path):
    environment = timed_sweep_environment(tmp_path, DEVICES="0 cpu", DEVICE="cuda", K_VALUES="2 3 4 5")
    finished = subprocess.run(["bash", str(SWEEP)], env=environment, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stdout + finished.stderr

    events = run_events(tmp_path / "calls")
    assert most_at_once(events) == 2  # JOBS defaults to the number of entries
    for name, record in events.items():
        on_cpu = record["devices"] == ""
        assert record["devices"] in ("0", "")
        assert record["arguments"].endswith(f"--device cpu --output_dir {tmp_path / 'sweep' / name} --resume auto") \
            == on_cpu, record
        assert f"start   {name} (device {'cpu' if on_cpu else '0'})" in finished.stdout
        others = [other for other_name, other in events.items() if other_name != name
                  and other["begin"] < record["end"] and record["begin"] < other["end"]]
        assert all(other["devices"] != record["devices"] for other in others), events


@pytest.mark.parametrize("settings, message", [
    ({"JOBS": "0"}, "sweep.sh: JOBS=0: give the number of runs to keep going at once, a whole number from 1"),
    ({"JOBS": "two"}, "sweep.sh: JOBS=two: give the number of runs to keep going at once, a whole number from 1"),
    ({"JOBS": "3", "DEVICES": "0 1"}, 'sweep.sh: JOBS=3 exceeds the 2 entries of DEVICES="0 1"; lower JOBS or '
                                      'repeat entries ("0 0" runs two at once on device 0)'),
])
def test_a_bad_jobs_value_is_one_line_and_exit_code_2(tmp_path, settings, message):
    finished = subprocess.run(["bash", str(SWEEP)], env=timed_sweep_environment(tmp_path, **settings),
                              capture_output=True, text=True, timeout=60)
    assert (finished.returncode, finished.stderr, finished.stdout) == (2, message + "\n", "")
    assert not (tmp_path / "calls").exists()


def test_sigterm_to_the_sweeps_process_group_stops_every_run_in_progress_and_the_sweep(tmp_path):
    environment = timed_sweep_environment(tmp_path, JOBS="2", K_VALUES="2 3 4", FAKE_SECONDS="60")
    sweep = subprocess.Popen(["bash", str(SWEEP)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(run_events(tmp_path / "calls") if (tmp_path / "calls").exists() else {}) < 2:
            assert time.monotonic() < deadline and sweep.poll() is None
            time.sleep(0.1)
        time.sleep(0.2)  # both launchers have installed their trap
        os.killpg(sweep.pid, signal.SIGTERM)
        stdout, stderr = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 143, stdout + stderr
    events = run_events(tmp_path / "calls")
    assert sorted(events) == ["ConvNNAttention_K2_all_s0", "ConvNNAttention_K3_all_s0"]
    assert all("stopped" in record for record in events.values())
    assert "ConvNNAttention_K4_all_s0" not in stdout
    # The runs are named in the order they stopped.
    assert stderr.splitlines()[-1] in [f"sweep.sh: stopped by SIGTERM during {first} {second}; start the sweep again "
                                       "to continue" for first, second in itertools.permutations(sorted(events))]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_run_held_by_a_live_process_is_skipped_as_running_elsewhere(tmp_path, jobs):
    held = tmp_path / "sweep" / "ConvNNAttention_K2_all_s0"
    held.mkdir(parents=True)
    lock = run_files.OutputLock(str(held))
    lock.acquire()
    try:
        finished = subprocess.run(["bash", str(SWEEP)], env=timed_sweep_environment(tmp_path, JOBS=jobs),
                                  capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"skip    ConvNNAttention_K2_all_s0 (running elsewhere: process {os.getpid()})" in finished.stdout
    assert sorted(run_events(tmp_path / "calls")) == ["ConvNNAttention_K3_all_s0", "ConvNNAttention_K4_all_s0"]


def test_list_prints_one_command_per_run_that_does_what_the_sweep_would_and_runs_nothing(tmp_path):
    settings = dict(SEEDS="0 1", K_VALUES="2 3", SAMPLINGS="all random:4", BASELINES="Attention", OUTPUT_ROOT="out",
                    FAKE_SECONDS="0", EXTRA_FLAGS=" ".join(TINY_MODEL_FLAGS) + " --note it's")
    planner = tmp_path / "planner"
    planner.mkdir()
    environment = timed_sweep_environment(tmp_path, **settings)
    plan = subprocess.run(["bash", str(SWEEP)], env={**environment, "LIST": "1"}, cwd=planner, capture_output=True,
                          text=True, timeout=60, check=True).stdout.splitlines()
    assert len(plan) == 2 * (2 * 2 + 1)
    assert os.listdir(planner) == [] and not (tmp_path / "calls").exists()
    assert all(line.startswith(f"cd {planner} && ") and f" OUTPUT_ROOT={planner / 'out'} " in line for line in plan)

    # Each line, run from elsewhere with another environment, runs the sweep's command for its run alone.
    elsewhere = {"PATH": os.environ["PATH"], "CALLS": str(tmp_path / "plan_calls"), "JOBS": "4", "LIST": "1"}
    for line in plan:
        subprocess.run(["bash", "-c", line], env=elsewhere, cwd=tmp_path, capture_output=True, timeout=60, check=True)
    subprocess.run(["bash", str(SWEEP)], env={**environment, "OUTPUT_ROOT": str(planner / "out")}, cwd=planner,
                   capture_output=True, timeout=60, check=True)
    sweep_calls = [line.split(" ", 3)[3] for line in (tmp_path / "calls").read_text().splitlines()
                   if line.startswith("begin ")]
    plan_calls = [line.split(" ", 3)[3] for line in (tmp_path / "plan_calls").read_text().splitlines()
                  if line.startswith("begin ")]
    assert plan_calls == sweep_calls and len(sweep_calls) == len(plan)
    assert plan_calls[-2].endswith(f"--note it's --layer ConvNNAttention --K 3 --sampling_type random --num_samples 4 "
                                   f"--seed 1 --output_dir {planner / 'out' / 'ConvNNAttention_K3_random4_s1'} "
                                   "--resume auto")


@pytest.mark.slow
def test_ctrl_c_stops_every_run_of_a_parallel_sweep_each_with_its_stop_line(tmp_path):
    """Real tiny runs, two at once: each writes its stop line to its console.log, and no third run starts."""
    root = tmp_path / "sweep"
    environment = sweep_environment(root, JOBS="2", EPOCHS="1000", K_VALUES="2 3 4")
    sweep = subprocess.Popen(["bash", str(SWEEP)], env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    running = [root / "ConvNNAttention_K2_all_s0", root / "ConvNNAttention_K3_all_s0"]
    stdout, stderr = ctrl_c_once_training(sweep, running)
    assert sweep.returncode == 130, stdout + stderr
    for directory in running:
        assert "vit_main.py: stopped by SIGINT" in (directory / "console.log").read_text()
        assert f" stopped {directory.name} (exit code 130, " in stdout
    assert "ConvNNAttention_K4_all_s0" not in stdout and not (root / "ConvNNAttention_K4_all_s0").exists()
    assert stderr.splitlines()[-1].startswith("sweep.sh: stopped by SIGINT during ConvNNAttention_K")


# ---------------------------------------------------------------------------------------------
# summarize.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def run_directories(tiny_argv, tmp_path, monkeypatch):
    """Three finished runs (one nested a level deeper), one unfinished, and a directory with no run.
    Few epochs keep it quick: 2 for K2, 1 for the others."""
    root = tmp_path / "sweep"
    convnn = ["--layer", "ConvNNAttention", "--num_epochs", "2"]
    vit_main.main(tiny_argv(root / "K2", *convnn, "--K", "2"))
    vit_main.main(tiny_argv(root / "K4", *convnn, "--K", "4", "--convolution_type", "standard", "--num_epochs", "1"))
    interrupted_run(tiny_argv(root / "K3_random", *convnn, "--K", "3", "--sampling_type", "random",
                              "--num_samples", "8"), monkeypatch)
    vit_main.main(tiny_argv(root / "baselines" / "Attention", "--layer", "Attention", "--num_epochs", "1"))
    (root / "notes").mkdir()
    (root / "notes" / "plan.txt").write_text("not a run\n")
    return root


def test_summary_table_and_plots(run_directories, tmp_path, capsys):
    out_dir = tmp_path / "summary"
    assert summarize.main([str(run_directories), "--out_dir", str(out_dir)]) == 0
    printed = capsys.readouterr()
    assert "notes: not a run directory" in printed.err

    rows = {row["run"]: row for row in read_rows(out_dir / "summary.csv")}
    assert list(read_rows(out_dir / "summary.csv")[0]) == summarize.CSV_COLUMNS
    assert sorted(rows) == ["K2", "K3_random", "K4", os.path.join("baselines", "Attention")]
    for name, row in rows.items():
        metrics = read_rows(run_directories / name / "metrics.csv")
        top1 = [float(record["test_top1"]) for record in metrics]
        assert float(row["best_top1"]) == max(top1) and float(row["final_top1"]) == top1[-1]
        assert int(row["best_epoch"]) == top1.index(max(top1)) + 1
        seconds = [float(record["epoch_seconds"]) for record in metrics]
        assert float(row["average_epoch_seconds"]) == pytest.approx(sum(seconds) / len(seconds))
        summary = (run_directories / name / "model.txt").read_text()
        assert f"Total parameters: {int(row['parameters']):,}" in summary
        assert f"forward): {row['gflops']}" in summary

    assert [rows[name]["finished"] for name in ("K2", "K3_random", "K4")] == ["True", "False", "True"]
    assert rows["K3_random"]["epochs"] == "1/2" and rows["K3_random"]["sampling"] == "random:8"
    assert (rows["K4"]["K"], rows["K4"]["convolution_type"], rows["K4"]["sampling"]) == ("4", "standard", "all")
    attention = rows[os.path.join("baselines", "Attention")]
    assert (attention["K"], attention["sampling"], attention["convolution_type"]) == ("-", "-", "-")

    table = (out_dir / "summary.md").read_text()
    assert "| K2 | ConvNNAttention | 2 | all | depthwise |" not in printed.out  # the terminal gets the compact table
    assert "K3_random*" in printed.out
    assert "| K3_random* | ConvNNAttention | 3 | random:8 | depthwise |" in table
    assert "| K2 | ConvNNAttention | 2 | all | depthwise |" in table
    assert "* unfinished run" in table
    for plot in ("top1_vs_epoch.png", "best_top1_vs_K.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_nothing_is_an_error(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err


# Damaged or partial files: each bad run is skipped with one line, the others are summarised.

RUN_ARGS = {"layer": "ConvNNAttention", "K": 4, "sampling_type": "all", "num_samples": -1,
            "convolution_type": "depthwise", "num_epochs": 5}


def epoch_record(epoch, test_top1):
    return {"epoch": epoch, "lr": 0.001, "train_loss": 1.5, "train_top1": 40.0, "train_top5": 90.0, "test_loss": 1.25,
            "test_top1": test_top1, "test_top5": 95.0, "epoch_seconds": 2.0, "images_per_second": 100.0}


def written_run(directory, top1s=(50.0, 87.5, 62.5), **arguments):
    """A run directory as vit_main writes it (args.txt, model.txt, metrics.csv), with one epoch per top-1."""
    directory.mkdir(parents=True)
    outputs = run_files.RunOutputs(str(directory))
    outputs.write_args({**RUN_ARGS, **arguments})
    (directory / "model.txt").write_text("ViT()\n\nTotal parameters: 1,234\nGFLOPs per image (32x32, forward): 0.5\n")
    outputs.start_logs([epoch_record(epoch, top1) for epoch, top1 in enumerate(top1s, start=1)])
    return directory


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def summarise_root(root, out_dir, capsys):
    """summarize.main over ``root``; returns the CSV rows by run and the lines printed on stderr."""
    assert summarize.main([str(root), "--out_dir", str(out_dir)]) == 0
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return {row["run"]: row for row in read_rows(out_dir / "summary.csv")}, stderr.splitlines()


METRICS_HEADER = ",".join(run_files.METRIC_COLUMNS)
DAMAGES = {
    "row missing columns": ("metrics.csv", "87.5,95.0,2.0,100.0", "87.5", "metrics.csv line 3: 7 values for 10 columns"),
    "row with extra columns": ("metrics.csv", "87.5,", "87.5,1,", "metrics.csv line 3: 11 values for 10 columns"),
    "non-numeric value": ("metrics.csv", "1.25,87.5,", "1.25,eighty,", "metrics.csv line 3: test_top1 is 'eighty'"),
    "empty value": ("metrics.csv", "1.25,87.5,", "1.25,,", "metrics.csv line 3: test_top1 is ''"),
    "accuracy above 100": ("metrics.csv", "1.25,87.5,", "1.25,875.0,", "metrics.csv line 3: test_top1 is 875.0"),
    "epoch missing": ("metrics.csv", "\n2,", "\n3,", "metrics.csv: epoch 3 on line 3, expected 2"),
    "fractional epoch": ("metrics.csv", "\n2,", "\n2.5,", "metrics.csv: epoch 2.5 on line 3, expected 2"),
    "blank line": ("metrics.csv", "\n2,", "\n\n2,", "metrics.csv line 3: 0 values for 10 columns"),
    "empty metrics.csv": ("metrics.csv", None, "", "metrics.csv is empty"),
    "header lacks a column": ("metrics.csv", ",test_top1,", ",top1,", "metrics.csv: its header lacks test_top1"),
    "header only, cut short": ("metrics.csv", None, METRICS_HEADER[:20], "metrics.csv: its header line is cut short"),
    "not UTF-8": ("metrics.csv", None, b"epoch\xff\n", "metrics.csv is not UTF-8 text"),
    "args.txt line without ': '": ("args.txt", "K: 4", "K=4", "args.txt line 2 is not 'name: value': 'K=4'"),
    "args.txt K not a number": ("args.txt", "K: 4", "K: four", "args.txt: K is 'four', not an integer"),
    "args.txt num_epochs not a number": ("args.txt", "num_epochs: 5", "num_epochs: 5.5",
                                         "args.txt: num_epochs is '5.5', not an integer"),
    "args.txt seed not a number": ("args.txt", "num_epochs: 5\n", "num_epochs: 5\nseed: one\n",
                                   "args.txt: seed is 'one', not an integer"),
    "args.txt cut short": ("args.txt", "num_epochs: 5\n", "num_epochs: ", "args.txt: its last line is cut short"),
    "args.txt empty": ("args.txt", None, "", "args.txt is empty"),
    "args.txt repeats a name": ("args.txt", "K: 4\n", "K: 4\nK: 9\n", "args.txt line 3 repeats K"),
    "model.txt GFLOPs not a number": ("model.txt", "forward): 0.5", "forward): half",
                                      "model.txt: GFLOPs is 'half', not a number"),
}


@pytest.mark.parametrize("file, old, new, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_run_is_skipped_with_one_line_naming_it_and_the_reason(tmp_path, capsys, file, old, new, reason):
    root = tmp_path / "sweep"
    written_run(root / "good")
    bad = written_run(root / "bad")
    path = bad / file
    if old is None:
        (path.write_bytes if isinstance(new, bytes) else path.write_text)(new)
    else:
        edit(path, old, new)

    rows, stderr = summarise_root(root, tmp_path / "summary", capsys)

    assert sorted(rows) == ["good"]
    assert float(rows["good"]["best_top1"]) == 87.5
    assert stderr == [f"summarize.py: skipped {bad}: {reason}"] or (
        len(stderr) == 1 and stderr[0].startswith(f"summarize.py: skipped {bad}: {reason}")), stderr


def test_a_last_line_without_its_line_end_is_dropped_with_a_note(tmp_path, capsys):
    """The writer appends whole lines, each with its line end: a last line without one was still being written
    (or the write was killed), and its last number may be cut short, as 87.5 to 8."""
    root = tmp_path / "sweep"
    in_progress = written_run(root / "in_progress", top1s=(50.0, 62.5))
    with open(in_progress / "metrics.csv", "a") as handle:
        handle.write("3,0.001,1.5,40.0,90.0,1.25,8")  # test_top1 87.5 cut short: too few columns
    cut_in_last_column = written_run(root / "cut_in_last_column", top1s=(50.0, 62.5))
    with open(cut_in_last_column / "metrics.csv", "a") as handle:
        handle.write("3,0.001,1.5,40.0,90.0,1.25,87.5,95.0,4.0,1")  # images_per_second 100.0 cut short

    rows, stderr = summarise_root(root, tmp_path / "summary", capsys)

    for name, directory in (("in_progress", in_progress), ("cut_in_last_column", cut_in_last_column)):
        assert (rows[name]["epochs"], rows[name]["best_top1"], rows[name]["final_top1"]) == ("2/5", "62.5", "62.5")
        assert float(rows[name]["average_epoch_seconds"]) == 2.0
        assert (f"summarize.py: {directory}: ignored the last line of metrics.csv, cut short (no line end): "
                f"an epoch being written, or a write that was killed") in stderr
    assert len(stderr) == 2


def test_a_run_with_no_finished_epoch_is_listed_with_no_numbers(tmp_path, capsys):
    root = tmp_path / "sweep"
    written_run(root / "started", top1s=())
    rows, stderr = summarise_root(root, tmp_path / "summary", capsys)
    assert (rows["started"]["epochs"], rows["started"]["best_top1"], rows["started"]["finished"]) == ("0/5", "", "False")
    assert stderr == []


def test_the_summary_goes_to_its_own_folder_by_default(tmp_path, capsys, monkeypatch):
    run = written_run(tmp_path / "runs" / "one")
    before = sorted(os.listdir(run))
    monkeypatch.chdir(tmp_path)
    assert summarize.main([str(run)]) == 0
    assert sorted(os.listdir(run)) == before
    assert sorted(os.listdir(tmp_path / "summary")) == ["best_top1_vs_K.png", "groups.csv", "summary.csv", "summary.md",
                                                        "top1_vs_epoch.png"]


def test_accuracy_axes_stop_at_100_and_titles_fit(tmp_path, capsys, saved_figures):
    root = tmp_path / "sweep"
    written_run(root / "ConvNNAttention_K4_all_with_a_name_long_enough_to_need_room", top1s=(99.0, 100.0))
    written_run(root / "ConvNNAttention_K9_random32", K=9, sampling_type="random", num_samples=32, top1s=(98.0, 99.9))
    written_run(root / "Attention", layer="Attention", top1s=(99.5, 99.95))
    summarise_root(root, tmp_path / "summary", capsys)

    assert len(saved_figures) == 2
    for figure, dpi in saved_figures:
        (axes,) = figure.axes
        assert axes.get_ylim()[1] <= 100
        assert texts_outside_or_overlapping(figure, dpi) == ([], [])
