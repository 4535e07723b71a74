"""Datasets from files in their on-disk formats (nothing is downloaded) and the synthetic set."""

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import dataset
from tests.helpers import write_cifar10, write_cifar100


def normalised(value, name):
    mean, std = dataset.NORMALISATION[name]
    return torch.tensor([(value / 255 - m) / s for m, s in zip(mean, std)])


def test_cifar10_loads_from_its_python_batches(tmp_path, files_only_integrity):
    write_cifar10(tmp_path)
    train, test, classes, size = dataset.load_datasets("cifar10", str(tmp_path), resize=0, augment=False)
    assert (len(train), len(test), classes, size) == (20, 3, 10, 32)
    image, label = train[5]  # data_batch_2, second image
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 3
    torch.testing.assert_close(image[:, 0, 0], normalised(22, "cifar10"))
    assert [test[i][1] for i in range(3)] == [7, 8, 9]


def test_cifar100_loads_fine_labels(tmp_path, files_only_integrity):
    write_cifar100(tmp_path)
    train, test, classes, size = dataset.load_datasets("cifar100", str(tmp_path), resize=0, augment=False)
    assert (len(train), len(test), classes, size) == (6, 2, 100, 32)
    assert [train[i][1] for i in range(6)] == [0, 10, 20, 30, 40, 99]
    torch.testing.assert_close(test[1][0][:, 5, 5], normalised(70, "cifar100"))


def test_cifar_resize_and_test_only_loading(tmp_path, files_only_integrity):
    write_cifar10(tmp_path)
    train, test, _, size = dataset.load_datasets("cifar10", str(tmp_path), resize=48, augment=False, need_train=False)
    assert train is None and size == 48 and test[0][0].shape == (3, 48, 48)


def test_missing_cifar_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(dataset.DatasetUnavailableError) as error:
        dataset.load_datasets("cifar100", str(tmp_path), resize=0, augment=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--data_path: CIFAR-100")
    assert f"place cifar-100-python.tar.gz or the extracted cifar-100-python/ under {tmp_path}" in message


def write_image_folders(root, classes=("cat", "dog", "fox"), per_class=2, side=20):
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(per_class):
                Image.new("RGB", (side, side + 4), color=(index * 100, 50, 200)).save(folder / f"{number}.png")


def test_image_folders_load_as_imagenet(tmp_path):
    write_image_folders(tmp_path)
    train, test, classes, size = dataset.load_datasets("imagenet", str(tmp_path), resize=16, augment=False)
    assert (len(train), len(test), classes, size) == (6, 6, 3, 16)
    image, label = test[4]
    assert image.shape == (3, 16, 16) and label == 2 and test.classes == ["cat", "dog", "fox"]
    torch.testing.assert_close(image[:, 8, 8], torch.tensor(
        [(v / 255 - m) / s for v, m, s in zip((200, 50, 200), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    assert dataset.num_classes("imagenet", str(tmp_path)) == 3


def test_imagenet_needs_a_size_and_folders(tmp_path):
    with pytest.raises(ValueError, match="^--resize"):
        dataset.image_size("imagenet", 0)
    with pytest.raises(dataset.DatasetUnavailableError, match="^--data_path: no image folder"):
        dataset.num_classes("imagenet", str(tmp_path))


def test_image_sizes_known_before_loading():
    assert dataset.image_size("cifar10", 0) == 32 and dataset.image_size("synthetic", 0) == 32
    assert dataset.image_size("cifar100", 224) == 224 and dataset.image_size("imagenet", 160) == 160


def test_normalisation_constants():
    assert dataset.NORMALISATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert dataset.NORMALISATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dataset.NORMALISATION["imagenet"] == imagenet and dataset.NORMALISATION["synthetic"] == imagenet


def test_augmentation_applies_to_training_only(small_synthetic):
    train, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=True)
    train_steps = [type(step) for step in train.transform.transforms]
    test_steps = [type(step) for step in test.transform.transforms]
    assert v2.RandomCrop in train_steps and v2.RandomHorizontalFlip in train_steps
    assert v2.RandomCrop not in test_steps and v2.RandomHorizontalFlip not in test_steps
    crop = next(step for step in train.transform.transforms if isinstance(step, v2.RandomCrop))
    assert crop.padding == [4, 4, 4, 4]
    torch.manual_seed(0)
    views = {tuple(train[0][0].flatten()[:50].tolist()) for _ in range(10)}
    assert len(views) > 1 and train[0][0].shape == (3, 32, 32)


def test_synthetic_set_is_deterministic_balanced_and_split():
    first = dataset.SyntheticImages(300, seed=1)
    again = dataset.SyntheticImages(300, seed=1)
    other = dataset.SyntheticImages(300, seed=2)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (300, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.bincount(first.labels, minlength=10).tolist() == [30] * 10


def test_synthetic_classes_differ_beyond_noise():
    images = dataset.SyntheticImages(1000, seed=1)
    means = torch.stack([images.images[images.labels == c].float().mean(dim=(0, 2, 3)) for c in range(10)])
    # Classes sharing a colour (c and c + 5) differ by pattern only; others differ in mean colour.
    assert torch.cdist(means[:5], means[:5]).add(torch.eye(5) * 1e3).min() > 20


def test_synthetic_default_size_is_a_few_thousand_images():
    assert (dataset.SYNTHETIC_TRAIN_SIZE, dataset.SYNTHETIC_TEST_SIZE) == (5000, 1000)
    train, test, classes, size = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    assert (len(train), len(test), classes, size) == (5000, 1000, 10, 32)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


# ---------------------------------------------------------------------------------------------
# Image folders: one class index for both splits, hidden entries, damaged test images
# ---------------------------------------------------------------------------------------------


def write_split(root, split, classes, per_class=2):
    for index, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for number in range(per_class):
            Image.new("RGB", (8, 8), color=(index * 100, 50, 200)).save(folder / f"{number}.png")


@pytest.mark.parametrize("val_classes, differences", [
    (("cat", "fox"), "(missing from val/: dog)"),
    (("cat", "dog", "fox", "owl", "yak"), "(only in val/: owl, yak)"),
    (("cat", "dog", "fax"), "(missing from val/: fox; only in val/: fax)"),
], ids=["val-lacks-a-class", "val-has-extra-classes", "val-renames-a-class"])
def test_val_must_hold_the_classes_of_train(tmp_path, val_classes, differences):
    write_split(tmp_path, "train", ("cat", "dog", "fox"))
    write_split(tmp_path, "val", val_classes)
    for need_train in (True, False):  # evaluation alone numbers by train/ too when it is there
        with pytest.raises(dataset.DatasetUnavailableError) as error:
            dataset.num_classes("imagenet", str(tmp_path), need_train)
        message = str(error.value)
        assert "\n" not in message and message.startswith(
            f"--data_path: {tmp_path / 'val'} and {tmp_path / 'train'} hold different classes {differences}; "
            "give val/ one folder for each class of train/")
        with pytest.raises(dataset.DatasetUnavailableError, match="hold different classes"):
            dataset.load_datasets("imagenet", str(tmp_path), resize=8, augment=False, need_train=need_train)


def test_many_differing_classes_are_counted_not_all_named(tmp_path):
    write_split(tmp_path, "train", [f"class{index:02}" for index in range(12)], per_class=1)
    write_split(tmp_path, "val", ["class00"], per_class=1)
    with pytest.raises(dataset.DatasetUnavailableError,
                       match=r"\(missing from val/: class01, class02, class03, class04, class05 and 6 more\)"):
        dataset.num_classes("imagenet", str(tmp_path))


def test_evaluation_without_train_numbers_the_classes_of_val(tmp_path):
    write_split(tmp_path, "val", ("cat", "dog"))
    assert dataset.num_classes("imagenet", str(tmp_path), need_train=False) == 2
    train, test, classes, _ = dataset.load_datasets("imagenet", str(tmp_path), resize=8, augment=False,
                                                    need_train=False)
    assert train is None and classes == 2 and [test[i][1] for i in range(4)] == [0, 0, 1, 1]
    with pytest.raises(dataset.DatasetUnavailableError, match="no image folder at .*train"):
        dataset.num_classes("imagenet", str(tmp_path))  # training needs train/


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    write_split(tmp_path, "train", ("cat", "dog", "fox"))
    write_split(tmp_path, "val", ("cat", "dog", "fox"))
    for split in ("train", "val"):
        (tmp_path / split / ".ipynb_checkpoints").mkdir()  # an empty one, as Jupyter leaves them
        notebook_copies = tmp_path / split / "dog" / ".ipynb_checkpoints"
        notebook_copies.mkdir()
        Image.new("RGB", (8, 8)).save(notebook_copies / "0-checkpoint.png")
        (tmp_path / split / "cat" / "._0.png").write_bytes(b"macOS resource fork, not an image")
    train, test, classes, _ = dataset.load_datasets("imagenet", str(tmp_path), resize=8, augment=False)
    assert classes == 3 and train.classes == test.classes == ["cat", "dog", "fox"]
    assert len(train) == len(test) == 6 and [test[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    dataset.check_data("imagenet", str(tmp_path))


def test_a_class_with_only_hidden_images_has_no_image_files(tmp_path):
    write_split(tmp_path, "train", ("cat", "dog"))
    write_split(tmp_path, "val", ("cat",))
    (tmp_path / "val" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "dog" / ".hidden.png")
    with pytest.raises(dataset.DatasetUnavailableError) as error:
        dataset.check_data("imagenet", str(tmp_path))
    assert str(error.value).startswith(f"--data_path: no image files in {tmp_path / 'val' / 'dog'};")


def truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated-jpeg", "not-an-image", "beyond-the-pixel-limit"])
def test_a_damaged_test_image_is_found_before_training(tmp_path, damage, monkeypatch):
    write_split(tmp_path, "train", ("cat", "dog"))
    write_split(tmp_path, "val", ("cat", "dog"))
    bad = tmp_path / "val" / "dog" / "1.jpg"
    if damage == "truncated-jpeg":
        truncated_jpeg(bad)  # opens and passes PIL's verify(); only decoding finds it
    elif damage == "not-an-image":
        bad.write_bytes(b"an HTML error page saved as .jpg")
    else:  # PIL refuses more than twice MAX_IMAGE_PIXELS with DecompressionBombError, not an OSError
        Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(bad)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(dataset.DatasetUnavailableError) as error:
        dataset.check_data("imagenet", str(tmp_path))
    assert str(error.value).startswith(f"--data_path: {bad} is not a readable image (")
    assert str(error.value).endswith("); replace or remove it")


def test_check_data_passes_intact_folders(tmp_path):
    write_split(tmp_path, "train", ("cat", "dog"))
    write_split(tmp_path, "val", ("cat", "dog"))
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(tmp_path / "val" / "cat" / "2.jpg")
    dataset.check_data("imagenet", str(tmp_path))
    dataset.check_data("imagenet", str(tmp_path), need_train=False)


def test_synthetic_sizes_must_fit_in_memory(monkeypatch):
    monkeypatch.setattr(dataset, "_physical_memory", lambda: 300 * dataset.SYNTHETIC_BYTES_PER_IMAGE)
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "200,100")
    assert dataset.synthetic_sizes() == (200, 100)
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "200,101")
    with pytest.raises(dataset.DatasetUnavailableError) as error:
        dataset.check_data("synthetic", "unused")
    assert str(error.value) == ("CONVNN_SYNTHETIC_SIZES: 200,101 is 301 images, more than this machine's memory "
                                "holds while generating them (300 at most, 64 KiB each); give smaller sizes, "
                                "e.g. 5000,1000")


@pytest.mark.slow
def test_importing_the_datasets_loads_no_plotting_library():
    # In a fresh interpreter: this one has matplotlib loaded by the tests that draw.
    check = "import sys, dataset; assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    finished = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
