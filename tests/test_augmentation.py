"""--auto_augment, --augment_magnitude, --random_erasing and ImageNet's --augment: the transforms each
builds, that every image gets its own draw on both data paths, the refusals, and exact reproducibility."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import dataset
import runs
import vit_main
from tests.helpers import assert_resume_repeats_a_straight_run, read_metrics
from tests.helpers import expect_one_line_error


def step_types(transform):
    return [type(step) for step in transform.transforms]


def test_without_the_options_the_transforms_are_the_earlier_ones():
    assert step_types(dataset.build_transform("cifar10", 0, augment=False)) == [v2.ToImage, v2.ToDtype, v2.Normalize]
    assert step_types(dataset.build_transform("cifar10", 0, augment=True)) == [
        v2.ToImage, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    assert step_types(dataset.build_transform("imagenet", 64, augment=False)) == [
        v2.ToImage, v2.Resize, v2.ToDtype, v2.Normalize]


@pytest.mark.parametrize("name, policy, expected", [
    ("cifar10", "trivialaugment", v2.TrivialAugmentWide),
    ("cifar100", "autoaugment", v2.AutoAugment),
    ("synthetic", "randaugment", v2.RandAugment),
    ("imagenet", "autoaugment", v2.AutoAugment),
])
def test_auto_augment_comes_after_crop_and_flip_and_erasing_after_normalisation(name, policy, expected):
    transform = dataset.build_transform(name, 32, augment=True, auto_augment=policy, augment_magnitude=13,
                                        random_erasing=0.25)
    types = step_types(transform)
    assert types[-4:] == [expected, v2.ToDtype, v2.Normalize, v2.RandomErasing]
    assert v2.RandomHorizontalFlip in types[:-4]
    chosen, erasing = transform.transforms[-4], transform.transforms[-1]
    assert erasing.p == 0.25
    if policy == "randaugment":
        assert (chosen.magnitude, chosen.num_magnitude_bins) == (13, 31)
    if policy == "autoaugment":
        expected_policy = v2.AutoAugmentPolicy.IMAGENET if name == "imagenet" else v2.AutoAugmentPolicy.CIFAR10
        assert chosen.policy == expected_policy


def test_the_flags_reach_the_training_transform_only(small_synthetic):
    args = vit_main.build_parser().parse_args(["--dataset", "synthetic", "--auto_augment", "randaugment",
                                               "--augment_magnitude", "4", "--random_erasing", "0.3"])
    train, test, _, _ = dataset.load_datasets(**runs.data_config(args))
    assert v2.RandAugment in step_types(train.transform) and v2.RandomErasing in step_types(train.transform)
    assert train.transform.transforms[-1].p == 0.3
    assert step_types(test.transform) == [v2.ToImage, v2.Resize, v2.ToDtype, v2.Normalize]


def test_imagenet_augment_is_a_random_resized_crop_and_cifar_keeps_the_padded_crop():
    imagenet = dataset.build_transform("imagenet", 16, augment=True)
    assert step_types(imagenet) == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype,
                                    v2.Normalize]
    assert tuple(imagenet.transforms[1].size) == (16, 16)
    photo = Image.new("RGB", (60, 40), color=(10, 200, 30))
    assert imagenet(photo).shape == (3, 16, 16)
    cifar = dataset.build_transform("cifar10", 16, augment=True)
    assert step_types(cifar) == [v2.ToImage, v2.Resize, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype,
                                 v2.Normalize]


def erased_masks(erased, plain):
    """Per image, where the erasing changed it: ``(B, H, W)`` booleans."""
    return (erased != plain).any(dim=1)


def assert_each_image_has_its_own_rectangle(masks):
    assert all(mask.any() for mask in masks), "an image was not erased at p=1"
    distinct = {tuple(mask.flatten().tolist()) for mask in masks}
    assert len(distinct) == len(masks), "images of one batch share an erased rectangle"


def test_worker_path_erases_each_image_with_its_own_rectangle(small_synthetic):
    plain, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False, need_train=True)
    erased, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False, random_erasing=1.0)
    torch.manual_seed(0)
    (erased_batch, _), (plain_batch, _) = (next(iter(DataLoader(data, batch_size=16))) for data in (erased, plain))
    assert_each_image_has_its_own_rectangle(erased_masks(erased_batch, plain_batch))


def device_batch(data, random_erasing, seed):
    loader = dataset.DeviceLoader(data, dataset="synthetic", resize=0, augment=False, shuffle=False, batch_size=16,
                                  device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                                  random_erasing=random_erasing)
    return next(iter(loader))[0]


def test_device_path_erases_each_image_with_its_own_rectangle_drawn_from_its_generator(small_synthetic):
    train, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    plain = device_batch(train, 0.0, seed=1)
    erased = device_batch(train, 1.0, seed=1)
    assert_each_image_has_its_own_rectangle(erased_masks(erased, plain))
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    assert torch.equal(device_batch(train, 1.0, seed=1), erased)  # the loader's generator alone decides
    assert torch.equal(torch.get_rng_state(), global_state)  # and the global stream is left alone
    assert not torch.equal(device_batch(train, 1.0, seed=2), erased)


@pytest.mark.parametrize("flags, starts_with", [
    (["--auto_augment", "randaugment", "--augment_magnitude", "31"], "--augment_magnitude: must be between 0 and 30"),
    (["--auto_augment", "randaugment", "--augment_magnitude", "-1"], "--augment_magnitude: must be between 0 and 30"),
    (["--augment_magnitude", "5"], "--augment_magnitude: only --auto_augment randaugment"),
    (["--auto_augment", "trivialaugment", "--augment_magnitude", "5"], "--augment_magnitude: only"),
    (["--random_erasing", "1.5"], "--random_erasing: must be between 0 and 1 (a probability)"),
    (["--random_erasing", "-0.1"], "--random_erasing: must be between 0 and 1 (a probability)"),
    (["--auto_augment", "autoaugment", "--data_loader", "device"], "--auto_augment: autoaugment has no per-image"),
    (["--auto_augment", "mixup"], "argument --auto_augment: invalid choice"),
])
def test_bad_augmentation_flags_are_one_line_before_any_data(tiny_argv, tmp_path, capsys, monkeypatch, flags,
                                                             starts_with):
    monkeypatch.setattr(dataset, "load_datasets", lambda *args, **kwargs: pytest.fail("the data was loaded"))
    expect_one_line_error(capsys, tiny_argv(tmp_path / "run", *flags), 2, starts_with)
    assert not (tmp_path / "run").exists()


AUGMENTED = ["--num_epochs", "2", "--seed", "3", "--augment", "--batch_size", "32"]


@pytest.mark.parametrize("options, data_path_flags", [
    (["--auto_augment", "randaugment", "--augment_magnitude", "12", "--random_erasing", "0.5"], []),
    (["--auto_augment", "autoaugment", "--random_erasing", "0.5"], ["--num_workers", "2"]),
    (["--random_erasing", "0.5"], ["--data_loader", "device"]),
], ids=["randaugment", "autoaugment-workers", "erasing-device"])
@pytest.mark.slow
def test_augmented_runs_repeat_exactly_and_resume_exactly(tiny_argv, tmp_path, monkeypatch, options,
                                                          data_path_flags):
    monkeypatch.setattr(dataset, "SYNTHETIC_TRAIN_SIZE", 96)  # three batches of 32
    monkeypatch.setattr(dataset, "SYNTHETIC_TEST_SIZE", 32)
    straight, _ = assert_resume_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch,
                                                       AUGMENTED + options + data_path_flags, 2)
    assert "random_erasing: 0.5" in (straight / "args.txt").read_text().splitlines()
    # The options change what is trained: without them the first epoch's training loss is another.
    plain = tmp_path / "plain"
    vit_main.main(tiny_argv(plain, *AUGMENTED, *data_path_flags, "--num_epochs", "1"))
    assert read_metrics(plain)[0]["train_loss"] != read_metrics(straight)[0]["train_loss"]


def test_a_resumed_run_keeps_its_augmentation(tiny_argv, tmp_path, capsys):
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--num_epochs", "1", "--auto_augment", "randaugment"))
    capsys.readouterr()
    expect_one_line_error(capsys, tiny_argv(run, "--num_epochs", "2", "--resume", "auto", "--random_erasing", "0.5"),
                          2, "--random_erasing: ")
    # --data_loader may change on resume, but not to a path without the run's augmentation.
    expect_one_line_error(capsys, tiny_argv(run, "--num_epochs", "2", "--resume", "auto", "--data_loader", "device"),
                          2, "--auto_augment: randaugment has no per-image device path")
