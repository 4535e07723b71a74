"""imagenet32 and imagenet64: Downsampled ImageNet's pickled batches, built tiny in tmp dirs."""

import numpy as np
import pytest
import torch

import dataset
import vit_main
from tests.helpers import DETERMINISTIC_COLUMNS, TINY_MODEL_FLAGS, expect_one_line_error, read_metrics, write_pickle

# A few labels of the 1..1000 the files hold, the highest among them.
LABELS = (1, 500, 1000)


def batch_images(count, side, offset):
    """Rows of 3 * side * side bytes: the red, green and blue planes, each plane one value per image and channel."""
    planes = [np.full((count, side * side), 0, dtype=np.uint8) for _ in range(3)]
    for channel, plane in enumerate(planes):
        plane[:] = (np.arange(count, dtype=np.uint8) * 7 + offset + 60 * channel).reshape(count, 1)
    return np.concatenate(planes, axis=1)


def write_downsampled(root, side, per_batch=2, val=3, folders=True):
    """The ten training batches and val_data, in Imagenet{side}_train/ and Imagenet{side}_val/ as the
    archives unpack (or all in ``root`` with ``folders`` False)."""
    train_folder = root / f"Imagenet{side}_train" if folders else root
    val_folder = root / f"Imagenet{side}_val" if folders else root
    train_folder.mkdir(parents=True, exist_ok=True)
    val_folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, 11):
        labels = [LABELS[(number + index) % len(LABELS)] for index in range(per_batch)]
        write_pickle(train_folder / f"train_data_batch_{number}", {
            "data": batch_images(per_batch, side, number), "labels": labels, "mean": np.zeros(3 * side * side)})
    write_pickle(val_folder / "val_data", {"data": batch_images(val, side, 100),
                                           "labels": [LABELS[index % len(LABELS)] for index in range(val)]})
    return root


@pytest.mark.parametrize("name, side", [("imagenet32", 32), ("imagenet64", 64)])
def test_downsampled_imagenet_loads_its_batches(tmp_path, name, side):
    write_downsampled(tmp_path, side)
    train, test, classes, size = dataset.load_datasets(name, str(tmp_path), resize=0, augment=False)
    assert (len(train), len(test), classes, size) == (20, 3, 1000, side)
    assert train.images.dtype == torch.uint8 and train.images.shape == (20, 3, side, side)
    image, label = train[3]  # train_data_batch_2's second image
    assert image.shape == (3, side, side) and label == LABELS[(2 + 1) % 3] - 1
    mean, std = dataset.NORMALISATION[name]
    expected = [((1 * 7 + 2 + 60 * channel) / 255 - m) / s for channel, (m, s) in enumerate(zip(mean, std))]
    torch.testing.assert_close(image[:, 5, 5], torch.tensor(expected))
    assert sorted(set(dataset.split_labels(test).tolist())) == [0, 499, 999]
    assert dataset.class_names(test, 1000)[999] == "999"


def test_files_directly_in_data_path_and_evaluation_alone(tmp_path):
    write_downsampled(tmp_path, 32, folders=False)
    train, test, _, _ = dataset.load_datasets("imagenet32", str(tmp_path), resize=0, augment=False, need_train=False)
    assert train is None and len(test) == 3


def test_both_sides_in_one_data_path_each_find_their_own(tmp_path):
    write_downsampled(tmp_path, 32)
    write_downsampled(tmp_path, 64, per_batch=1)
    assert len(dataset.load_datasets("imagenet32", str(tmp_path), 0, False)[0]) == 20
    assert len(dataset.load_datasets("imagenet64", str(tmp_path), 0, False)[0]) == 10


def damage(tmp_path, fault):
    batch = tmp_path / "Imagenet32_train" / "train_data_batch_7"
    if fault == "missing":
        batch.unlink()
    elif fault == "not-a-pickle":
        batch.write_bytes(b"<html>an error page saved under the batch's name</html>")
    elif fault == "truncated":
        batch.write_bytes(batch.read_bytes()[:200])
    elif fault == "wrong-side":
        write_pickle(batch, {"data": batch_images(2, 64, 0), "labels": [1, 2]})
    elif fault == "label-0":
        write_pickle(batch, {"data": batch_images(2, 32, 0), "labels": [0, 2]})
    else:
        write_pickle(batch, {"data": batch_images(2, 32, 0), "labels": [1]})
    return batch


FAULTS = ["missing", "not-a-pickle", "truncated", "wrong-side", "label-0", "labels-short"]


@pytest.mark.parametrize("fault", FAULTS)
def test_missing_or_damaged_batches_are_one_line_errors(tmp_path, fault):
    write_downsampled(tmp_path, 32)
    batch = damage(tmp_path, fault)
    with pytest.raises(dataset.DatasetUnavailableError) as error:
        if fault == "missing":
            dataset.check_data("imagenet32", str(tmp_path))
        dataset.load_datasets("imagenet32", str(tmp_path), resize=0, augment=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--data_path: ")
    if fault == "missing":
        assert "no train_data_batch_7 of ImageNet 32x32" in message
    else:
        assert message.startswith(f"--data_path: {batch} is not a batch of ImageNet 32x32 (")


def test_a_damaged_batch_stops_the_run_before_any_output(tmp_path, capsys):
    write_downsampled(tmp_path / "data", 32)
    damage(tmp_path / "data", "truncated")
    output = tmp_path / "run"
    expect_one_line_error(capsys, [*TINY_MODEL_FLAGS, "--dataset", "imagenet32", "--data_path", tmp_path / "data",
                                   "--output_dir", output], 2, "--data_path: ")
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("imagenet32", 32), ("imagenet64", 64)])
def test_a_short_run_trains_on_either_loader(tmp_path, name, side):
    write_downsampled(tmp_path / "data", side)
    for loader in ("workers", "device"):
        vit_main.main([*TINY_MODEL_FLAGS, "--dataset", name, "--data_path", str(tmp_path / "data"), "--num_epochs",
                       "2", "--data_loader", loader, "--output_dir", str(tmp_path / loader)])
    workers, device = ([[row[column] for column in DETERMINISTIC_COLUMNS] for row in read_metrics(tmp_path / loader)]
                       for loader in ("workers", "device"))
    assert len(workers) == 2 and workers == device


def test_a_moved_copy_keeps_its_fingerprint_and_another_label_changes_it(tmp_path):
    fingerprints = []
    for copy in ("first", "second", "third"):
        write_downsampled(tmp_path / copy, 32)
        if copy == "third":
            write_pickle(tmp_path / copy / "Imagenet32_val" / "val_data", {"data": batch_images(3, 32, 100),
                                                                           "labels": [1, 500, 999]})
        train, test, _, _ = dataset.load_datasets("imagenet32", str(tmp_path / copy), resize=0, augment=False)
        fingerprints.append(dataset.fingerprint("imagenet32", train, test))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert fingerprints[0].startswith("imagenet32 classes=1000:") and " train=20 test=3 " in fingerprints[0]
