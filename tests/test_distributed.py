"""Data parallelism: two CPU processes started by torchrun against one process over the same data.

The comparison is exact up to float rounding because every epoch is one full-batch SGD step
(no dropout, no augmentation): 2 processes x 100 images and 1 process x 200 images see the same
200 training images in one step, and DDP's average of the two per-rank mean gradients equals the
mean gradient over all 200. The test split has an odd size (101), so the two evaluation shards
differ in size and a padded or duplicated sample would change the metrics.
"""

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataset
import checkpoints
import distributed
import vit_main
from tests.helpers import TINY_MODEL_FLAGS

REPOSITORY = Path(__file__).resolve().parents[1]
SIZES = "200,101"
TRAIN_SIZE, TEST_SIZE = 200, 101
FULL_BATCH_SGD = ["--layer", "ConvNNAttention", "--K", "4", "--optimizer", "sgd", "--lr", "0.1",
                  "--dropout", "0", "--attention_dropout", "0"]
COMPARED_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5"]


def run_flags(output_dir, batch_size, num_epochs, *extra):
    return [*TINY_MODEL_FLAGS, *FULL_BATCH_SGD, "--batch_size", str(batch_size), "--num_epochs", str(num_epochs),
            "--output_dir", str(output_dir), *extra]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(flags, processes=2) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name not in distributed.TORCHRUN_VARIABLES}
    environment.update(CONVNN_SYNTHETIC_SIZES=SIZES, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "vit_main.py", *flags]
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished


def metrics(output_dir):
    with open(Path(output_dir) / "metrics.csv", newline="") as handle:
        return [{column: float(row[column]) for column in COMPARED_COLUMNS} for row in csv.DictReader(handle)]


def assert_same_metrics(rows, expected_rows):
    assert len(rows) == len(expected_rows)
    for row, expected in zip(rows, expected_rows):
        # Losses differ only by summation order; with 101 test images one prediction is ~1 %, so the
        # accuracies must be equal.
        assert row == pytest.approx(expected, rel=1e-6, abs=1e-9), (row, expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs on 2 processes (batch 100 each) and on 1 process (batch 200)."""
    root = tmp_path_factory.mktemp("distributed")
    two_processes = torchrun(run_flags(root / "two_processes", 100, 2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVNN_SYNTHETIC_SIZES", SIZES)
        vit_main.main(run_flags(root / "one_process", 200, 2))
    return root, two_processes.stdout


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one_process_with_the_global_batch(runs):
    root, _ = runs
    assert_same_metrics(metrics(root / "two_processes"), metrics(root / "one_process"))


@pytest.mark.slow
def test_every_test_image_counts_once(runs):
    root, _ = runs
    for row in metrics(root / "two_processes"):
        correct = row["test_top1"] * TEST_SIZE / 100
        assert correct == pytest.approx(round(correct), abs=1e-9)


@pytest.mark.slow
def test_rank_zero_alone_prints_and_writes(runs):
    root, stdout = runs
    output_dir = root / "two_processes"
    lines = (output_dir / "train_eval_results.txt").read_text().splitlines()
    assert [line[:11] for line in lines[:2]] == ["[Epoch 001]", "[Epoch 002]"]
    assert len(lines) == 4 and lines[3].startswith("Max Accuracy: ")
    assert len(metrics(output_dir)) == 2
    assert stdout.count("[Epoch 001]") == 1 and stdout.count("Max Accuracy") == 1
    assert stdout.count(f"synthetic: {TRAIN_SIZE} training and {TEST_SIZE} test images") == 1
    arguments = (output_dir / "args.txt").read_text().splitlines()
    assert len(arguments) == len(set(arguments)) and "batch_size: 100" in arguments
    assert not [name for name in os.listdir(output_dir) if name.startswith(".")]


@pytest.mark.slow
def test_checkpoint_holds_the_bare_model(runs):
    root, _ = runs
    checkpoint = checkpoints.load_checkpoint(root / "two_processes" / "last.pt")
    assert checkpoint["epoch"] == 2
    assert not [key for key in checkpoint["model"] if key.startswith("module.")]
    single = checkpoints.load_checkpoint(root / "one_process" / "last.pt")
    assert checkpoint["model"].keys() == single["model"].keys()
    for key, weights in checkpoint["model"].items():
        torch.testing.assert_close(weights, single["model"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_runs_resume_with_another_number_of_processes(runs, tmp_path, monkeypatch):
    root, _ = runs
    # The two-process run continues in one process, the one-process run in two: epoch 3 agrees.
    shutil.copytree(root / "two_processes", tmp_path / "continued_alone")
    shutil.copytree(root / "one_process", tmp_path / "continued_in_two")
    monkeypatch.setenv("CONVNN_SYNTHETIC_SIZES", SIZES)
    vit_main.main(run_flags(tmp_path / "continued_alone", 200, 3, "--resume", "auto"))
    torchrun(run_flags(tmp_path / "continued_in_two", 100, 3, "--resume", "auto"))
    continued_alone, continued_in_two = metrics(tmp_path / "continued_alone"), metrics(tmp_path / "continued_in_two")
    assert [row["epoch"] for row in continued_alone] == [row["epoch"] for row in continued_in_two] == [1, 2, 3]
    assert_same_metrics(continued_in_two, continued_alone)


def test_contiguous_shards_cover_every_index_once():
    data = list(range(11))
    shards = [list(distributed.ContiguousShards(data, num_replicas=3, rank=rank)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 4, 4]
    assert sum(shards, []) == data


def test_only_rank_zero_prints_reports(monkeypatch, capsys):
    for rank, printed in ((0, "report\n"), (1, "")):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        distributed.print_main("report")
        assert capsys.readouterr().out == printed


def test_without_torchrun_a_run_is_a_single_process(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_environment() is None
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1


def test_synthetic_sizes_come_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "30,7")
    train, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    assert (len(train), len(test)) == (30, 7)
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "30")
    with pytest.raises(dataset.DatasetUnavailableError, match="CONVNN_SYNTHETIC_SIZES"):
        dataset.synthetic_sizes()


# ---------------------------------------------------------------------------------------------
# A validation split under torchrun
# ---------------------------------------------------------------------------------------------

# 200 training images, 20 of each class: 5 of each are held out, which leaves 150 to train on (2 x 75).
VALIDATION = ["--val_split", "0.25"]
VALIDATION_COLUMNS = ["val_loss", "val_top1", "val_top5"]


@pytest.fixture(scope="module")
def validation_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_validation")
    torchrun(run_flags(root / "two_processes", 75, 2, *VALIDATION))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVNN_SYNTHETIC_SIZES", SIZES)
        vit_main.main(run_flags(root / "one_process", 150, 2, *VALIDATION))
    return root


def validation_metrics(output_dir):
    with open(Path(output_dir) / "metrics.csv", newline="") as handle:
        return [{column: float(row[column]) for column in COMPARED_COLUMNS + VALIDATION_COLUMNS}
                for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_a_validation_split_is_the_same_in_two_processes_as_in_one(validation_runs):
    # The same held-out images in both (else training on 150 others would not give the same metrics),
    # each validation image counted once.
    two, one = validation_metrics(validation_runs / "two_processes"), validation_metrics(validation_runs / "one_process")
    assert_same_metrics(two, one)
    for row in two:
        correct = row["val_top1"] * 50 / 100
        assert correct == pytest.approx(round(correct), abs=1e-9)
    lines = [(validation_runs / name / "train_eval_results.txt").read_text().splitlines()[-1]
             for name in ("two_processes", "one_process")]
    assert lines[0] == lines[1] and lines[0].startswith("Test Accuracy at best validation epoch: ")


@pytest.mark.slow
def test_per_class_counts_are_exact_in_two_processes(validation_runs):
    # 101 test images: the shards differ in size, so a padded sample would add an image to a class.
    tables = [(validation_runs / name / "per_class_accuracy.csv").read_text() for name in ("two_processes", "one_process")]
    assert tables[0] == tables[1]
    assert sum(int(line.split(",")[2]) for line in tables[0].splitlines()[1:]) == TEST_SIZE
