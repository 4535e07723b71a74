"""The Slurm templates of scripts/slurm against a real Slurm (skipped where there is none): a job array over a
sweep plan runs each line once, and a task stopped ahead of its time limit is requeued and continued."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_sweep import SWEEP, sweep_environment

REPOSITORY = Path(__file__).resolve().parents[1]
ARRAY = REPOSITORY / "scripts" / "slurm" / "sweep_array.sbatch"


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slurm_answers(), reason="needs a running Slurm (sbatch)")]


def stoppable_launcher(path):
    """A launcher that stands for a run: its first start in a directory waits to be stopped (SIGTERM: exit code
    143, as vit_main), a later start finishes at once; each start and end goes to $CALLS as one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '#!/bin/bash\n'
        'directory=${@: -3:1}\n'
        'name=$(basename "$directory")\n'
        'echo "begin $name" >> "$CALLS"\n'
        'if [[ ! -e $directory/started ]]; then\n'
        '    touch "$directory/started"\n'
        '    trap \'echo "stopped $name" >> "$CALLS"; exit 143\' TERM\n'
        '    sleep "${FAKE_SECONDS:-0}" & wait\n'
        'fi\n'
        'echo "end $name" >> "$CALLS"\n')
    path.chmod(0o755)
    return path


def write_plan(tmp_path, **settings):
    environment = {**sweep_environment(tmp_path / "sweep", **settings), "LIST": "1",
                   "LAUNCHER": str(stoppable_launcher(tmp_path / "bin" / "launcher"))}
    plan = subprocess.run(["bash", str(SWEEP)], env=environment, capture_output=True, text=True, check=True,
                          timeout=60).stdout
    (tmp_path / "plan.txt").write_text(plan)
    return plan.splitlines()


def submit(tmp_path, lines, *options, **environment):
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--time=10", f"--array=0-{lines - 1}", *options, str(ARRAY),
         str(tmp_path / "plan.txt")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "CALLS": str(tmp_path / "calls"), **environment})
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def job_field(job, field):
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.search(rf"\b{field}=(\S+)", shown)
    return found.group(1) if found else None


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(1)


def calls(tmp_path):
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_each_array_task_runs_its_line_of_the_plan(tmp_path):
    lines = write_plan(tmp_path, K_VALUES="2 3")
    array = submit(tmp_path, len(lines), "--wait")
    assert sorted(calls(tmp_path)) == sorted(f"{event} ConvNNAttention_K{k}_all_s0" for k in (2, 3)
                                             for event in ("begin", "end"))
    for task in (0, 1):
        output = (tmp_path / f"slurm-{array}_{task}.out").read_text()
        assert "stopped before the time limit" not in output and "the run ended with exit code 0" in output


def preempted_task(tmp_path, max_requeues):
    """Submits a one-line plan whose run waits to be stopped, and sends its batch script SIGUSR1 as Slurm does
    ahead of the time limit; returns the task's job id."""
    write_plan(tmp_path, K_VALUES="2")
    array = submit(tmp_path, 1, MAX_REQUEUES=str(max_requeues), FAKE_SECONDS="600")
    task = f"{array}_0"
    wait_until(lambda: calls(tmp_path) == ["begin ConvNNAttention_K2_all_s0"], 120, "start of the run")
    time.sleep(1)  # the launcher has installed its trap
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=60)
    return task


def test_a_task_stopped_ahead_of_its_time_limit_is_requeued_and_continues(tmp_path):
    task = preempted_task(tmp_path, max_requeues=1)
    # Slurm holds a requeued job back for a while (its BeginTime) before it starts it again.
    wait_until(lambda: job_field(task, "JobState") == "COMPLETED", 600, "completed requeued task")
    assert calls(tmp_path) == ["begin ConvNNAttention_K2_all_s0", "stopped ConvNNAttention_K2_all_s0",
                               "begin ConvNNAttention_K2_all_s0", "end ConvNNAttention_K2_all_s0"]
    assert job_field(task, "Restarts") == "1"
    output = next(tmp_path.glob("slurm-*_0.out")).read_text()
    assert "the run ended with exit code 143" in output and "requeued to continue" in output
    assert "start 2 at" in output


def test_a_task_past_its_requeues_ends_stopped(tmp_path):
    task = preempted_task(tmp_path, max_requeues=0)
    wait_until(lambda: job_field(task, "JobState") not in ("RUNNING", "PENDING", "COMPLETING"), 120, "end of task")
    assert job_field(task, "JobState") == "FAILED" and job_field(task, "ExitCode") == "143:0"
    assert calls(tmp_path) == ["begin ConvNNAttention_K2_all_s0", "stopped ConvNNAttention_K2_all_s0"]
    assert "after 0 requeues; not requeued" in next(tmp_path.glob("slurm-*_0.out")).read_text()
