"""--tensorboard: event files beside metrics.csv, read back with TensorBoard's own reader; a resume continues
the stream without a duplicated step; without the package the flag is refused in one line."""

import csv
import shutil
import sys

import pytest

import tensorboard_log
import vit_main
from tests.helpers import expect_one_line_error

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# 200 training images in batches of 32: 7 batches an epoch.
BATCHES = 7


def scalars(run):
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def metrics(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tags_follow_split_and_metric():
    assert [tensorboard_log.scalar_tag(column) for column in
            ("test_top1", "val_loss", "train_top5", "ema_test_top1", "ema_val_loss", "lr", "images_per_second",
             "epoch")] == ["test/top1", "val/loss", "train/top5", "ema_test/top1", "ema_val/loss", "lr",
                           "images_per_second", None]


def test_a_run_writes_every_epochs_metrics_and_the_training_loss(tiny_argv, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "STEP_LOSS_INTERVAL", 3)
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--num_epochs", "2", "--batch_size", "32", "--tensorboard", "--val_split", "0.2",
                            "--ema_decay", "0.9"))
    logged, rows = scalars(run), metrics(run)
    # 160 training images after the hold-out: 5 batches an epoch.
    batches = 5
    for tag, column in [("test/top1", "test_top1"), ("val/loss", "val_loss"), ("train/loss", "train_loss"),
                        ("ema_test/top1", "ema_test_top1"), ("lr", "lr")]:
        assert [step for step, _ in logged[tag]] == [batches, 2 * batches]
        assert [value for _, value in logged[tag]] == pytest.approx([float(row[column]) for row in rows])
    assert [step for step, _ in logged["train/step_loss"]] == [3, 8]  # the third batch of each epoch


def test_a_resume_continues_the_stream_without_a_duplicated_step(tiny_argv, tmp_path):
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--num_epochs", "1", "--batch_size", "32", "--tensorboard"))
    first_epoch = tmp_path / "epoch_1.pt"
    shutil.copy(run / "last.pt", first_epoch)
    vit_main.main(tiny_argv(run, "--num_epochs", "2", "--batch_size", "32", "--resume", "auto"))
    # A process killed after logging epoch 2 but before its last.pt landed: the run continues after epoch 1 and
    # logs epoch 2 again, which must replace the first process's epoch 2, not stand beside it.
    shutil.copy(first_epoch, run / "last.pt")
    vit_main.main(tiny_argv(run, "--num_epochs", "2", "--batch_size", "32", "--resume", "auto"))
    logged = scalars(run)
    assert [step for step, _ in logged["test/top1"]] == [BATCHES, 2 * BATCHES]
    assert [value for _, value in logged["test/top1"]] == pytest.approx([float(row["test_top1"])
                                                                         for row in metrics(run)])
    assert len(list((run / "tensorboard").iterdir())) == 3  # one file per process, read as one stream


def test_without_the_package_the_flag_is_one_line_before_any_data(tiny_argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it then fails, as where it is absent
    line = expect_one_line_error(capsys, tiny_argv(tmp_path / "run", "--tensorboard"), 2, "--tensorboard: ")
    assert "pip install tensorboard" in line
    assert not (tmp_path / "run").exists()
