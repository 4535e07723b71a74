"""scripts/predict.py: labelling a folder of images with a trained checkpoint. Its predictions on a
labelled val/ folder give exactly --test_only's top-1; unreadable images are reported and skipped; bad
input is refused in one line before any image is read; the training checkpoints name their classes."""

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import vit_main
from scripts import predict
from models.vit import ViT
from tests.helpers import TINY_MODEL_FLAGS, expect_one_line_error, train_small_run, write_cifar10, write_cifar100

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
CLASSES = ("cat", "dog", "fox")
PER_CLASS = 5
IMAGENET_FLAGS = ["--dataset", "imagenet", "--resize", "32"]


def write_photo(path, colour, seed, size=(28, 24)):
    """A noisy picture tinted by ``colour``: each file differs, so the model's outputs differ too."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 120, (size[1], size[0], 3), generator=generator)
    pixels = (noise + torch.tensor(colour)).clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_imagenet_layout(root):
    """train/ and val/ with a folder of PER_CLASS images for each of CLASSES."""
    for split_number, split in enumerate(("train", "val")):
        for index, name in enumerate(CLASSES):
            for number in range(PER_CLASS):
                seed = 1000 * split_number + 10 * index + number
                write_photo(root / split / name / f"{number}.png", (index * 60, 40, 120 - index * 40), seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for an epoch on a tiny image-folder dataset, with EMA weights: (run, images)."""
    root = tmp_path_factory.mktemp("predict")
    images = root / "images"
    write_imagenet_layout(images)
    run = train_small_run(root / "run", *IMAGENET_FLAGS, "--data_path", str(images), "--num_epochs", "1",
                          "--ema_decay", "0.5", "--batch_size", "4")
    return run, images


def predict_argv(checkpoint, images, output, *flags):
    return ["--checkpoint", str(checkpoint), "--images", str(images), "--output", str(output), "--device", "cpu",
            "--num_workers", "0", *map(str, flags)]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_checkpoints_name_their_classes(trained):
    run, _ = trained
    for name in ("last.pt", "best.pt"):
        assert checkpoints.load_checkpoint(run / name)["class_names"] == list(CLASSES)


@pytest.mark.parametrize("weights, test_weights", [("trained", "model"), ("ema", "ema")])
def test_predictions_on_val_give_test_only_top1_exactly(trained, tmp_path, tiny_argv, weights, test_weights):
    run, images = trained
    vit_main.main(tiny_argv(run, *IMAGENET_FLAGS, "--data_path", images, "--test_only", "--checkpoint",
                            run / "last.pt", "--test_weights", test_weights, "--batch_size", "4"))
    output = tmp_path / "val.csv"
    predict.main(predict_argv(run / "last.pt", images / "val", output, "--weights", weights))
    rows = read_rows(output)
    assert len(rows) == len(CLASSES) * PER_CLASS and list(rows[0]) == predict.csv_header(len(CLASSES))
    correct = [row["path"].split("/")[0] == row["prediction"] for row in rows]
    top1 = re.search(r"Top1: ([0-9.]+)%", (run / "test_results.txt").read_text()).group(1)
    assert f"{100.0 * sum(correct) / len(rows):.4f}" == top1
    with open(run / "per_class_accuracy.csv", newline="") as handle:
        per_class = {row["class_name"]: int(row["correct"]) for row in csv.DictReader(handle)}
    assert per_class == {name: sum(ok for row, ok in zip(rows, correct) if row["path"].startswith(name + "/"))
                         for name in CLASSES}


def test_ema_weights_give_other_probabilities_than_the_trained_ones(trained, tmp_path):
    run, images = trained
    for weights in ("trained", "ema"):
        predict.main(predict_argv(run / "last.pt", images / "val", tmp_path / f"{weights}.csv", "--weights", weights))
    trained_rows, ema_rows = read_rows(tmp_path / "trained.csv"), read_rows(tmp_path / "ema.csv")
    assert [row["path"] for row in trained_rows] == [row["path"] for row in ema_rows]
    assert [row["probability"] for row in trained_rows] != [row["probability"] for row in ema_rows]


def test_csv_lists_the_top_k_classes_of_every_image_in_sorted_order(trained, tmp_path, capsys):
    run, images = trained
    folder = tmp_path / "photos"
    for relative in ("b.png", "a/z.jpg", "a/c.png", "a.b/y.png", "a/deeper/x.JPEG"):
        write_photo(folder / relative, (100, 100, 100), len(relative))
    output = tmp_path / "out.csv"
    predict.main(predict_argv(run / "best.pt", folder, output, "--top_k", "3", "--batch_size", "2"))
    assert "Labelled 5 images" in capsys.readouterr().out
    with open(output, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["path", "prediction", "probability", "prediction_2", "probability_2", "prediction_3",
                      "probability_3"]
    assert [row[0] for row in rows] == ["a/c.png", "a/deeper/x.JPEG", "a/z.jpg", "a.b/y.png", "b.png"]
    for row in rows:
        assert sorted(row[1::2]) == sorted(CLASSES)
        probabilities = [float(value) for value in row[2::2]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_the_script_runs_from_the_command_line_with_worker_processes(trained, tmp_path):
    run, images = trained
    output = tmp_path / "val.csv"
    argv = predict_argv(run / "last.pt", images / "val", output)
    argv[argv.index("--num_workers") + 1] = "2"
    finished = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert f"Labelled {len(CLASSES) * PER_CLASS} images" in finished.stdout
    predict.main(predict_argv(run / "last.pt", images / "val", tmp_path / "in_process.csv"))
    assert output.read_text() == (tmp_path / "in_process.csv").read_text()


def test_predictions_are_the_models_own(trained, tmp_path):
    """The CSV holds the softmax of the model's logits on the evaluation transform of each image."""
    run, images = trained
    output = tmp_path / "out.csv"
    predict.main(predict_argv(run / "last.pt", images / "val" / "dog", output, "--top_k", "1"))
    checkpoint = checkpoints.load_checkpoint(run / "last.pt")
    settings = predict.run_settings(checkpoint)
    model = predict.fitted_model(settings, checkpoint["model"], list(CLASSES), False, "last.pt")
    transform = predict.dataset.build_transform("imagenet", 32, augment=False)
    for row in read_rows(output):
        with Image.open(images / "val" / "dog" / row["path"]) as image:
            logits = model(transform(image.convert("RGB")).unsqueeze(0))
        probability, label = logits.softmax(dim=1).max(dim=1)
        assert (row["prediction"], float(row["probability"])) == (CLASSES[label], pytest.approx(probability.item(),
                                                                                                 rel=1e-5))


def test_hidden_files_folders_and_other_files_are_not_images(trained, tmp_path):
    run, _ = trained
    folder = tmp_path / "photos"
    write_photo(folder / "kept.png", (0, 0, 0), 1)
    write_photo(folder / ".hidden.png", (0, 0, 0), 2)
    write_photo(folder / ".ipynb_checkpoints" / "kept-checkpoint.png", (0, 0, 0), 3)
    (folder / "notes.txt").write_text("not an image, and not named like one")
    output = tmp_path / "out.csv"
    predict.main(predict_argv(run / "last.pt", folder, output))
    assert [row["path"] for row in read_rows(output)] == ["kept.png"]


def truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 80).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_unreadable_images_are_reported_and_skipped(trained, tmp_path, capsys, num_workers):
    run, _ = trained
    folder = tmp_path / "photos"
    write_photo(folder / "a.png", (0, 0, 0), 1)
    write_photo(folder / "z.png", (0, 0, 0), 2)
    folder.joinpath("empty.jpg").write_bytes(b"")
    folder.joinpath("text.png").write_text("not an image")
    truncated_jpeg(folder / "truncated.jpg")
    output = tmp_path / "out.csv"
    predict.main([*predict_argv(run / "last.pt", folder, output, "--batch_size", "2"), "--num_workers",
                  str(num_workers)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    reports = captured.err.splitlines()
    assert len(reports) == 3
    for name in ("empty.jpg", "text.png", "truncated.jpg"):
        assert sum(str(folder / name) in line and "not a readable image" in line for line in reports) == 1
    assert [row["path"] for row in read_rows(output)] == ["a.png", "z.png"]
    assert "Labelled 2 images" in captured.out and "skipped 3" in captured.out


def untrained_synthetic_checkpoint(path):
    """A checkpoint of the tiny model for the synthetic set (32 px, --resize 0), as written before
    checkpoints held their class names."""
    settings = vit_main.build_parser().parse_args(TINY_MODEL_FLAGS)
    model = ViT(**vit_main.model_config(settings, 32, 10))
    checkpoints.save_checkpoint(str(path), {"model": model.state_dict(), "args": vars(settings)})
    return path


def test_a_native_size_model_skips_images_of_another_size(tmp_path, capsys):
    checkpoint = untrained_synthetic_checkpoint(tmp_path / "synthetic.pt")
    folder = tmp_path / "photos"
    write_photo(folder / "fits.png", (0, 0, 0), 1, size=(32, 32))
    write_photo(folder / "wide.png", (0, 0, 0), 2, size=(40, 32))
    predict.main(predict_argv(checkpoint, folder, tmp_path / "out.csv", "--top_k", "10"))
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"skipped {folder / 'wide.png'}: 40x32 pixels, but the model takes 32x32 "
                                         "images (its run had --resize 0); resize it"]
    rows = read_rows(tmp_path / "out.csv")
    assert [row["path"] for row in rows] == ["fits.png"]
    assert sorted(rows[0][key] for key in rows[0] if key.startswith("prediction")) == sorted(map(str, range(10)))


def test_an_interrupted_run_leaves_the_earlier_output(trained, tmp_path, capsys, monkeypatch):
    run, images = trained
    output = tmp_path / "out.csv"
    output.write_text("earlier\n")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "ranked_classes", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(predict_argv(run / "last.pt", images / "val", output))
    assert exit_info.value.code == 130
    assert "Traceback" not in capsys.readouterr().err
    assert output.read_text() == "earlier\n"
    assert [path.name for path in tmp_path.iterdir()] == ["out.csv"]


# ---------------------------------------------------------------------------------------------
# Class names of checkpoints written before they stored them
# ---------------------------------------------------------------------------------------------


def without_class_names(checkpoint_path, destination, **changed_args):
    checkpoint = checkpoints.load_checkpoint(checkpoint_path)
    del checkpoint["class_names"]
    checkpoint["args"] = {**checkpoint["args"], **{name: str(value) for name, value in changed_args.items()}}
    checkpoints.save_checkpoint(str(destination), checkpoint)
    return destination


def test_older_checkpoints_take_their_class_names_from_the_image_folders(trained, tmp_path):
    run, images = trained
    older = without_class_names(run / "last.pt", tmp_path / "older.pt")
    predict.main(predict_argv(run / "last.pt", images / "val", tmp_path / "new.csv"))
    predict.main(predict_argv(older, images / "val", tmp_path / "old.csv"))
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "new.csv").read_text()


def test_older_checkpoints_without_their_data_are_refused(trained, tmp_path, capsys):
    run, images = trained
    older = without_class_names(run / "last.pt", tmp_path / "older.pt", data_path=tmp_path / "moved")
    line = expect_one_line_error(capsys, predict_argv(older, images / "val", tmp_path / "out.csv"), 2,
                                 "--checkpoint: ", main=predict.main)
    assert "stores no class names" in line and str(tmp_path / "moved") in line


def test_cifar_class_names_come_from_their_meta_files(tmp_path):
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    settings = predict.run_settings({"args": {"dataset": "cifar10", "data_path": str(tmp_path)}})
    assert predict.dataset_class_names(settings) == [f"class{index}" for index in range(10)]
    settings.dataset = "cifar100"
    assert predict.dataset_class_names(settings) == [f"fine{index}" for index in range(100)]
    settings.dataset = "synthetic"
    assert predict.dataset_class_names(settings) == [str(index) for index in range(10)]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any image is read
# ---------------------------------------------------------------------------------------------


def bare_state_dict(run, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(checkpoints.load_checkpoint(run / "last.pt")["model"], path)
    return path


def without_ema(run, tmp_path):
    checkpoint = checkpoints.load_checkpoint(run / "last.pt")
    del checkpoint["ema"]
    path = tmp_path / "no_ema.pt"
    checkpoints.save_checkpoint(str(path), checkpoint)
    return path


def damaged(run, tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes((run / "last.pt").read_bytes()[:1000])
    return path


@pytest.mark.parametrize("checkpoint, images, flags, starts_with", [
    (None, "val", ["--top_k", "0"], "--top_k: must be >= 1"),
    (None, "val", ["--top_k", "4"], "--top_k: the model has 3 classes"),
    (None, "val", ["--batch_size", "0"], "--batch_size: must be >= 1"),
    (None, "val", ["--num_workers", "-1"], "--num_workers: must be >= 0"),
    (None, "no_such_folder", [], "--images: no folder"),
    (None, "empty", [], "--images: no image files under"),
    (lambda run, tmp_path: tmp_path / "missing.pt", "val", [], "--checkpoint: no file"),
    (damaged, "val", [], "--checkpoint: "),
    (bare_state_dict, "val", [], "--checkpoint: "),
    (without_ema, "val", ["--weights", "ema"], "--weights: "),
], ids=["top-k-0", "top-k-above-classes", "batch-size-0", "negative-workers", "no-folder", "no-images",
        "missing-checkpoint", "damaged-checkpoint", "bare-state-dict", "no-ema-weights"])
def test_bad_input_is_one_line_before_any_image_is_read(trained, tmp_path, capsys, monkeypatch, checkpoint, images,
                                                        flags, starts_with):
    run, image_root = trained
    folders = {"val": image_root / "val", "no_such_folder": tmp_path / "nothing", "empty": tmp_path / "empty"}
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    write_photo(tmp_path / "empty" / ".hidden" / "a.png", (0, 0, 0), 1)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    path = checkpoint(run, tmp_path) if checkpoint else run / "last.pt"

    def no_reading(*args):
        raise AssertionError("an image was read")

    monkeypatch.setattr(predict.ImageFiles, "__getitem__", no_reading)
    line = expect_one_line_error(capsys, predict_argv(path, folders[images], tmp_path / "out.csv", *flags), 2,
                                 starts_with, main=predict.main)
    assert not (tmp_path / "out.csv").exists(), line


@pytest.mark.parametrize("output, starts_with", [("missing/out.csv", "--output: no folder"),
                                                 ("folder", "--output: ")])
def test_an_output_that_cannot_be_written_is_refused_first(trained, tmp_path, capsys, output, starts_with):
    run, images = trained
    (tmp_path / "folder").mkdir()
    expect_one_line_error(capsys, predict_argv(run / "no_such.pt", images / "val", tmp_path / output), 2,
                          starts_with, main=predict.main)
    assert not (tmp_path / "missing").exists()
