"""Preemption: SIGUSR1 and SIGUSR2, which cluster schedulers send ahead of a preemption or a time limit, stop
a real training process as SIGTERM does, with exit code 128 + the signal number; with --checkpoint_steps the
stop itself writes a mid-epoch last.pt."""

import signal

import pytest

import checkpoints
import run_files
from tests.test_robustness import metric_rows, start, wait_for_epochs


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, code", [(signal.SIGUSR1, 138), (signal.SIGUSR2, 140)])
def test_preemption_signals_stop_like_sigterm(signal_number, code, tmp_path):
    assert 128 + signal_number == code  # Linux's numbers, which the documented codes are
    process = start(tmp_path, "--num_epochs", "50")
    wait_for_epochs(process, tmp_path, 1)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr
    last_line = stderr.rstrip().splitlines()[-1]
    assert last_line.startswith(f"vit_main.py: stopped by {signal.Signals(signal_number).name} at epoch ")
    assert last_line.endswith("continue with --resume auto")
    checkpoint = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert [int(row["epoch"]) for row in metric_rows(tmp_path)] == list(range(1, checkpoint["epoch"] + 1))
    assert not (tmp_path / run_files.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_preemption_with_checkpoint_steps_saves_the_step_it_stopped_at(tmp_path):
    process = start(tmp_path, "--num_epochs", "50", "--checkpoint_steps", "1000")
    wait_for_epochs(process, tmp_path, 1)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 138 and "Traceback" not in stderr
    checkpoint = checkpoints.load_checkpoint(tmp_path / "last.pt")
    in_epoch = checkpoint.get("in_epoch")
    last_line = stderr.rstrip().splitlines()[-1]
    if in_epoch is None:  # the signal came during an evaluation: the epoch's training is not saved there
        assert "last.pt and the results hold the completed epochs" in last_line
        return
    stopped_at = f"epoch {in_epoch['epoch']} train, step {in_epoch['batches']}/{in_epoch['batches_total']}"
    assert f"at {stopped_at}; last.pt holds the completed epochs and epoch {in_epoch['epoch']} train up to step " \
           f"{in_epoch['batches']}/{in_epoch['batches_total']}" in last_line
    assert in_epoch["epoch"] == checkpoint["epoch"] + 1 == len(metric_rows(tmp_path)) + 1
