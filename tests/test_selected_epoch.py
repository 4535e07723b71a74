"""One rule for a run's selected epoch: the training writes it (best.pt, the per-class results) with
run_files.selected_record, and summarize.py reports the same epoch by calling that same function."""

import pytest

import run_files
from scripts import summarize


def record(epoch, test_top1, val_top1=None):
    values = {"epoch": epoch, "lr": 0.001, "train_loss": 1.5, "train_top1": 40.0, "train_top5": 90.0,
              "test_loss": 1.25, "test_top1": test_top1, "test_top5": 95.0, "epoch_seconds": 2.0,
              "images_per_second": 100.0}
    if val_top1 is not None:
        values.update(val_loss=1.0, val_top1=val_top1, val_top5=99.0)
    return values


HISTORIES = {
    # Test top-1 tied at epochs 2 and 4: the first wins.
    "test ties": [record(1, 50.0), record(2, 75.0), record(3, 70.0), record(4, 75.0)],
    # Validation tied at epochs 2 and 3, test best at 4: validation decides, the first tie wins.
    "validation ties": [record(1, 60.0, 50.0), record(2, 75.0, 72.0), record(3, 70.0, 72.0), record(4, 90.0, 65.0)],
    # Validation and test tie everywhere: epoch 1.
    "all equal": [record(epoch, 80.0, 80.0) for epoch in range(1, 4)],
    "one epoch": [record(1, 10.0)],
}
EXPECTED = {"test ties": (2, "test (optimistic)"), "validation ties": (2, "val"), "all equal": (1, "val"),
            "one epoch": (1, "test (optimistic)")}


def written_run(directory, history):
    directory.mkdir()
    outputs = run_files.RunOutputs(str(directory), validation="val_top1" in history[0])
    outputs.write_args({"layer": "Attention", "num_epochs": len(history), "seed": 0})
    outputs.start_logs(history)
    return directory


@pytest.mark.parametrize("name", HISTORIES)
def test_the_summary_and_the_run_select_the_same_epoch(tmp_path, name):
    history = HISTORIES[name]
    row, _ = summarize.summarise_run(str(written_run(tmp_path / "run", history)), "run")
    chosen = run_files.selected_record(history)
    assert (row["selected_epoch"], row["selected_by"]) == EXPECTED[name]
    assert row["selected_epoch"] == chosen["epoch"]
    assert row["selected_top1"] == chosen["test_top1"]


def test_the_summary_follows_the_runs_rule_rather_than_a_copy_of_it(tmp_path, monkeypatch):
    run = written_run(tmp_path / "run", HISTORIES["test ties"])
    monkeypatch.setattr(run_files, "selected_record", lambda history: history[-1])
    row, _ = summarize.summarise_run(str(run), "run")
    assert row["selected_epoch"] == 4
