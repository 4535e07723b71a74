"""The validation split (--val_split, --split_seed), the epoch it selects, and the per-class results."""

import csv
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import checkpoints
import dataset
import run_files
import runs
import train_eval
import vit_main
from tests.helpers import (DETERMINISTIC_COLUMNS, TINY_MODEL_FLAGS, assert_resume_repeats_a_straight_run,
                           read_metrics, results_lines, texts_outside_or_overlapping, train_small_run,
                           write_cifar10)
from tests.helpers import expect_one_line_error

VALIDATION = ["--val_split", "0.2"]


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------


def uneven_labels():
    """Classes of 7, 13, 20 and 3 images, interleaved."""
    counts = [7, 13, 20, 3]
    labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("fraction", [0.2, 0.34, 0.5])
def test_the_split_is_disjoint_complete_and_stratified_within_one_image(fraction):
    labels = uneven_labels()
    training, validation = dataset.validation_indices(labels, fraction, split_seed=0)
    assert not set(training.tolist()) & set(validation.tolist())
    assert sorted(training.tolist() + validation.tolist()) == list(range(len(labels)))
    for label, count in enumerate(torch.bincount(labels).tolist()):
        held_out = int((labels[validation] == label).sum())
        assert abs(held_out - fraction * count) <= 0.5 and 1 <= held_out < count


def test_the_split_follows_the_split_seed_alone():
    labels = uneven_labels()
    first = dataset.validation_indices(labels, 0.3, split_seed=0)[1]
    torch.manual_seed(123)  # the global generator, which --seed sets, plays no part
    assert torch.equal(dataset.validation_indices(labels, 0.3, split_seed=0)[1], first)
    assert not torch.equal(dataset.validation_indices(labels, 0.3, split_seed=1)[1], first)


class SplitMade(Exception):
    pass


def split_of_a_run(tiny_argv, tmp_path, monkeypatch, *flags):
    """The validation indices a run of the command line holds out (the run stops right after the split)."""
    made = {}
    hold_out = dataset.hold_out_validation

    def recording(*args, **kwargs):
        training, validation = hold_out(*args, **kwargs)
        made["training"], made["validation"] = training.indices, validation.indices
        raise SplitMade

    with monkeypatch.context() as patch, pytest.raises(SplitMade):
        patch.setattr(dataset, "hold_out_validation", recording)
        vit_main.main(tiny_argv(tmp_path / "_".join(map(str, flags)), *VALIDATION, *flags))
    return made


def test_runs_of_every_seed_and_layer_hold_out_the_same_images(tiny_argv, tmp_path, monkeypatch):
    base = split_of_a_run(tiny_argv, tmp_path, monkeypatch, "--seed", "0")
    assert len(base["validation"]) == 40 and len(base["training"]) == 160
    assert split_of_a_run(tiny_argv, tmp_path, monkeypatch, "--seed", "7") == base
    assert split_of_a_run(tiny_argv, tmp_path, monkeypatch, "--layer", "ConvNNAttention", "--seed", "3") == base
    assert split_of_a_run(tiny_argv, tmp_path, monkeypatch, "--split_seed", "1")["validation"] != base["validation"]


def test_validation_images_are_never_augmented(small_synthetic):
    train, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=True)
    plain, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    training, validation = dataset.hold_out_validation(train, "synthetic", 0, 0.2, split_seed=0)
    index = validation.indices[0]
    torch.manual_seed(0)
    for _ in range(3):
        torch.testing.assert_close(validation[0][0], plain[index][0], rtol=0, atol=0)
    # The training subset keeps the augmentation: two reads of an image differ.
    torch.manual_seed(0)
    assert any(not torch.equal(training[0][0], training[0][0]) for _ in range(5))


def test_the_device_path_holds_out_the_images_of_the_worker_path(small_synthetic):
    train, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=True)
    _, validation = dataset.hold_out_validation(train, "synthetic", 0, 0.2, split_seed=0)
    config = dict(batch_size=16, num_workers=0, device=torch.device("cpu"))
    on_device = dataset.evaluation_loader(validation, **config,
                                          on_device=dict(dataset="synthetic", resize=0, augment=True))
    by_workers = dataset.evaluation_loader(validation, **config)
    for (device_images, device_labels), (worker_images, worker_labels) in zip(on_device, by_workers, strict=True):
        assert torch.equal(device_labels, worker_labels)
        torch.testing.assert_close(device_images, worker_images)


def test_cifar_and_image_folders_split_by_their_labels(tmp_path, files_only_integrity):
    write_cifar10(tmp_path / "cifar", per_batch=10)  # 50 training images, 5 of each class
    train, test, _, _ = dataset.load_datasets("cifar10", str(tmp_path / "cifar"), resize=0, augment=True)
    training, validation = dataset.hold_out_validation(train, "cifar10", 0, 0.2, split_seed=0)
    assert (len(training), len(validation)) == (40, 10)
    assert sorted(validation[index][1] for index in range(10)) == list(range(10))
    assert dataset.class_names(test, 10) == [f"class{i}" for i in range(10)]

    for split in ("train", "val"):
        for index, name in enumerate(("cat", "dog")):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for number in range(4):
                Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(tmp_path / "images" / split / name / f"{number}.png")
    train, test, _, _ = dataset.load_datasets("imagenet", str(tmp_path / "images"), resize=8, augment=True)
    training, validation = dataset.hold_out_validation(train, "imagenet", 8, 0.25, split_seed=0)
    assert (len(training), len(validation)) == (6, 2)
    assert sorted(validation[index][1] for index in range(2)) == [0, 1]
    assert dataset.class_names(test, 2) == ["cat", "dog"]


def test_a_split_that_empties_a_class_is_refused():
    labels = torch.tensor([0] * 20 + [1] * 2)
    assert "holds out no image of class 0 (20 training images)" in dataset.validation_split_problem(labels, 0.02)
    assert dataset.validation_split_problem(labels[:20], 0.025) is None  # half an image rounds up
    assert "holds out all 2 training images of class 1" in dataset.validation_split_problem(labels, 0.8)
    assert "single training image" in dataset.validation_split_problem(torch.tensor([0, 0, 1]), 0.5)


# ---------------------------------------------------------------------------------------------
# Training with a validation split
# ---------------------------------------------------------------------------------------------


def test_best_epoch_is_chosen_by_validation_and_the_test_choice_stays_in_max_accuracy():
    history = [
        {"epoch": 1, "test_top1": 50.0, "val_top1": 60.0},
        {"epoch": 2, "test_top1": 70.0, "val_top1": 55.0},  # best on test
        {"epoch": 3, "test_top1": 65.0, "val_top1": 62.5},  # best on validation
        {"epoch": 4, "test_top1": 64.0, "val_top1": 62.5},  # a tie: the first epoch wins
    ]
    assert run_files.selected_record(history)["epoch"] == 3
    assert run_files.best_accuracy_line(history) == "Max Accuracy: 70.0000% at epoch 2"
    assert run_files.best_validation_line(history) == (
        "Test Accuracy at best validation epoch: 65.0000% at epoch 3 (validation top-1 62.5000%)")
    without_validation = [{key: value for key, value in record.items() if key != "val_top1"} for record in history]
    assert run_files.selected_record(without_validation)["epoch"] == 2


def scripted_evaluation(monkeypatch, results):
    """Makes Trainer.evaluate return ``results[(epoch, split)]`` (top-1; the loss falls as top-1 rises)."""

    def evaluate(self, loader, description="test", confusion=False):
        _, epoch, split = description.split()
        top1 = results[(int(epoch), split)]
        return train_eval.SplitResult(loss=1 - top1 / 100, top1=top1, top5=100.0, samples=10, seconds=0.1)

    monkeypatch.setattr(train_eval.Trainer, "evaluate", evaluate)


def test_best_pt_and_the_final_line_follow_validation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = train_eval.Trainer(
        model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), device=torch.device("cpu"),
        num_classes=3, optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.0, scheduler="none", lr_step=1,
        lr_gamma=0.1, num_epochs=3, criterion="CrossEntropy", clip_grad_norm=0.0, use_amp=False,
        use_compiled=False, compile_mode="default", show_progress=False)
    data = torch.utils.data.TensorDataset(torch.randn(6, 12), torch.tensor([0, 1, 2, 0, 1, 2]))
    train_loader = DataLoader(data, batch_size=3, generator=torch.Generator())
    scripted_evaluation(monkeypatch, {(1, "test"): 40.0, (1, "validation"): 50.0, (2, "test"): 80.0,
                                      (2, "validation"): 45.0, (3, "test"): 60.0, (3, "validation"): 55.0})
    outputs = run_files.RunOutputs(str(tmp_path), validation=True)
    history = train_eval.fit(trainer, train_loader, "test loader", outputs=outputs, num_epochs=3, seed=0,
                             run_arguments={}, val_loader="validation loader")
    assert checkpoints.load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert results_lines(tmp_path)[-2:] == [
        "Max Accuracy: 80.0000% at epoch 2",
        "Test Accuracy at best validation epoch: 60.0000% at epoch 3 (validation top-1 55.0000%)"]
    assert [row["val_top1"] for row in read_metrics(tmp_path)] == ["50.0", "45.0", "55.0"]
    assert [record["val_loss"] for record in history] == pytest.approx([0.5, 0.55, 0.45])


def test_plateau_watches_the_validation_loss_when_a_split_is_held_out(tiny_argv, tmp_path, monkeypatch):
    watched = []
    step_scheduler = train_eval.Trainer.step_scheduler
    monkeypatch.setattr(train_eval.Trainer, "step_scheduler",
                        lambda self, loss: (watched.append(loss), step_scheduler(self, loss)))
    vit_main.main(tiny_argv(tmp_path, *VALIDATION, "--scheduler", "plateau", "--num_epochs", "2"))
    rows = read_metrics(tmp_path)
    assert watched == [float(row["val_loss"]) for row in rows] != [float(row["test_loss"]) for row in rows]


@pytest.fixture(scope="module")
def validation_run(tmp_path_factory):
    return train_small_run(tmp_path_factory.mktemp("validation"), *VALIDATION, "--num_epochs", "2")


def test_a_run_with_a_validation_split_logs_it(validation_run):
    rows = read_metrics(validation_run)
    assert list(rows[0]) == run_files.METRIC_COLUMNS + ["val_loss", "val_top1", "val_top5"]
    lines = results_lines(validation_run)
    assert all(" | [Validation] Loss: " in line for line in lines[:2])
    chosen = max(rows, key=lambda row: (float(row["val_top1"]), -int(row["epoch"])))
    assert lines[-1] == (f"Test Accuracy at best validation epoch: {float(chosen['test_top1']):.4f}% at epoch "
                         f"{chosen['epoch']} (validation top-1 {float(chosen['val_top1']):.4f}%)")
    assert lines[-2].startswith("Max Accuracy: ")
    assert checkpoints.load_checkpoint(validation_run / "best.pt")["epoch"] == int(chosen["epoch"])
    assert checkpoints.load_checkpoint(validation_run / "last.pt")["args"]["val_split"] == 0.2


def per_class_rows(output_dir, name="per_class_accuracy.csv"):
    with open(output_dir / name, newline="") as handle:
        return list(csv.DictReader(handle))


def test_per_class_results_are_those_of_best_pt(validation_run):
    rows = per_class_rows(validation_run)
    assert list(rows[0]) == ["class_index", "class_name", "images", "correct", "accuracy", "weights"]
    assert [row["class_name"] for row in rows] == [str(index) for index in range(10)]
    assert sum(int(row["images"]) for row in rows) == 100
    best_epoch = checkpoints.load_checkpoint(validation_run / "best.pt")["epoch"]
    assert {row["weights"] for row in rows} == {f"best.pt (epoch {best_epoch}, trained weights)"}
    best = read_metrics(validation_run)[best_epoch - 1]
    assert sum(int(row["correct"]) for row in rows) == pytest.approx(float(best["test_top1"]))  # 100 test images
    assert (validation_run / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")


def test_test_only_writes_the_per_class_results_of_its_checkpoint(validation_run, tmp_path, small_synthetic):
    vit_main.main([*TINY_MODEL_FLAGS, "--test_only", "--checkpoint", str(validation_run / "last.pt"),
                   "--output_dir", str(tmp_path)])
    rows = per_class_rows(tmp_path, "test_per_class_accuracy.csv")
    last = read_metrics(validation_run)[-1]
    assert sum(int(row["correct"]) for row in rows) == pytest.approx(float(last["test_top1"]))
    assert {row["weights"] for row in rows} == {f"{validation_run / 'last.pt'} (epoch {len(read_metrics(validation_run))}, "
                                                "trained weights)"}
    assert (tmp_path / "test_confusion_matrix.png").is_file()
    assert not (tmp_path / "per_class_accuracy.csv").exists()


def test_an_evaluation_never_rewrites_the_per_class_record_of_the_training(validation_run, tmp_path, small_synthetic):
    # A freshly initialised model is not what the training's per-class record holds (best.pt's weights).
    run = tmp_path / "run"
    shutil.copytree(validation_run, run)
    record = {name: (run / name).read_bytes() for name in ("per_class_accuracy.csv", "confusion_matrix.png")}
    vit_main.main([*TINY_MODEL_FLAGS, "--test_only", "--checkpoint", "none", "--output_dir", str(run)])
    assert {name: (run / name).read_bytes() for name in record} == record
    rows = per_class_rows(run, "test_per_class_accuracy.csv")
    assert {row["weights"] for row in rows} == {"a freshly initialised model"}


@pytest.mark.slow
def test_resume_with_a_validation_split_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch):
    straight, resumed = assert_resume_repeats_a_straight_run(
        tiny_argv, tmp_path, monkeypatch, [*VALIDATION, "--num_epochs", "3", "--scheduler", "plateau"], crash_epoch=2)
    for expected, actual in zip(read_metrics(straight), read_metrics(resumed), strict=True):
        for column in ["val_loss", "val_top1", "val_top5"]:
            assert float(actual[column]) == pytest.approx(float(expected[column]), rel=0, abs=1e-6), column
    assert results_lines(resumed)[-1] == results_lines(straight)[-1]
    assert per_class_rows(resumed) == per_class_rows(straight)


def test_a_run_without_a_split_writes_the_seed_files(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(run_files.METRIC_COLUMNS)
    lines = results_lines(tmp_path)
    assert len(lines) == 3 and "Validation" not in lines[0] and lines[-1].startswith("Max Accuracy: ")
    assert set(DETERMINISTIC_COLUMNS) <= set(read_metrics(tmp_path)[0])


def test_a_checkpoint_from_before_the_split_flags_refuses_a_split_on_resume(validation_run, tiny_argv, tmp_path,
                                                                           capsys):
    shutil.copytree(validation_run, tmp_path, dirs_exist_ok=True)
    checkpoint = checkpoints.load_checkpoint(tmp_path / "last.pt")
    for name in ("val_split", "split_seed"):  # the flags newer than such checkpoints
        del checkpoint["args"][name]
    torch.save(checkpoint, tmp_path / "last.pt")
    line = expect_one_line_error(capsys, tiny_argv(tmp_path, "--resume", "auto", "--num_epochs", "2", *VALIDATION),
                                 2, "--val_split")
    assert "was trained with --val_split 0.0, not 0.2" in line


# ---------------------------------------------------------------------------------------------
# Counting per class
# ---------------------------------------------------------------------------------------------


def test_the_confusion_matrix_counts_by_hand():
    # Predictions (argmax of the logits): 0, 2, 1, 1, 2; true classes: 0, 1, 1, 2, 2.
    logits = torch.tensor([[9.0, 0, 0], [0, 1, 5], [0, 3, 1], [1, 4, 0], [0, 0, 2]])
    targets = torch.tensor([0, 1, 1, 2, 2])
    tally = train_eval._Tally(torch.device("cpu"), num_classes=3, confusion=True)
    tally.add(torch.zeros(3), logits[:3], targets[:3])
    tally.add(torch.zeros(2), logits[3:], targets[3:])
    expected = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    assert torch.equal(tally.confusion_matrix(), expected)
    assert run_files.per_class_table(expected, ["cat", "dog", "fox"], "w") == (
        "class_index,class_name,images,correct,accuracy,weights\n0,cat,1,1,100.0,w\n1,dog,2,1,50.0,w\n"
        "2,fox,2,1,50.0,w\n")


def test_a_class_without_test_images_has_no_accuracy():
    table = run_files.per_class_table(torch.tensor([[2, 0], [0, 0]]), ["a", "b"], "w")
    assert table.splitlines()[2] == "1,b,0,0,,w"


@pytest.mark.parametrize("classes", [10, 100])
def test_the_confusion_matrix_is_drawn_for_few_and_many_classes(classes, tmp_path, saved_figures):
    confusion = torch.randint(0, 5, (classes, classes))
    run_files.write_confusion_matrix(str(tmp_path / "matrix.png"), confusion, [f"c{i}" for i in range(classes)],
                                     "best.pt (epoch 7)")
    figure, dpi = saved_figures[0]
    axes = figure.axes[0]
    assert len(axes.texts) == (classes * classes if classes <= 20 else 0)
    assert axes.get_title() == "Test split, weights of best.pt (epoch 7)"
    assert texts_outside_or_overlapping(figure, dpi) == ([], [])
    assert (tmp_path / "matrix.png").read_bytes().startswith(b"\x89PNG")


def test_the_per_class_results_of_training_are_evaluated_with_best_pt_weights(validation_run, tmp_path,
                                                                             small_synthetic):
    # A model whose own (zeroed) weights would predict class 0 for every image: only best.pt's give best's numbers.
    args = vit_main.build_parser().parse_args([*TINY_MODEL_FLAGS, *VALIDATION])
    model, _ = vit_main.build_model(args, 32, 10)
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    trainer = runs._trainer({**vit_main.trainer_config(args), "model": model, "device": torch.device("cpu"),
                             "num_classes": 10})
    _, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False, need_train=False)
    test_loader = dataset.evaluation_loader(test, batch_size=64, num_workers=0, device=torch.device("cpu"))
    shutil.copytree(validation_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "per_class_accuracy.csv").unlink()
    history = checkpoints.load_checkpoint(tmp_path / "last.pt")["history"]
    runs._per_class_results_of_best(trainer, run_files.RunOutputs(str(tmp_path)), test_loader,
                                    [str(index) for index in range(10)], history)
    best = run_files.selected_record(history)
    assert sum(int(row["correct"]) for row in per_class_rows(tmp_path)) == pytest.approx(best["test_top1"])
