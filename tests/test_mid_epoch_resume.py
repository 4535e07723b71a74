"""Checkpoints inside an epoch (--checkpoint_steps): a run stopped part-way through an epoch, by a signal or
killed, continues from the last saved step and ends exactly as a run never stopped (CPU)."""

import os
import signal

import pytest
import torch

import checkpoints
import train_eval
import vit_main
from tests.helpers import DETERMINISTIC_COLUMNS, Interrupted, expect_one_line_error, read_metrics, results_lines

# 200 synthetic training images in batches of 32: 7 steps an epoch (5 with --val_split 0.2).
FLAGS = ["--batch_size", "32", "--num_epochs", "2", "--seed", "5"]
RECIPE = ["--val_split", "0.2", "--augment", "--mixup", "0.8", "--cutmix", "1.0", "--random_erasing", "0.25"]
LOADERS = {"workers": ["--data_loader", "workers", "--num_workers", "0"], "device": ["--data_loader", "device"]}


def at_optimizer_step(monkeypatch, number, action):
    """Calls ``action`` right after the run's ``number``-th optimiser step (counted over all epochs)."""
    optimizer_step = train_eval.Trainer._optimizer_step
    calls = {"count": 0}

    def counted(self):
        optimizer_step(self)
        calls["count"] += 1
        if calls["count"] == number:
            action()

    monkeypatch.setattr(train_eval.Trainer, "_optimizer_step", counted)


def send(signal_number):
    return lambda: os.kill(os.getpid(), signal_number)


def kill():
    raise Interrupted


def assert_same_run(expected_dir, actual_dir):
    expected, actual = read_metrics(expected_dir), read_metrics(actual_dir)
    assert [row["epoch"] for row in actual] == [row["epoch"] for row in expected]
    for expected_row, actual_row in zip(expected, actual, strict=True):
        for column in DETERMINISTIC_COLUMNS + [name for name in expected_row if name.startswith(("val_", "ema_"))]:
            assert actual_row[column] == expected_row[column], column
    expected_weights = checkpoints.load_checkpoint(expected_dir / "last.pt")["model"]
    actual_weights = checkpoints.load_checkpoint(actual_dir / "last.pt")["model"]
    assert all(torch.equal(expected_weights[name], actual_weights[name]) for name in expected_weights)


def straight_and_stopped(tiny_argv, tmp_path, flags):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    vit_main.main(tiny_argv(straight, *FLAGS, *flags))
    return straight, stopped, tiny_argv(stopped, *FLAGS, *flags)


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("recipe", [[], RECIPE], ids=["plain", "val_split_and_augmentation"])
def test_a_signal_mid_epoch_saves_the_step_and_the_resumed_run_ends_as_a_straight_one(
        loader, recipe, tiny_argv, tmp_path, capsys, monkeypatch):
    straight, stopped, argv = straight_and_stopped(tiny_argv, tmp_path, [*LOADERS[loader], *recipe])
    steps = 5 if recipe else 7
    with monkeypatch.context() as patch:
        at_optimizer_step(patch, steps + 3, send(signal.SIGUSR1))  # the third step of epoch 2
        line = expect_one_line_error(capsys, [*argv, "--checkpoint_steps", "2"], 138, "stopped by SIGUSR1")
    assert f"at epoch 2 train, step 3/{steps}; last.pt holds the completed epochs and epoch 2 train up to step " \
           f"3/{steps}: continue with --resume auto" in line
    last = checkpoints.load_checkpoint(stopped / "last.pt")
    assert last["epoch"] == 1 and (last["in_epoch"]["epoch"], last["in_epoch"]["batches"]) == (2, 3)
    assert len(read_metrics(stopped)) == 1 and len(results_lines(stopped)) == 1  # whole epochs only
    vit_main.main([*argv, "--checkpoint_steps", "2", "--resume", "auto"])
    assert "at step 4/" in capsys.readouterr().out
    assert_same_run(straight, stopped)


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_a_run_killed_between_checkpoints_loses_only_the_steps_since_the_last(loader, tiny_argv, tmp_path,
                                                                              monkeypatch):
    straight, stopped, argv = straight_and_stopped(tiny_argv, tmp_path, [*LOADERS[loader], *RECIPE])
    with monkeypatch.context() as patch:
        at_optimizer_step(patch, 5 + 3, kill)
        with pytest.raises(Interrupted):
            vit_main.main([*argv, "--checkpoint_steps", "2"])
    assert checkpoints.load_checkpoint(stopped / "last.pt")["in_epoch"]["batches"] == 2
    vit_main.main([*argv, "--resume", "auto"])  # continues without mid-epoch checkpoints
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_accumulation_warmup_and_ema_stop_at_the_end_of_the_accumulation_group(tiny_argv, tmp_path, capsys,
                                                                               monkeypatch):
    # 7 batches in groups of 3: optimiser steps after batches 3, 6 and 7 of an epoch.
    straight, stopped, argv = straight_and_stopped(
        tiny_argv, tmp_path, ["--accumulation_steps", "3", "--warmup_epochs", "1", "--scheduler", "cosine",
                              "--ema_decay", "0.9", "--augment", "--mixup", "0.5"])
    batches = {"count": 0}
    train_step = train_eval.Trainer._accumulate

    def signalled_in_group(self, *arguments):
        train_step(self, *arguments)
        batches["count"] += 1
        if batches["count"] == 7 + 4:  # the first batch of epoch 2's second group
            os.kill(os.getpid(), signal.SIGUSR2)

    with monkeypatch.context() as patch:
        patch.setattr(train_eval.Trainer, "_accumulate", signalled_in_group)
        line = expect_one_line_error(capsys, [*argv, "--checkpoint_steps", "5"], 140, "stopped by SIGUSR2")
    assert "at epoch 2 train, step 6/7" in line and "epoch 2 train up to step 6/7" in line
    vit_main.main([*argv, "--resume", "auto"])
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_a_stop_in_the_first_epoch_resumes_without_a_completed_epoch(tiny_argv, tmp_path, capsys, monkeypatch):
    straight, stopped, argv = straight_and_stopped(tiny_argv, tmp_path, ["--augment"])
    with monkeypatch.context() as patch:
        at_optimizer_step(patch, 2, send(signal.SIGTERM))
        expect_one_line_error(capsys, [*argv, "--checkpoint_steps", "4"], 143, "stopped by SIGTERM")
    last = checkpoints.load_checkpoint(stopped / "last.pt")
    assert last["epoch"] == 0 and last["history"] == [] and "best_epoch" not in last
    assert not (stopped / "best.pt").exists()
    vit_main.main([*argv, "--resume", "auto"])
    assert_same_run(straight, stopped)


def test_checkpoint_steps_must_not_be_negative(tiny_argv, tmp_path, capsys):
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--checkpoint_steps", "-1"), 2,
                          "--checkpoint_steps: must be >= 0")


@pytest.mark.slow
def test_worker_processes_draw_the_same_augmentation_after_the_skipped_batches(tiny_argv, tmp_path, monkeypatch):
    straight, stopped, argv = straight_and_stopped(
        tiny_argv, tmp_path, ["--num_workers", "2", "--augment", "--random_erasing", "0.5"])
    with monkeypatch.context() as patch:
        at_optimizer_step(patch, 7 + 5, kill)
        with pytest.raises(Interrupted):
            vit_main.main([*argv, "--checkpoint_steps", "4"])
    vit_main.main([*argv, "--resume", "auto"])
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_needs_the_steps_per_epoch_it_was_trained_with(tiny_argv, tmp_path, capsys,
                                                                              monkeypatch):
    argv = tiny_argv(tmp_path, *FLAGS, "--num_epochs", "1", "--checkpoint_steps", "2")
    with monkeypatch.context() as patch:
        at_optimizer_step(patch, 3, kill)  # after the checkpoint of step 2
        with pytest.raises(Interrupted):
            vit_main.main(argv)
    last = checkpoints.load_checkpoint(tmp_path / "last.pt")
    last["in_epoch"]["batches_total"] = 9  # as if trained with a batch size that gave 9 steps an epoch
    checkpoints.save_checkpoint(tmp_path / "last.pt", last)
    expect_one_line_error(capsys, [*argv, "--resume", "auto"], 2,
                          "--resume: " + f"{tmp_path / 'last.pt'} stopped part-way through epoch 1 of 9 steps, "
                          "but an epoch now has 7")
