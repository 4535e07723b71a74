"""Training runs on the small synthetic set: output files, resuming, test-only evaluation, and the
training building blocks (loss, metrics, clipping, schedulers, mixed precision)."""

import contextlib
import io
import math
import os
import re
import shutil
import socket
import subprocess

import pytest
import torch
from torch import nn

import checkpoints
import dataset
import environment
import run_files
import train_eval
import vit_main
from models.vit import ViT
from models.vit_layers import options_from
from tests.helpers import (DETERMINISTIC_COLUMNS, Interrupted, assert_resume_repeats_a_straight_run,
                           interrupt_in_epoch, read_metrics, results_lines, train_small_run, without_hint)

FLOAT = r"\d+\.\d+"
EPOCH_LINE = re.compile(
    rf"^\[Epoch (\d{{3}})\] Time: {FLOAT}s \| \[Train\] Loss: \d+\.\d{{8}} Accuracy: Top1: \d+\.\d{{4}}%, "
    rf"Top5: \d+\.\d{{4}}% \| \[Test\] Loss: (\d+\.\d{{8}}) Accuracy: Top1: (\d+\.\d{{4}})%, Top5: \d+\.\d{{4}}%$"
)
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "best_accuracy", "best_epoch",
                   "history", "args", "args_changes", "processes", "class_names"}


# ---------------------------------------------------------------------------------------------
# A full run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """Trained once for the tests that read it; none of them may change it."""
    output_dir = tmp_path_factory.mktemp("run")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train_small_run(output_dir, "--layer", "ConvNNAttention", "--K", "4", "--num_epochs", "2")
    return output_dir, stdout.getvalue()


def test_run_writes_args_and_model_summary(two_epoch_run):
    output_dir, _ = two_epoch_run
    arguments = dict(line.split(": ", 1) for line in (output_dir / "args.txt").read_text().splitlines())
    assert arguments["layer"] == "ConvNNAttention" and arguments["num_epochs"] == "2"
    assert arguments["output_dir"] == str(output_dir) and arguments["lr"] == "0.001"

    summary = (output_dir / "model.txt").read_text()
    assert "transformer_encoder" in summary and "MultiHeadConvNNAttention" in summary
    torch.manual_seed(0)
    model = ViT(img_size=32, num_classes=10, layer="ConvNNAttention", patch_size=8, num_layers=2, num_heads=2,
                d_hidden=32, d_mlp=64, layer_options={"K": 4})
    assert f"Total parameters: {run_files.count_parameters(model):,}" in summary
    gflops = float(re.search(r"GFLOPs per image \(32x32, forward\): (\S+)", summary).group(1))
    assert 0 < gflops < 0.01


def test_results_file_has_one_line_per_epoch_then_the_summary(two_epoch_run):
    output_dir, _ = two_epoch_run
    lines = results_lines(output_dir)
    assert len(lines) == 4
    matches = [EPOCH_LINE.match(line) for line in lines[:2]]
    assert all(matches), lines[:2]
    assert [int(m.group(1)) for m in matches] == [1, 2]
    assert re.fullmatch(rf"Average Epoch Time: {FLOAT}s", lines[2])
    accuracies = [float(m.group(3)) for m in matches]
    best_epoch = 1 if accuracies[0] >= accuracies[1] else 2
    assert lines[3] == f"Max Accuracy: {max(accuracies):.4f}% at epoch {best_epoch}"


def test_metrics_csv_agrees_with_the_results_file(two_epoch_run):
    output_dir, _ = two_epoch_run
    rows = read_metrics(output_dir)
    assert list(rows[0]) == run_files.METRIC_COLUMNS and [row["epoch"] for row in rows] == ["1", "2"]
    for row, line in zip(rows, results_lines(output_dir)):
        match = EPOCH_LINE.match(line)
        assert f"{float(row['test_loss']):.8f}" == match.group(2)
        assert f"{float(row['test_top1']):.4f}" == match.group(3)
        assert float(row["lr"]) == pytest.approx(1e-3)
        assert float(row["images_per_second"]) > 0 and float(row["epoch_seconds"]) > 0
        assert 0 <= float(row["train_top1"]) <= float(row["train_top5"]) <= 100


def test_curves_png_is_an_image(two_epoch_run):
    output_dir, _ = two_epoch_run
    assert (output_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_load_into_a_fresh_model(two_epoch_run):
    output_dir, _ = two_epoch_run
    last = checkpoints.load_checkpoint(output_dir / "last.pt")
    best = checkpoints.load_checkpoint(output_dir / "best.pt")
    assert set(last) == CHECKPOINT_KEYS and set(best) == CHECKPOINT_KEYS
    assert last["epoch"] == 2 and best["epoch"] == best["best_epoch"] == last["best_epoch"]
    assert last["args"]["layer"] == "ConvNNAttention" and len(last["history"]) == 2
    assert last["class_names"] == [str(index) for index in range(10)]  # the synthetic set's names
    assert set(last["rng"]) >= {"python", "numpy", "torch"}
    model = ViT(img_size=32, num_classes=10, layer="ConvNNAttention", patch_size=8, num_layers=2, num_heads=2,
                d_hidden=32, d_mlp=64, layer_options={"K": 4})
    model.load_state_dict(best["model"])  # strict
    assert best["best_accuracy"] == max(record["test_top1"] for record in last["history"])


def test_no_temporary_files_are_left_behind(two_epoch_run):
    output_dir, _ = two_epoch_run
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        ["args.txt", "model.txt", "train_eval_results.txt", "metrics.csv", "curves.png", "last.pt", "best.pt",
         "per_class_accuracy.csv", "confusion_matrix.png", "environment.txt"]
    )


def test_without_a_terminal_each_epoch_prints_one_plain_line(two_epoch_run):
    _, stdout = two_epoch_run
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("[Epoch")]
    assert len(epoch_lines) == 2 and "\r" not in stdout
    assert "LR: 1.000e-03" in epoch_lines[0] and "img/s" in epoch_lines[0]


@pytest.mark.slow
def test_synthetic_set_is_learnt_well_above_chance(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "3", "--dropout", "0", "--attention_dropout", "0"))
    assert max(float(row["test_top1"]) for row in read_metrics(tmp_path)) > 30.0


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


RESUME_FLAGS = ["--num_epochs", "4", "--augment", "--scheduler", "cosine", "--layer", "ConvNNAttention",
                "--sampling_type", "random", "--num_samples", "8", "--K", "3", "--seed", "7"]


@pytest.mark.slow
def test_resumed_run_repeats_an_uninterrupted_one(tiny_argv, tmp_path, monkeypatch):
    """Dropout, augmentation, random sampling, shuffling and the cosine schedule all continue exactly."""
    straight, resumed = assert_resume_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch, RESUME_FLAGS, 3)
    resumed_lines = results_lines(resumed)
    assert [line[:11] for line in resumed_lines[:4]] == [f"[Epoch {e:03d}]" for e in range(1, 5)]
    assert len(resumed_lines) == 6 and resumed_lines[5] == results_lines(straight)[5]
    straight_weights = checkpoints.load_checkpoint(straight / "last.pt")["model"]
    resumed_weights = checkpoints.load_checkpoint(resumed / "last.pt")["model"]
    for name, weight in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_drops_later_lines(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2"))
    shutil.copy(tmp_path / "last.pt", tmp_path / "after_epoch_2.pt")
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "3", "--resume", "auto"))
    assert len(results_lines(tmp_path)) == 5 and len(read_metrics(tmp_path)) == 3

    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "4", "--resume", tmp_path / "after_epoch_2.pt"))
    lines = results_lines(tmp_path)
    assert [line[:11] for line in lines[:4]] == [f"[Epoch {e:03d}]" for e in range(1, 5)]
    assert lines[4].startswith("Average Epoch Time") and lines[5].startswith("Max Accuracy") and len(lines) == 6
    assert [row["epoch"] for row in read_metrics(tmp_path)] == ["1", "2", "3", "4"]
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["epoch"] == 4


def test_resume_auto_without_a_checkpoint_starts_afresh(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1", "--resume", "auto"))
    assert [row["epoch"] for row in read_metrics(tmp_path)] == ["1"]


def test_resume_with_another_architecture_is_a_usage_error(tiny_argv, tmp_path, capsys):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2", "--d_hidden", "16", "--resume", "auto"))
    assert exit_info.value.code == 2
    assert "error: --d_hidden: " in capsys.readouterr().err


def args_file(output_dir):
    return dict(line.split(": ", 1) for line in (output_dir / "args.txt").read_text().splitlines())


@pytest.mark.slow
def test_resume_takes_the_run_settings_and_records_what_changed(tiny_argv, tmp_path, small_synthetic, capsys):
    """``--output_dir RUN --resume auto`` alone continues RUN with its own settings (the defaults of lr,
    device, model... are not those of the run); a changed --num_epochs is recorded, never hidden."""
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1", "--lr", "3e-3", "--scheduler", "step", "--lr_step", "1",
                            "--lr_gamma", "0.5"))
    started_with = args_file(tmp_path)
    vit_main.main(["--output_dir", str(tmp_path), "--resume", "auto", "--num_epochs", "2"])
    assert [float(row["lr"]) for row in read_metrics(tmp_path)] == pytest.approx([3e-3, 1.5e-3], rel=1e-12)
    assert args_file(tmp_path) == {**started_with, "num_epochs": "2"}
    changes = checkpoints.load_checkpoint(tmp_path / "last.pt")["args_changes"]
    assert [(change["after_epoch"], change["values"]) for change in changes] == [(1, {"num_epochs": [1, 2]})]
    line = (tmp_path / "args_changes.txt").read_text()
    assert re.fullmatch(r"resumed after epoch 1 \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\) with num_epochs 1 -> 2\n", line)

    # Moved to the device loader and to another directory: both recorded, and the earlier change kept.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    vit_main.main(["--output_dir", str(moved), "--resume", "auto", "--num_epochs", "3", "--data_loader", "device"])
    lines = (moved / "args_changes.txt").read_text().splitlines()
    assert lines[0] == line.strip() and len(lines) == 2
    # In the order of the flags' declaration (as args.txt lists them), the facts and the output directory last.
    assert lines[1].endswith(f"with data_loader workers -> device, num_epochs 2 -> 3, output_dir {tmp_path} -> {moved}")
    assert args_file(moved) == {**started_with, "num_epochs": "3", "data_loader": "device", "output_dir": str(moved)}


@pytest.mark.slow
def test_resume_that_changes_nothing_leaves_the_record_alone(tiny_argv, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, 2)
        with pytest.raises(Interrupted):
            vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2"))
    written = (tmp_path / "args.txt").stat().st_mtime_ns
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2", "--resume", "auto"))
    assert (tmp_path / "args.txt").stat().st_mtime_ns == written and not (tmp_path / "args_changes.txt").exists()
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["args"]["resume"] is None  # as the run was started


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_takes_its_record(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2"))
    shutil.copy(tmp_path / "last.pt", tmp_path / "after_epoch_2.pt")
    vit_main.main(tiny_argv(tmp_path, "--resume", "auto", "--num_epochs", "3"))
    assert " with num_epochs 2 -> 3\n" in (tmp_path / "args_changes.txt").read_text()
    # Like the results files, the record drops what happened after the checkpoint resumed.
    vit_main.main(tiny_argv(tmp_path, "--resume", tmp_path / "after_epoch_2.pt", "--num_epochs", "4"))
    lines = (tmp_path / "args_changes.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resumed after epoch 2 (") and lines[0].endswith(" 2 -> 4")
    assert args_file(tmp_path)["num_epochs"] == "4"


def test_resume_below_the_epochs_already_trained_is_refused(two_epoch_run, tiny_argv, capsys):
    output_dir, _ = two_epoch_run
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(tiny_argv(output_dir, "--layer", "ConvNNAttention", "--K", "4", "--num_epochs", "1",
                                "--resume", "auto"))
    assert exit_info.value.code == 2
    error = without_hint(capsys.readouterr().err).strip().splitlines()[-1]
    assert error.endswith("error: --num_epochs: " + f"{output_dir / 'last.pt'} has trained 2 epochs already; "
                          "give more than 2 to train it further")
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == before


def cosine(epoch, num_epochs, base=1e-3):
    return base * (1 + math.cos(math.pi * epoch / num_epochs)) / 2


def assert_rates(output_dir, expected):
    rates = [float(row["lr"]) for row in read_metrics(output_dir)]
    assert len(rates) == len(expected)
    for epoch, (rate, want) in enumerate(zip(rates, expected), start=1):
        assert rate == pytest.approx(want, rel=1e-12, abs=1e-18), f"epoch {epoch}"


@pytest.mark.slow
def test_extending_a_finished_cosine_run_follows_the_cosine_of_the_new_length(tiny_argv, tmp_path, monkeypatch):
    """Epochs after the extension use the rate a run started with the new --num_epochs has there (not 0,
    and not the old cosine climbing back); a later plain resume keeps following it."""
    vit_main.main(tiny_argv(tmp_path, "--scheduler", "cosine", "--num_epochs", "2"))
    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, 2)  # the second epoch of this process: epoch 4
        with pytest.raises(Interrupted):
            vit_main.main(tiny_argv(tmp_path, "--resume", "auto", "--num_epochs", "5"))
    vit_main.main(tiny_argv(tmp_path, "--resume", "auto"))
    assert_rates(tmp_path, [cosine(0, 2), cosine(1, 2), cosine(2, 5), cosine(3, 5), cosine(4, 5)])


@pytest.mark.slow
def test_extending_an_interrupted_cosine_run(tiny_argv, tmp_path, monkeypatch):
    flags = ["--scheduler", "cosine", "--num_epochs", "4"]
    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, 3)
        with pytest.raises(Interrupted):
            vit_main.main(tiny_argv(tmp_path, *flags))
    vit_main.main(tiny_argv(tmp_path, *flags, "--resume", "auto", "--num_epochs", "6"))
    assert_rates(tmp_path, [cosine(0, 4), cosine(1, 4), *(cosine(epoch, 6) for epoch in range(2, 6))])


@pytest.mark.parametrize("schedule", [["--scheduler", "step", "--lr_step", "1", "--lr_gamma", "0.5"],
                                      ["--scheduler", "plateau"]])
@pytest.mark.slow
def test_extending_a_step_or_plateau_run_repeats_a_run_started_that_long(schedule, tiny_argv, tmp_path):
    """Neither schedule depends on --num_epochs: an extended run is the run that was started longer."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    vit_main.main(tiny_argv(straight, *schedule, "--num_epochs", "3"))
    vit_main.main(tiny_argv(extended, *schedule, "--num_epochs", "2"))
    vit_main.main(tiny_argv(extended, *schedule, "--num_epochs", "3", "--resume", "auto"))
    for expected, actual in zip(read_metrics(straight), read_metrics(extended), strict=True):
        for column in DETERMINISTIC_COLUMNS:
            assert float(actual[column]) == pytest.approx(float(expected[column]), rel=0, abs=1e-6), column


# ---------------------------------------------------------------------------------------------
# Test-only evaluation
# ---------------------------------------------------------------------------------------------


def test_only_reports_the_same_numbers_every_time(tiny_argv, tmp_path, capsys):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2"))
    best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    best_record = best["history"][best["best_epoch"] - 1]
    args_before = (tmp_path / "args.txt").read_text()
    capsys.readouterr()

    reports = []
    for _ in range(2):
        vit_main.main(tiny_argv(tmp_path, "--test_only"))  # best.pt of the output directory by default
        reports.append((tmp_path / "test_results.txt").read_text())
    assert reports[0] == reports[1]
    checkpoint_line, numbers = reports[0].splitlines()
    assert checkpoint_line == f"Checkpoint: {tmp_path / 'best.pt'}"
    assert numbers == run_files.test_line(best_record["test_loss"], best_record["test_top1"], best_record["test_top5"])
    assert numbers in capsys.readouterr().out
    assert (tmp_path / "args.txt").read_text() == args_before  # the training run's record is kept


def test_only_with_an_explicit_checkpoint(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path / "train", "--num_epochs", "1"))
    vit_main.main(tiny_argv(tmp_path / "eval", "--test_only", "--checkpoint", tmp_path / "train" / "last.pt"))
    record = checkpoints.load_checkpoint(tmp_path / "train" / "last.pt")["history"][0]
    lines = (tmp_path / "eval" / "test_results.txt").read_text().splitlines()
    assert lines == [f"Checkpoint: {tmp_path / 'train' / 'last.pt'}",
                     run_files.test_line(record["test_loss"], record["test_top1"], record["test_top5"])]


def test_only_accepts_a_bare_state_dict_and_rejects_other_files(tiny_argv, tmp_path, capsys):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    weights = checkpoints.load_checkpoint(tmp_path / "last.pt")["model"]
    torch.save(weights, tmp_path / "weights_only.pt")
    vit_main.main(tiny_argv(tmp_path, "--test_only", "--checkpoint", tmp_path / "weights_only.pt"))
    record = checkpoints.load_checkpoint(tmp_path / "last.pt")["history"][0]
    assert (tmp_path / "test_results.txt").read_text().splitlines()[1] == run_files.test_line(
        record["test_loss"], record["test_top1"], record["test_top5"])

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(tiny_argv(tmp_path, "--test_only", "--checkpoint", tmp_path / "garbage.pt"))
    assert exit_info.value.code == 2
    assert "error: --checkpoint:" in capsys.readouterr().err


def test_only_without_weights_is_refused_unless_a_fresh_model_is_asked_for(tiny_argv, tmp_path, capsys):
    mistyped = tmp_path / "mistyped"
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(tiny_argv(mistyped, "--test_only"))
    assert exit_info.value.code == 2
    assert without_hint(capsys.readouterr().err).strip().splitlines()[-1].endswith(
        f"error: --checkpoint: no {mistyped / 'best.pt'} to evaluate; give the weights with --checkpoint PATH "
        "(or evaluate a freshly initialised model with --checkpoint none)")
    assert not mistyped.exists()
    vit_main.main(tiny_argv(tmp_path, "--test_only", "--checkpoint", "none"))
    assert (tmp_path / "test_results.txt").read_text().startswith("Checkpoint: none (freshly initialised model)\n")


@pytest.mark.slow
def test_only_reads_the_model_and_data_flags_from_the_checkpoint(tiny_argv, tmp_path, small_synthetic):
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--layer", "ConvNNAttention", "--K", "3", "--sampling_type", "random",
                            "--num_samples", "8", "--magnitude_type", "cosine", "--num_epochs", "1"))
    record = checkpoints.load_checkpoint(run / "best.pt")["history"][0]
    expected = run_files.test_line(record["test_loss"], record["test_top1"], record["test_top5"])
    vit_main.main(["--test_only", "--checkpoint", str(run / "best.pt")])  # results beside the checkpoint
    assert (run / "test_results.txt").read_text().splitlines() == [f"Checkpoint: {run / 'best.pt'}", expected]
    (run / "test_results.txt").unlink()
    vit_main.main(["--test_only", "--output_dir", str(run), "--batch_size", "7"])  # evaluation batches may differ
    assert (run / "test_results.txt").read_text().splitlines()[1] == expected


def test_only_on_a_read_only_run_writes_its_results_elsewhere(tiny_argv, tmp_path, monkeypatch, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "results"
    vit_main.main(tiny_argv(run, "--num_epochs", "1"))
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    directory_problem = run_files.directory_problem

    def read_only_run(path):  # root may write anywhere, so the read-only mount is played here
        return f"cannot write to {path}: Read-only file system" if str(path) == str(run) else directory_problem(path)

    monkeypatch.setattr(run_files, "directory_problem", read_only_run)
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(tiny_argv(run, "--test_only"))
    assert exit_info.value.code == 2
    assert without_hint(capsys.readouterr().err).strip().splitlines()[-1].endswith(
        f"error: --output_dir: cannot write to {run}: Read-only file system; --test_only writes test_results.txt "
        f"there: give a writable --output_dir (and the weights with --checkpoint {run / 'best.pt'})")
    vit_main.main(["--test_only", "--checkpoint", str(run / "best.pt"), "--output_dir", str(elsewhere)])
    assert (elsewhere / "test_results.txt").read_text().startswith(f"Checkpoint: {run / 'best.pt'}\n")
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def test_mse_compares_logits_with_one_hot_targets():
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    losses = train_eval.per_sample_loss("MSE", 4)(logits, targets)
    assert losses.shape == (6,)
    expected = nn.MSELoss()(logits, nn.functional.one_hot(targets, 4).float())
    torch.testing.assert_close(losses.mean(), expected)


@pytest.mark.parametrize("name, optimizer_class, settings", [
    ("adam", torch.optim.Adam, dict(lr=0.5, weight_decay=0.25)),
    ("sgd", torch.optim.SGD, dict(lr=0.5, weight_decay=0.25, momentum=0.75)),
    ("adamw", torch.optim.AdamW, dict(lr=0.5, weight_decay=0.25)),
])
def test_each_optimizer_name_builds_its_optimiser_with_the_settings(name, optimizer_class, settings):
    optimizer = train_eval.build_optimizer(nn.Linear(2, 2).parameters(), optimizer=name, lr=0.5, weight_decay=0.25,
                                           momentum=0.75)
    assert type(optimizer) is optimizer_class
    assert {key: optimizer.param_groups[0][key] for key in settings} == settings


@pytest.mark.parametrize("name, expected", [
    ("step", lambda s: isinstance(s, torch.optim.lr_scheduler.StepLR) and (s.step_size, s.gamma) == (3, 0.5)),
    ("cosine", lambda s: isinstance(s, torch.optim.lr_scheduler.CosineAnnealingLR) and s.T_max == 7),
    ("plateau", lambda s: isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) and s.mode == "min"),
    ("none", lambda s: s is None),
])
def test_each_scheduler_name_builds_its_schedule_with_the_settings(name, expected):
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    assert expected(train_eval.build_scheduler(optimizer, scheduler=name, lr_step=3, lr_gamma=0.5, num_epochs=7))


@pytest.mark.parametrize("build, flag", [
    (lambda: train_eval.build_optimizer([], optimizer="lion", lr=1.0, weight_decay=0.0, momentum=0.0), "--optimizer"),
    (lambda: train_eval.build_scheduler(None, scheduler="linear", lr_step=1, lr_gamma=1.0, num_epochs=1),
     "--scheduler"),
    (lambda: train_eval.per_sample_loss("Hinge", 3), "--criterion"),
])
def test_unknown_optimiser_scheduler_or_loss_names_its_flag(build, flag):
    with pytest.raises(ValueError, match="^" + flag + ": unknown"):
        build()


def test_split_metrics_are_exact_per_sample_averages():
    """Batches of 3 and 1 samples: the split loss is the mean over 4 samples, not over 2 batches."""
    tally = train_eval._Tally(torch.device("cpu"), num_classes=6)
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [1, 5, 4, 3, 2, 0], [0, 1, 2, 3, 4, 5], [5, 0, 0, 0, 0, 1]])
    targets = torch.tensor([0, 0, 0, 5])  # top-1 hit, top-5 hit, miss, top-5 hit
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    tally.add(losses[:3], logits[:3], targets[:3])
    tally.add(losses[3:], logits[3:], targets[3:])
    summary = tally.summary()
    assert summary["loss"] == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4; batch averages would give 6.0
    assert summary["top1"] == pytest.approx(25.0) and summary["top5"] == pytest.approx(75.0)


def make_trainer(**overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    options = dict(model=model, device=torch.device("cpu"), num_classes=3, optimizer="sgd", lr=1.0,
                   weight_decay=0.0, momentum=0.0, scheduler="none", lr_step=1, lr_gamma=0.5, num_epochs=4,
                   criterion="CrossEntropy", clip_grad_norm=0.0, use_amp=False, use_compiled=False,
                   compile_mode="default", show_progress=False)
    return train_eval.Trainer(**{**options, **overrides})


def update_size(trainer):
    before = [p.detach().clone() for p in trainer.model.parameters()]
    images, targets = torch.randn(8, 12) * 100, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer._step(trainer.loss_of(trainer.model(images), targets).mean())
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)]).norm()


def test_gradient_clipping_limits_the_update_and_zero_disables_it():
    # With SGD at lr 1 and no momentum, the update is the gradient itself.
    assert update_size(make_trainer(clip_grad_norm=0.5)) == pytest.approx(0.5, rel=1e-4)
    assert update_size(make_trainer(clip_grad_norm=0.0)) > 5.0


@pytest.mark.parametrize("name, expected", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                            ("sgd", torch.optim.SGD)])
def test_optimizers(name, expected):
    trainer = make_trainer(optimizer=name, lr=0.01, weight_decay=0.1, momentum=0.8)
    assert type(trainer.optimizer) is expected
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.1)
    if name == "sgd":
        assert group["momentum"] == 0.8


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_step_and_cosine_schedules():
    step = make_trainer(scheduler="step", lr_step=2, lr_gamma=0.5)
    rates = []
    for _ in range(4):
        rates.append(step.learning_rate())
        step.step_scheduler(watched_loss=1.0)
    assert rates == pytest.approx([1.0, 1.0, 0.5, 0.5])

    cosine = make_trainer(scheduler="cosine", num_epochs=4)
    for _ in range(4):
        cosine.step_scheduler(watched_loss=1.0)
    assert cosine.learning_rate() == pytest.approx(0.0, abs=1e-12)
    assert make_trainer(scheduler="none").scheduler is None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_cosine_schedule_fitted_to_a_new_length_follows_its_closed_form():
    trainer = make_trainer(scheduler="cosine", num_epochs=2)
    for _ in range(2):
        trainer.step_scheduler(watched_loss=1.0)
    assert trainer.learning_rate() == pytest.approx(0.0, abs=1e-12)  # a finished cosine run is at rate 0
    trainer.fit_schedule_to(num_epochs=5, completed_epochs=2)
    rates = []
    for _ in range(3):
        rates.append(trainer.learning_rate())
        trainer.step_scheduler(watched_loss=1.0)
    assert rates == pytest.approx([(1 + math.cos(math.pi * epoch / 5)) / 2 for epoch in (2, 3, 4)], rel=1e-12)
    assert trainer.learning_rate() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("scheduler", ["step", "plateau", "none"])
def test_other_schedules_do_not_depend_on_the_length(scheduler):
    short, long = make_trainer(scheduler=scheduler, num_epochs=3), make_trainer(scheduler=scheduler, num_epochs=30)
    short.fit_schedule_to(num_epochs=30, completed_epochs=0)
    for _ in range(14):
        assert short.learning_rate() == long.learning_rate()
        for trainer in (short, long):
            trainer.step_scheduler(watched_loss=1.0)


def test_plateau_watches_the_test_loss():
    trainer = make_trainer(scheduler="plateau")
    for _ in range(12):
        trainer.step_scheduler(watched_loss=1.0)  # never improves after the first epoch
    assert trainer.learning_rate() < 1.0
    improving = make_trainer(scheduler="plateau")
    for epoch in range(12):
        improving.step_scheduler(watched_loss=1.0 / (epoch + 1))
    assert improving.learning_rate() == 1.0


def test_amp_on_cpu_uses_bfloat16_for_training_and_evaluation():
    trainer = make_trainer(use_amp=True)
    with trainer.autocast():
        assert trainer.model(torch.randn(2, 12)).dtype == torch.bfloat16
    assert not trainer.scaler.is_enabled()  # gradient scaling is for float16 on CUDA only
    assert train_eval.AMP_DTYPE == {"cuda": torch.float16, "cpu": torch.bfloat16, "mps": torch.float16}


def test_reduce_memory_compiles_in_default_mode_with_activation_checkpointing():
    # Resolved where the model is built: the Trainer is given torch.compile's own mode.
    model_flags = ["--layer", "Attention", "--patch_size", "8", "--num_layers", "1", "--num_heads", "2",
                   "--d_hidden", "32", "--d_mlp", "32"]

    def built(*flags):
        return vit_main.build_model(vit_main.build_parser().parse_args([*model_flags, *flags]), 32, 10)

    model, compile_mode = built("--use_compiled", "--compile_mode", "reduce-memory")
    assert compile_mode == "default"
    trainer = make_trainer(model=model, num_classes=10, use_compiled=True, compile_mode=compile_mode)
    assert model.activation_checkpointing is True
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.network._orig_mod is model
    plain = make_trainer(model=built()[0])
    assert plain.network is plain.model and not plain.model.activation_checkpointing
    uncompiled, _ = built("--compile_mode", "reduce-memory")  # no effect without --use_compiled, as warned
    assert not uncompiled.activation_checkpointing


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["Attention", "ConvNNAttention"])
def test_compiled_model_on_cpu_draws_the_eager_dropout_masks(layer):
    # Inductor's own CPU random numbers are slower than ATen's and differ from them; compile_network
    # keeps ATen's, so a compiled run is the eager run, dropout included.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ViT(img_size=16, num_classes=10, layer=layer, patch_size=4, num_layers=2, num_heads=2, d_hidden=16,
                d_mlp=32, dropout=0.5, attention_dropout=0.5, layer_options=options_from(layer, {"K": 3})).train()
    compiled = train_eval.compile_network(model, "default", torch.device("cpu"))
    images = torch.randn(4, 3, 16, 16)
    results = []
    for network in (model, compiled):
        torch.manual_seed(1)
        out = network(images)
        results.append((out, torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    (eager, eager_grads), (out, grads) = results
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_epoch_seeding_fixes_the_shuffle_of_each_epoch():
    data = torch.utils.data.TensorDataset(torch.arange(20).float(), torch.arange(20))
    loader, _ = dataset.make_loaders(data, data, batch_size=20, num_workers=0, device=torch.device("cpu"))
    orders = {}
    for epoch in (1, 2, 1):
        dataset.seed_epoch(loader, seed=3, epoch=epoch)
        orders.setdefault(epoch, []).append(next(iter(loader))[1].tolist())
    assert orders[1][0] == orders[1][1] != orders[2][0]


# ---------------------------------------------------------------------------------------------
# environment.txt: what each start of a run ran on
# ---------------------------------------------------------------------------------------------


def test_environment_txt_records_versions_devices_hosts_and_the_commit(two_epoch_run):
    output_dir, _ = two_epoch_run
    text = (output_dir / "environment.txt").read_text()
    assert text.startswith("== start 1: ") and environment.starts_in(text) == 1
    fields = dict(line.split(": ", 1) for line in text.splitlines()[1:])
    assert fields["torch"] == torch.__version__ and fields["processes"] == "1 on 1 node(s)"
    assert fields["hosts"] == socket.gethostname() and fields["rank 0"].startswith(f"host {socket.gethostname()}, ")
    assert {"python", "torchvision", "cuda", "cudnn", "git commit"} <= set(fields)


def test_a_resumed_run_appends_its_start_to_environment_txt(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    first = (tmp_path / "environment.txt").read_text()
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2", "--resume", "auto"))
    text = (tmp_path / "environment.txt").read_text()
    assert text.startswith(first + "\n== start 2: ") and environment.starts_in(text) == 2


def test_the_git_commit_is_marked_dirty_and_missing_git_is_no_failure(tmp_path, monkeypatch):
    def git(*arguments):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                       check=True, capture_output=True)

    assert environment.git_commit(str(tmp_path)) == "unknown (not a git checkout)"
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    commit = environment.git_commit(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    (tmp_path / "code.py").write_text("a = 2\n")
    assert environment.git_commit(str(tmp_path)) == f"{commit} dirty"

    def no_git(*arguments, **options):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert environment.git_commit(str(tmp_path)) == "unknown (git is not installed)"


# ---------------------------------------------------------------------------------------------
# --deterministic
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def determinism_restored():
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.mark.parametrize("flags, expected", [([], False), (["--deterministic"], True)])
def test_deterministic_trains_with_deterministic_algorithms_only(flags, expected, tiny_argv, tmp_path, monkeypatch,
                                                                 determinism_restored):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # given back as it was after the test
    seen = []
    train_one_epoch = train_eval.Trainer.train_one_epoch

    def recording(self, *arguments):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
        return train_one_epoch(self, *arguments)

    monkeypatch.setattr(train_eval.Trainer, "train_one_epoch", recording)
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1", "--layer", "ConvNNAttention", "--K", "4", *flags))
    assert seen == [(expected, False)]
    if expected:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == train_eval.CUBLAS_DETERMINISTIC_WORKSPACE
