"""dataset.fingerprint: one line that a moved copy of the data keeps and different data never shares."""

import pickle
import shutil

import pytest
from PIL import Image

import dataset
from tests.helpers import write_cifar10, write_pickle


def write_folders(root, classes=("cat", "dog", "fox"), per_class=2):
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(per_class):
                Image.new("RGB", (8, 8), color=(index * 100, number, 200)).save(folder / f"{number}.png")
    return root


def folder_fingerprint(root, need_train=True):
    train, test, _, _ = dataset.load_datasets("imagenet", str(root), resize=8, augment=False, need_train=need_train)
    return dataset.fingerprint("imagenet", train, test)


def test_a_moved_folder_keeps_its_fingerprint_and_names_no_path(tmp_path):
    first = folder_fingerprint(write_folders(tmp_path / "first"))
    shutil.copytree(tmp_path / "first", tmp_path / "elsewhere" / "second")
    assert folder_fingerprint(tmp_path / "elsewhere" / "second") == first
    assert "\n" not in first and str(tmp_path) not in first
    assert first.startswith("imagenet classes=3:") and " train=6 test=6 content=" in first


def test_evaluation_alone_is_told_apart_from_training(tmp_path):
    root = write_folders(tmp_path)
    alone = folder_fingerprint(root, need_train=False)
    assert " train=none test=6 " in alone and alone != folder_fingerprint(root)


@pytest.mark.parametrize("change", ["renamed-class", "one-image-more", "one-image-less", "renamed-image"])
def test_different_folders_have_different_fingerprints(tmp_path, change):
    original = folder_fingerprint(write_folders(tmp_path / "original"))
    changed = tmp_path / "changed"
    if change == "renamed-class":
        write_folders(changed, classes=("cat", "dog", "owl"))
    else:
        write_folders(changed)
        val_dog = changed / "val" / "dog"
        if change == "one-image-more":
            Image.new("RGB", (8, 8)).save(val_dog / "2.png")
        elif change == "one-image-less":
            (val_dog / "1.png").unlink()
        else:
            (val_dog / "1.png").rename(val_dog / "9.png")
    assert folder_fingerprint(changed) != original


def cifar_fingerprint(root, name="cifar10"):
    train, test, _, _ = dataset.load_datasets(name, str(root), resize=0, augment=False)
    return dataset.fingerprint(name, train, test)


def rewrite_batch(root, name, change):
    path = root / "cifar-10-batches-py" / name
    with open(path, "rb") as handle:
        content = pickle.load(handle, encoding="latin1")
    change(content)
    write_pickle(path, content)


@pytest.mark.parametrize("change", ["label", "pixel", "class-name"])
def test_cifar_fingerprint_covers_labels_images_and_class_names(tmp_path, files_only_integrity, change):
    write_cifar10(tmp_path / "original")
    write_cifar10(tmp_path / "changed")
    original = cifar_fingerprint(tmp_path / "original")
    assert cifar_fingerprint(tmp_path / "changed") == original
    if change == "label":
        rewrite_batch(tmp_path / "changed", "data_batch_3", lambda batch: batch["labels"].__setitem__(0, 0))
    elif change == "pixel":
        rewrite_batch(tmp_path / "changed", "test_batch", lambda batch: batch["data"].__setitem__((1, 7), 0))
    else:
        rewrite_batch(tmp_path / "changed", "batches.meta", lambda meta: meta["label_names"].__setitem__(4, "deer"))
    assert cifar_fingerprint(tmp_path / "changed") != original


def test_another_dataset_or_a_held_out_split_has_another_fingerprint(tmp_path, small_synthetic, files_only_integrity):
    train, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    synthetic = dataset.fingerprint("synthetic", train, test)
    assert synthetic == dataset.fingerprint("synthetic", *dataset.load_datasets("synthetic", "unused", 0, False)[:2])
    training, validation = dataset.hold_out_validation(train, "synthetic", 0, 0.1, split_seed=0)
    held_out = dataset.fingerprint("synthetic", training, test)
    assert held_out != synthetic and " train=180 " in held_out
    assert dataset.fingerprint("synthetic", training, validation) not in (synthetic, held_out)
    write_cifar10(tmp_path)
    assert cifar_fingerprint(tmp_path) != synthetic
