"""tinyimagenet: Tiny-ImageNet-200 as tiny-imagenet-200.zip unpacks, built tiny in tmp dirs."""

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import vit_main
from tests.helpers import DETERMINISTIC_COLUMNS, TINY_MODEL_FLAGS, expect_one_line_error, read_metrics

# wnids.txt lists its classes unsorted; the class index is their sorted order.
WNIDS = ("n02124075", "n01443537", "n09999999")
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n04067472": "reel"}


def colour(label, number):
    return (label * 80, number * 20, 200)


def write_tiny_imagenet(root, train_per_class=2, val_per_class=2, words=True):
    """The archive's layout under root/tiny-imagenet-200 (test/ has no labels and is left out)."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in WNIDS))
    if words:
        (base / "words.txt").write_text("".join(f"{wnid}\t{text}\n" for wnid, text in WORDS.items()))
    for wnid in WNIDS:
        label = sorted(WNIDS).index(wnid)
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for number in range(train_per_class):
            Image.new("RGB", (64, 64), colour(label, number)).save(images / f"{wnid}_{number}.JPEG", quality=95)
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for index in range(val_per_class * len(WNIDS)):
        wnid = WNIDS[index % len(WNIDS)]
        Image.new("RGB", (64, 64), colour(sorted(WNIDS).index(wnid), 9)).save(
            base / "val" / "images" / f"val_{index}.JPEG", quality=95)
        lines.append(f"val_{index}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def test_tiny_imagenet_loads_in_its_archive_layout(tmp_path):
    write_tiny_imagenet(tmp_path)
    train, test, classes, size = dataset.load_datasets("tinyimagenet", str(tmp_path), resize=0, augment=False)
    assert (len(train), len(test), classes, size) == (6, 6, 3, 64)
    assert test.classes == ["goldfish, Carassius auratus", "Egyptian cat", "n09999999"]  # no words: the wnid
    assert [test[index][1] for index in range(6)] == [1, 0, 2, 1, 0, 2]  # val_annotations.txt's order
    image, label = train[3]
    assert image.shape == (3, 64, 64) and label == 1
    mean, std = dataset.NORMALISATION["tinyimagenet"]
    expected = torch.tensor([(value / 255 - m) / s for value, m, s in zip(colour(1, 1), mean, std)])
    torch.testing.assert_close(image[:, 32, 32], expected, atol=0.05, rtol=0)  # JPEG's rounding
    dataset.check_data("tinyimagenet", str(tmp_path))


def test_data_path_may_be_the_unpacked_folder_itself_and_words_are_optional(tmp_path):
    base = write_tiny_imagenet(tmp_path, words=False)
    train, test, classes, _ = dataset.load_datasets("tinyimagenet", str(base), resize=0, augment=False,
                                                    need_train=False)
    assert train is None and classes == 3 and test.classes == sorted(WNIDS)


def test_device_loader_holds_the_decoded_images_of_the_worker_path(tmp_path):
    write_tiny_imagenet(tmp_path)
    train, _, _, _ = dataset.load_datasets("tinyimagenet", str(tmp_path), resize=0, augment=False)
    loader = dataset.DeviceLoader(train, dataset="tinyimagenet", resize=0, augment=False, shuffle=False,
                                  batch_size=4, device=torch.device("cpu"))
    device_images = torch.cat([images for images, _ in loader])
    assert torch.equal(device_images, torch.stack([train[index][0] for index in range(len(train))]))


def break_layout(base, fault):
    if fault == "no-wnids":
        (base / "wnids.txt").unlink()
    elif fault == "empty-class":
        for image in (base / "train" / "n01443537" / "images").iterdir():
            image.unlink()
    elif fault == "unknown-wnid":
        annotations = base / "val" / "val_annotations.txt"
        annotations.write_text(annotations.read_text() + "val_0.JPEG\tn00000001\t0\t0\t1\t1\n")
    elif fault == "missing-val-image":
        (base / "val" / "images" / "val_4.JPEG").unlink()
    else:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        path = base / "val" / "images" / "val_2.JPEG"
        Image.fromarray(noise).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:600])


EXPECTED = {
    "no-wnids": "--data_path: no Tiny-ImageNet in ",
    "empty-class": "--data_path: no image files in ",
    "unknown-wnid": "--data_path: line 7 of ",
    "missing-val-image": "--data_path: ",
    "truncated-val-image": "--data_path: ",
}


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_missing_or_damaged_files_are_one_line_errors_before_any_output(tmp_path, capsys, fault):
    base = write_tiny_imagenet(tmp_path / "data")
    break_layout(base, fault)
    output = tmp_path / "run"
    line = expect_one_line_error(capsys, [*TINY_MODEL_FLAGS, "--dataset", "tinyimagenet", "--data_path",
                                          tmp_path / "data", "--output_dir", output], 2, EXPECTED[fault])
    assert not output.exists() or not any(output.iterdir())
    if fault == "missing-val-image":
        assert "val_4.JPEG, listed in val/val_annotations.txt, is missing; restore them from" in line
    if fault == "truncated-val-image":
        assert "val_2.JPEG is not a readable image (" in line


@pytest.mark.slow
def test_a_short_run_trains_on_either_loader(tmp_path):
    write_tiny_imagenet(tmp_path / "data")
    for loader in ("workers", "device"):
        vit_main.main([*TINY_MODEL_FLAGS, "--dataset", "tinyimagenet", "--data_path", str(tmp_path / "data"),
                       "--num_epochs", "2", "--data_loader", loader, "--output_dir", str(tmp_path / loader)])
    workers, device = ([[row[column] for column in DETERMINISTIC_COLUMNS] for row in read_metrics(tmp_path / loader)]
                       for loader in ("workers", "device"))
    assert len(workers) == 2 and workers == device


def test_a_moved_copy_keeps_its_fingerprint_and_another_image_changes_it(tmp_path):
    fingerprints = []
    for copy in ("first", "second", "third"):
        write_tiny_imagenet(tmp_path / copy)
        if copy == "third":
            Image.new("RGB", (64, 64)).save(tmp_path / copy / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" /
                                            "extra.JPEG")
        train, test, _, _ = dataset.load_datasets("tinyimagenet", str(tmp_path / copy), resize=0, augment=False)
        fingerprints.append(dataset.fingerprint("tinyimagenet", train, test))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert str(tmp_path) not in fingerprints[0] and fingerprints[0].startswith("tinyimagenet classes=3:")
