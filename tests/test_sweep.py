"""The sweep script (skip finished runs, resume unfinished ones, start absent ones) and the summary
of output directories written by real short runs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vit_main
from scripts import summarize
from tests.conftest import TINY_MODEL_FLAGS
from tests.test_training import Interrupted, interrupt_in_epoch

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


def run_sweep(output_root) -> str:
    environment = dict(os.environ, PYTHON=sys.executable, OUTPUT_ROOT=str(output_root), DATASET="synthetic",
                       EPOCHS="2", DEVICE="cpu", LAYERS="ConvNNAttention", K_VALUES="2 3 4", SAMPLINGS="all",
                       BASELINES="", EXTRA_FLAGS=" ".join(TINY_MODEL_FLAGS), CONVNN_SYNTHETIC_SIZES="200,100",
                       # One thread: on a shared CPU, several threads per process slow a run down many times.
                       OMP_NUM_THREADS="1")
    finished = subprocess.run(["bash", str(SWEEP)], env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


def test_sweep_skips_finished_runs_resumes_unfinished_ones_and_starts_absent_ones(tiny_argv, tmp_path,
                                                                                   monkeypatch):
    root = tmp_path / "sweep"
    # K=2 finished: a results file that ends with the summary line (its content is never read again).
    finished = root / "ConvNNAttention_K2_all"
    finished.mkdir(parents=True)
    finished_results = "[Epoch 001] ...\nAverage Epoch Time: 1.0000s\nMax Accuracy: 50.0000% at epoch 1\n"
    (finished / "train_eval_results.txt").write_text(finished_results)
    # K=3 interrupted in epoch 2, with the flags the sweep passes; K=4 absent.
    unfinished = root / "ConvNNAttention_K3_all"
    interrupted_run(tiny_argv(unfinished, "--layer", "ConvNNAttention", "--K", "3", "--num_epochs", "2"), monkeypatch)
    first_epoch = read_rows(unfinished / "metrics.csv")
    assert len(first_epoch) == 1

    output = run_sweep(root)
    assert "skip    ConvNNAttention_K2_all (finished)" in output
    assert "resume  ConvNNAttention_K3_all" in output and "Resuming from" in output
    assert "start   ConvNNAttention_K4_all" in output
    assert (finished / "train_eval_results.txt").read_text() == finished_results
    assert sorted(os.listdir(finished)) == ["train_eval_results.txt"]
    for name in ("ConvNNAttention_K3_all", "ConvNNAttention_K4_all"):
        assert summarize.is_finished(str(root / name))
        rows = read_rows(root / name / "metrics.csv")
        assert [row["epoch"] for row in rows] == ["1", "2"]
    assert read_rows(unfinished / "metrics.csv")[0] == first_epoch[0]

    again = run_sweep(root)
    assert again.count("skip    ") == 3 and "start" not in again and "resume" not in again


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
    assert table == printed.out
    assert "| K3_random* | ConvNNAttention | 3 | random:8 | depthwise |" in table
    assert "| K2 | ConvNNAttention | 2 | all | depthwise |" in table
    assert "* unfinished run" in table
    for plot in ("top1_vs_epoch.png", "best_top1_vs_K.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_nothing_is_an_error(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err
