"""The device-resident data path against the worker path, and compiled training without recompiles."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import dataset
import train_eval
import vit_main
from models.vit import ViT
from tests.helpers import (DETERMINISTIC_COLUMNS, assert_resume_repeats_a_straight_run, read_metrics, results_lines,
                           without_hint, write_cifar10)
from tests.test_distributed import metrics, run_flags, torchrun


def worker_batches(data, batch_size):
    return list(DataLoader(data, batch_size=batch_size, shuffle=False))


def device_batches(data, name, resize, augment, batch_size=16):
    loader = dataset.DeviceLoader(data, dataset=name, resize=resize, augment=augment, shuffle=False,
                                  batch_size=batch_size, device=torch.device("cpu"))
    return list(loader)


@pytest.mark.parametrize("resize", [0, 48])
def test_device_path_matches_the_worker_path_on_synthetic_images(small_synthetic, resize):
    _, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=resize, augment=False, need_train=False)
    expected = worker_batches(test, 16)
    actual = device_batches(test, "synthetic", resize, augment=False)
    assert len(actual) == len(expected) == 7  # 100 images: six full batches and one of 4
    for (want_images, want_labels), (images, labels) in zip(expected, actual):
        torch.testing.assert_close(images, want_images, rtol=0, atol=1e-3)
        assert torch.equal(labels, want_labels)


def test_device_path_matches_the_worker_path_on_cifar_files(tmp_path, files_only_integrity):  # noqa: F811
    write_cifar10(tmp_path)
    train, _, _, _ = dataset.load_datasets("cifar10", str(tmp_path), resize=40, augment=False)
    expected = worker_batches(train, 8)
    actual = device_batches(train, "cifar10", 40, augment=False, batch_size=8)
    for (want_images, want_labels), (images, labels) in zip(expected, actual, strict=True):
        torch.testing.assert_close(images, want_images, rtol=0, atol=1e-3)
        assert torch.equal(labels, want_labels)


def crop_and_flip_variants(image_uint8, name):
    """Every image the worker path's crop (padding 4) and flip can make of one resized image."""
    mean, std = dataset.NORMALISATION[name]
    normalise = v2.Normalize(mean, std)
    side = image_uint8.shape[-1]
    padded = F.pad(image_uint8, (4, 4, 4, 4))
    variants = []
    for top, left, flip in itertools.product(range(9), range(9), (False, True)):
        crop = padded[:, top : top + side, left : left + side]
        crop = crop.flip(-1) if flip else crop
        variants.append(((top, left, flip), normalise(crop.float() / 255)))
    return variants


def closest_variant(image, variants):
    errors = [((image - variant).abs().max().item(), key) for key, variant in variants]
    return min(errors, key=lambda error: error[0])


def test_device_augmentation_is_a_crop_and_flip_the_worker_path_can_make(small_synthetic):
    train, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=40, augment=True)
    resize = v2.Compose([v2.ToImage(), v2.Resize((40, 40), antialias=True)])
    loader = dataset.DeviceLoader(train, dataset="synthetic", resize=40, augment=True, shuffle=False,
                                  batch_size=24, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    device_images, _ = next(iter(loader))
    torch.manual_seed(3)
    worker_images = [train[index][0] for index in range(24)]
    device_choices, worker_choices = [], []
    for index in range(24):
        variants = crop_and_flip_variants(resize(train.images[index]), "synthetic")
        for image, choices in ((device_images[index], device_choices), (worker_images[index], worker_choices)):
            error, key = closest_variant(image, variants)
            assert error <= 1e-3
            choices.append(key)
    for choices in (device_choices, worker_choices):
        assert len({key[:2] for key in choices}) > 5 and {key[2] for key in choices} == {False, True}


def test_device_loader_shuffles_by_its_generator_and_covers_every_image(small_synthetic):
    train, _, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    loader = dataset.DeviceLoader(train, dataset="synthetic", resize=0, augment=False, shuffle=True,
                                  batch_size=64, device=torch.device("cpu"))
    orders = []
    for seed in (1, 1, 2):
        loader.generator.manual_seed(seed)
        orders.append(torch.cat([labels for _, labels in loader]))
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    assert sorted(orders[0].tolist()) == sorted(train.labels.tolist())
    assert len(loader) == 4


def test_device_loader_refuses_image_folders_before_loading(capsys):
    with pytest.raises(SystemExit) as stop:
        vit_main.main(["--dataset", "imagenet", "--data_loader", "device", "--device", "cpu"])
    assert stop.value.code == 2
    message = without_hint(capsys.readouterr().err).strip().splitlines()[-1]
    assert "--data_loader" in message and "imagenet" in message


DEVICE_RUN = ["--num_epochs", "3", "--augment", "--data_loader", "device", "--layer", "ConvNNAttention", "--K", "3",
              "--seed", "5", "--resize", "40", "--patch_size", "8"]


@pytest.mark.slow
def test_device_path_trains_and_resumes_exactly(tiny_argv, tmp_path, monkeypatch):
    straight, _ = assert_resume_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch, DEVICE_RUN, 2)
    assert len(read_metrics(straight)) == 3


def compiled_trainer():
    torch.manual_seed(0)
    model = ViT(img_size=16, num_classes=10, layer="ConvNNAttention", patch_size=8, num_layers=1, num_heads=2,
                d_hidden=16, d_mlp=16, layer_options={"K": 3})
    return train_eval.Trainer(model=model, device=torch.device("cpu"), num_classes=10, optimizer="sgd", lr=0.1,
                              weight_decay=0.0, momentum=0.0, scheduler="none", lr_step=1, lr_gamma=1.0,
                              num_epochs=3, criterion="CrossEntropy", clip_grad_norm=1.0, use_amp=False,
                              use_compiled=True, compile_mode="default", show_progress=False)


@pytest.mark.slow
def test_compiled_training_never_recompiles_across_epochs_or_for_the_last_partial_batch():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs compiled by earlier tests
    frames = torch._dynamo.utils.counters["stats"]
    trainer = compiled_trainer()
    images, labels = torch.randn(45, 3, 16, 16), torch.randint(0, 10, (45,))
    loader = DataLoader(list(zip(images, labels)), batch_size=16)  # 16, 16 and a last batch of 13
    trainer.train_one_epoch(loader, "train")
    trainer.evaluate(loader)
    compiled_after_first_epoch = frames["unique_graphs"]
    # One graph for training and one for evaluation: the short batch of 13 was padded, not compiled anew.
    assert compiled_after_first_epoch == 2
    for _ in range(2):
        trainer.train_one_epoch(loader, "train")
        trainer.evaluate(loader)
    assert frames["unique_graphs"] == compiled_after_first_epoch


def test_padding_the_last_batch_leaves_its_logits_unchanged():
    trainer = compiled_trainer()
    trainer.network = trainer.model.eval()  # eager, to compare against the unpadded forward exactly
    trainer.compiled_batch = 16
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(trainer._forward(images), trainer.model(images), rtol=0, atol=1e-6)


def test_device_loader_shards_like_the_distributed_samplers(small_synthetic):
    _, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False, need_train=False)
    shards = {}
    for rank in range(3):
        for shuffle in (True, False):
            loader = dataset.DeviceLoader(test, dataset="synthetic", resize=0, augment=False, shuffle=shuffle,
                                          batch_size=8, device=torch.device("cpu"), shard=(rank, 3),
                                          generator=torch.Generator().manual_seed(4))
            shards[rank, shuffle] = loader._order()
            assert len(loader) == -(-len(shards[rank, shuffle]) // 8)
    training = [shards[rank, True] for rank in range(3)]
    assert {len(order) for order in training} == {34}  # 100 images padded to 102: equal steps on every rank
    assert set(torch.cat(training).tolist()) == set(range(100))
    evaluation = torch.cat([shards[rank, False] for rank in range(3)])
    assert evaluation.tolist() == list(range(100))  # every test image exactly once


# ---------------------------------------------------------------------------------------------
# Both loaders draw the same order
# ---------------------------------------------------------------------------------------------


def both_training_loaders(train, test, monkeypatch, shard):
    """The worker and the device training loader that ``make_loaders`` builds for ``shard``
    (rank, world_size), as if under torchrun when world_size > 1."""
    rank, world_size = shard
    monkeypatch.setattr(dataset.distributed, "is_distributed", lambda: world_size > 1)
    monkeypatch.setattr(dataset.distributed, "rank", lambda: rank)
    monkeypatch.setattr(dataset.distributed, "world_size", lambda: world_size)
    common = dict(batch_size=16, num_workers=0, device=torch.device("cpu"))
    workers, _ = dataset.make_loaders(train, test, **common)
    on_device = dict(dataset="synthetic", resize=0, augment=False, random_erasing=0.0)
    device, _ = dataset.make_loaders(train, test, **common, on_device=on_device)
    return workers, device


@pytest.mark.parametrize("train_size, shard", [(50, (0, 1)), (50, (0, 3)), (50, (2, 3)), (2, (4, 5))],
                         ids=["one-process", "rank-0-of-3", "rank-2-of-3-padded", "more-ranks-than-images"])
def test_both_loaders_draw_the_same_batches_for_every_seed_and_epoch(monkeypatch, train_size, shard):
    monkeypatch.setattr(dataset, "SYNTHETIC_TRAIN_SIZE", train_size)
    monkeypatch.setattr(dataset, "SYNTHETIC_TEST_SIZE", 10)
    train, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=0, augment=False)
    workers, device = both_training_loaders(train, test, monkeypatch, shard)
    assert len(workers) == len(device)
    orders = set()
    for seed, epoch in itertools.product((0, 1, 42), (1, 2)):
        batches = []
        for loader in (workers, device):
            dataset.seed_epoch(loader, seed, epoch)
            batches.append(list(loader))
        for (want_images, want_labels), (images, labels) in zip(*batches, strict=True):
            assert torch.equal(labels, want_labels)
            assert torch.equal(images, want_images)  # the same images, normalised by the same arithmetic
        orders.add(tuple(torch.cat([labels for _, labels in batches[1]]).tolist()))
    assert len(orders) > 1 or train_size < 3


@pytest.mark.slow
def test_a_run_without_augmentation_gives_the_same_numbers_with_either_loader(tiny_argv, tmp_path):
    runs = {}
    for loader in ("workers", "device"):
        runs[loader] = tmp_path / loader
        vit_main.main(tiny_argv(runs[loader], "--num_epochs", "2", "--seed", "3", "--data_loader", loader))
    metrics = [read_metrics(runs[loader]) for loader in ("workers", "device")]
    for workers_epoch, device_epoch in zip(*metrics, strict=True):
        assert [workers_epoch[column] for column in DETERMINISTIC_COLUMNS] == [
            device_epoch[column] for column in DETERMINISTIC_COLUMNS]
    results = [[line.split("|", 1)[1] for line in results_lines(runs[loader]) if line.startswith("[Epoch")]
               for loader in ("workers", "device")]
    assert results[0] == results[1] and len(results[0]) == 2
    weights = [torch.load(runs[loader] / "last.pt", weights_only=False)["model"] for loader in ("workers", "device")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_under_torchrun_either_loader_gives_the_same_numbers(tmp_path):
    # 200 training images in batches of 32 per rank: four steps an epoch, so the order matters.
    rows = [torchrun_metrics(run_flags(tmp_path / loader, 32, 2, "--seed", "7", "--data_loader", loader))
            for loader in ("workers", "device")]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def torchrun_metrics(flags):
    torchrun(flags)
    return metrics(flags[flags.index("--output_dir") + 1])
