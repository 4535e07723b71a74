"""Datasets (CIFAR-10/100 from torchvision, ImageNet-style image folders, Tiny-ImageNet-200, Downsampled
ImageNet at 32 and 64 px, an in-memory synthetic set) and the loaders that batch them. Each dataset is
one ``DatasetEntry`` of ``REGISTRY``."""

import copy
import functools
import hashlib
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

import distributed
from distributed import ContiguousShards

Normalisation = Tuple[Tuple[float, float, float], Tuple[float, float, float]]
# Splits as ``load(data_path, train_transform, test_transform, need_train) -> (train or None, test)``.
SplitLoader = Callable[[str, Callable, Callable, bool], Tuple[Optional[Dataset], Dataset]]

IMAGENET_NORMALISATION: Normalisation = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _nothing_to_check(data_path: str, need_train: bool) -> None:
    """For data whose faults loading it finds."""


@dataclass(frozen=True)
class DatasetEntry:
    """Everything the program knows of one dataset, so that adding a dataset is adding an entry.

    ``count_classes(data_path, need_train)`` gives the number of classes without loading the data;
    ``load`` builds both splits (see ``SplitLoader``); ``check(data_path, need_train)`` raises
    ``DatasetUnavailableError`` for faults that would otherwise surface only after an epoch's work;
    ``stored_images(split)`` returns the split's images as one ``(N, 3, H, W)`` uint8 tensor for
    ``--data_loader device``, None where they do not fit in memory. ``native_size`` is the side of the
    stored images (None where they come in every size, which then need --resize). ``resized_crop``:
    --augment takes a random resized crop (for photos of every size and framing) instead of a crop of
    the image padded by ``AUGMENT_PADDING``. ``auto_augment_policy``: the learned policy of --auto_augment
    autoaugment. ``fetched_into_data_path``: the files are downloaded into --data_path, which must then
    be a directory or creatable as one."""

    normalisation: Normalisation
    native_size: Optional[int]
    count_classes: Callable[[str, bool], int]
    load: SplitLoader
    check: Callable[[str, bool], None] = _nothing_to_check
    stored_images: Optional[Callable[[Dataset], torch.Tensor]] = None
    resized_crop: bool = False
    auto_augment_policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10
    fetched_into_data_path: bool = False


def _fixed_count(count: int) -> Callable[[str, bool], int]:
    return lambda data_path, need_train: count


def registry_entry(dataset: str) -> DatasetEntry:
    """The registry's entry of ``dataset``; a ValueError naming the choices for an unknown name."""
    if dataset not in REGISTRY:
        raise ValueError(f"--dataset: unknown dataset {dataset!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[dataset]


CIFAR_FILES = {
    "cifar10": ("CIFAR-10", datasets.CIFAR10, "cifar-10-python.tar.gz", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR-100", datasets.CIFAR100, "cifar-100-python.tar.gz", "cifar-100-python/"),
}

# Zero pixels around an image before --augment's random crop, in both data paths.
AUGMENT_PADDING = 4

# The synthetic set's size; tests shrink these for speed.
SYNTHETIC_TRAIN_SIZE = 5000
SYNTHETIC_TEST_SIZE = 1000
SYNTHETIC_CLASSES = 10
# Test-only: "TRAIN,TEST" sizes that replace the two above, for tests that start the program in another
# process, where they cannot patch the constants. Read by synthetic_sizes alone.
SYNTHETIC_SIZES_VARIABLE = "CONVNN_SYNTHETIC_SIZES"
# Peak memory taken while one synthetic image is generated: about five float32 copies of it (measured
# with 10,000 and 40,000 images: 51 and 62 KiB an image).
SYNTHETIC_BYTES_PER_IMAGE = 64 * 1024


class DatasetUnavailableError(RuntimeError):
    """The data cannot be found or fetched; the message is one line naming what to put where."""


def image_size(dataset: str, resize: int) -> int:
    """Side of the images the model will see, known without touching the data."""
    if resize > 0:
        return resize
    native_size = registry_entry(dataset).native_size
    if native_size is None:
        raise ValueError(f"--resize: {dataset} images have no common native size; give a size, e.g. --resize 224")
    return native_size


def num_classes(dataset: str, data_path: str, need_train: bool = True) -> int:
    """Number of classes, known without loading the data (image folders: see ``image_folder_classes``)."""
    return registry_entry(dataset).count_classes(data_path, need_train)


def image_folder_classes(data_path: str, need_train: bool = True) -> List[str]:
    """The class index of the image folders, shared by both splits: train/'s class folders in sorted
    order. val/ must hold the same class names, as torchvision would otherwise number each split's own
    folders and give a class's images another class's label. Evaluation alone may go without train/;
    the index then comes from val/."""
    train_root, val_root = os.path.join(data_path, "train"), os.path.join(data_path, "val")
    if not need_train and not os.path.isdir(train_root):
        return _class_folders(val_root)
    classes = _class_folders(train_root)
    _check_same_classes(classes, _class_folders(val_root), train_root, val_root)
    return classes


def _class_folders(root: str) -> List[str]:
    """The visible subfolders of ``root``; hidden ones (.ipynb_checkpoints, .git) are no class."""
    if not os.path.isdir(root):
        raise DatasetUnavailableError(f"--data_path: no image folder at {root}; expected {root}/<class>/<image files>")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name))
    if not folders:
        raise DatasetUnavailableError(f"--data_path: {root} holds no class folders; expected {root}/<class>/<image files>")
    return folders


def _check_same_classes(train_classes: List[str], val_classes: List[str], train_root: str, val_root: str) -> None:
    missing = sorted(set(train_classes) - set(val_classes))
    extra = sorted(set(val_classes) - set(train_classes))
    if not missing and not extra:
        return
    differences = [f"{where}: {_listed(names)}" for where, names in (("missing from val/", missing),
                                                                     ("only in val/", extra)) if names]
    raise DatasetUnavailableError(f"--data_path: {val_root} and {train_root} hold different classes "
                                  f"({'; '.join(differences)}); give val/ one folder for each class of train/, "
                                  "named alike, so that each label means the same class in both")


def _listed(names: List[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


# --auto_augment: torchvision's automatic augmentation policies, applied to the uint8 image after the
# crop and flip (as DeiT orders them).
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment", "autoaugment")
# RandAugment's magnitudes are indices into its 31 bins (torchvision's default num_magnitude_bins).
RANDAUGMENT_BINS = 31
DEFAULT_AUGMENT_MAGNITUDE = 9


def build_transform(dataset: str, resize: int, augment: bool, auto_augment: str = "none",
                    augment_magnitude: int = DEFAULT_AUGMENT_MAGNITUDE, random_erasing: float = 0.0) -> v2.Compose:
    """Resize (when asked), optional augmentation, then float conversion and normalisation, and random
    erasing last, on the normalised tensor (erased pixels are 0, the dataset's mean colour).
    The v2 transforms accept both PIL images (CIFAR, folders) and uint8 tensors (synthetic)."""
    steps = [v2.ToImage()]
    size = image_size(dataset, resize)
    entry = registry_entry(dataset)
    if augment and entry.resized_crop:
        # Photos of every size and framing: a random region of random scale and aspect ratio, resized.
        steps += [v2.RandomResizedCrop((size, size), antialias=True), v2.RandomHorizontalFlip()]
    else:
        if resize > 0:
            steps.append(v2.Resize((resize, resize), antialias=True))
        if augment:
            steps += [v2.RandomCrop(size, padding=AUGMENT_PADDING), v2.RandomHorizontalFlip()]
    if auto_augment != "none":
        steps.append(auto_augment_transform(dataset, auto_augment, augment_magnitude))
    mean, std = entry.normalisation
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(steps)


def auto_augment_transform(dataset: str, policy: str, magnitude: int) -> v2.Transform:
    """--auto_augment's transform; AutoAugment's learned policy is the dataset's entry's (CIFAR-10's for the
    32 px sets, ImageNet's for ImageNet and its downsampled versions)."""
    if policy == "randaugment":
        return v2.RandAugment(magnitude=magnitude, num_magnitude_bins=RANDAUGMENT_BINS)
    if policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    if policy == "autoaugment":
        return v2.AutoAugment(registry_entry(dataset).auto_augment_policy)
    raise ValueError(f"--auto_augment: unknown policy {policy!r}; choose from {', '.join(AUTO_AUGMENTS)}")


def load_datasets(
    dataset: str, data_path: str, resize: int, augment: bool, need_train: bool = True, *,
    auto_augment: str = "none", augment_magnitude: int = DEFAULT_AUGMENT_MAGNITUDE, random_erasing: float = 0.0,
) -> Tuple[Optional[Dataset], Dataset, int, int]:
    """Returns ``(train_dataset, test_dataset, num_classes, img_size)``; ``train_dataset`` is None
    when ``need_train`` is False (evaluation only). The augmentations affect the training split only."""
    entry = registry_entry(dataset)
    train_transform = build_transform(dataset, resize, augment, auto_augment, augment_magnitude, random_erasing)
    test_transform = build_transform(dataset, resize, augment=False)
    train, test = entry.load(data_path, train_transform, test_transform, need_train)
    return train, test, num_classes(dataset, data_path, need_train), image_size(dataset, resize)


def _load_image_folders(data_path: str, train_transform, test_transform, need_train: bool):
    classes = image_folder_classes(data_path, need_train)
    train = _image_folder(os.path.join(data_path, "train"), classes, train_transform) if need_train else None
    return train, _image_folder(os.path.join(data_path, "val"), classes, test_transform)


def _load_synthetic(data_path: str, train_transform, test_transform, need_train: bool):
    train_size, test_size = synthetic_sizes()
    train = SyntheticImages(train_size, seed=1, transform=train_transform) if need_train else None
    return train, SyntheticImages(test_size, seed=2, transform=test_transform)


# ---------------------------------------------------------------------------------------------
# Validation split (--val_split): a class-stratified hold-out of the training split
# ---------------------------------------------------------------------------------------------


def split_labels(data: Dataset) -> torch.Tensor:
    """The labels of a split as ``(N,)`` int64, read without decoding a single image: the ``labels``
    tensor of the sets held in memory, the ``targets`` list of torchvision's datasets and of the others."""
    if isinstance(data, HeldImages):
        return data.labels.long()
    targets = getattr(data, "targets", None)
    if targets is None:
        raise ValueError(f"--val_split: cannot read the labels of a {type(data).__name__}")
    return torch.as_tensor(targets, dtype=torch.long)


def held_out_count(fraction: float, class_size: int) -> int:
    """Validation images of a class of ``class_size``: ``fraction`` of it rounded half up, so that every
    class's share differs from ``fraction`` by at most half an image."""
    from utils import round_half_up  # the rule the warm-up length follows too

    return round_half_up(fraction * class_size)


def validation_split_problem(labels: torch.Tensor, fraction: float) -> Optional[str]:
    """Why ``fraction`` cannot split these labels, or None: every class must give the validation split
    at least one image and keep at least one for training."""
    counts = torch.bincount(labels).tolist()
    for label, count in enumerate(counts):
        if count == 0:
            continue
        held_out = held_out_count(fraction, count)
        if count == 1:
            return (f"--val_split: class {label} has a single training image, which cannot give a validation "
                    "image and keep one for training; add images or train without --val_split")
        if held_out < 1:
            return (f"--val_split: {fraction} holds out no image of class {label} ({count} training images); "
                    f"every class needs at least one validation image: give at least {0.5 / count:.6g}")
        if held_out >= count:
            return (f"--val_split: {fraction} holds out all {count} training images of class {label}; every "
                    f"class must keep at least one for training: give a smaller --val_split")
    return None


def validation_indices(labels: torch.Tensor, fraction: float, split_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(training, validation)`` indices into a split with ``labels``, each sorted. Every class gives
    ``held_out_count(fraction, its size)`` images, drawn by a generator seeded with ``split_seed`` alone,
    so that runs differing only in --seed or --layer hold out the same images."""
    generator = torch.Generator().manual_seed(split_seed)
    held_out = []
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        members = (labels == label).nonzero().view(-1)
        chosen = torch.randperm(len(members), generator=generator)[: held_out_count(fraction, len(members))]
        held_out.append(members[chosen])
    validation = torch.cat(held_out).sort().values if held_out else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[validation] = False
    return keep.nonzero().view(-1), validation


def hold_out_validation(train: Dataset, dataset: str, resize: int, fraction: float,
                        split_seed: int) -> Tuple[Dataset, Dataset]:
    """``(training subset, validation subset)`` of the training split. The validation images are read
    with the evaluation transform (no augmentation), through a copy of the split that shares its
    images and file list."""
    labels = split_labels(train)
    problem = validation_split_problem(labels, fraction)
    if problem:
        raise ValueError(problem)
    training, validation = validation_indices(labels, fraction, split_seed)
    evaluated = copy.copy(train)
    evaluated.transform = build_transform(dataset, resize, augment=False)
    return Subset(train, training.tolist()), Subset(evaluated, validation.tolist())


def class_names(data: Dataset, num_classes: int) -> List[str]:
    """The names of the classes: CIFAR's and the image folders' own, the index for the synthetic set."""
    names = getattr(data, "classes", None)
    return list(names) if names else [str(index) for index in range(num_classes)]


def synthetic_sizes() -> Tuple[int, int]:
    """Training and test sizes of the synthetic set: the defaults, or those of the test-only environment
    variable CONVNN_SYNTHETIC_SIZES when it is set. No other code reads the variable."""
    value = os.environ.get(SYNTHETIC_SIZES_VARIABLE)
    if value is None:
        return SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE
    try:
        train_size, test_size = (int(part) for part in value.split(","))
    except ValueError:
        train_size = test_size = 0
    if train_size < 1 or test_size < 1:
        raise DatasetUnavailableError(f"{SYNTHETIC_SIZES_VARIABLE}: expected two positive integers "
                                      f"'train,test', e.g. 200,100, got {value!r}")
    most = _physical_memory() // SYNTHETIC_BYTES_PER_IMAGE
    if train_size + test_size > most:
        raise DatasetUnavailableError(
            f"{SYNTHETIC_SIZES_VARIABLE}: {value} is {train_size + test_size} images, more than this machine's "
            f"memory holds while generating them ({most} at most, {SYNTHETIC_BYTES_PER_IMAGE // 1024} KiB each); "
            f"give smaller sizes, e.g. {SYNTHETIC_TRAIN_SIZE},{SYNTHETIC_TEST_SIZE}")
    return train_size, test_size


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_data(dataset: str, data_path: str, need_train: bool = True) -> None:
    """Faults of the data that would otherwise surface only after an epoch's work, found before training:
    e.g. synthetic sizes that do not fit in memory, and damaged images in the image folders' val/ split."""
    registry_entry(dataset).check(data_path, need_train)


def _check_synthetic(data_path: str, need_train: bool) -> None:
    synthetic_sizes()


def _check_image_folders(data_path: str, need_train: bool) -> None:
    val = _image_folder(os.path.join(data_path, "val"), image_folder_classes(data_path, need_train), None)
    _check_images_decode([path for path, _ in val.samples])


def _check_images_decode(paths: List[str]) -> None:
    """Raises for the first of ``paths`` (in their order) that does not decode. PIL decodes outside the
    GIL, so threads share the work."""
    pool = ThreadPoolExecutor()
    try:
        for _ in pool.map(_decode_quickly, paths):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


# PIL's errors for damaged or foreign files, and for images larger than its decompression-bomb limit
# (Image.MAX_IMAGE_PIXELS, twice over), which it refuses rather than decode.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode_quickly(path: str) -> None:
    # A JPEG decoded at 1/8 scale (draft) still reads its whole stream, so a truncated file fails as
    # it would in training, at about 3/4 of the cost of a full decode; other formats decode in full.
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except UNREADABLE_IMAGE_ERRORS as error:
        raise DatasetUnavailableError(_unreadable_image(path, error)) from error


def check_data_path(dataset: str, data_path: str) -> None:
    """CIFAR files are fetched into ``data_path``: it must be a directory or creatable as one."""
    if not registry_entry(dataset).fetched_into_data_path:
        return
    try:
        os.makedirs(data_path, exist_ok=True)
    except OSError as error:
        raise DatasetUnavailableError(f"--data_path: cannot create the directory {data_path} "
                                      f"({error.strerror or error}); give a directory that can hold the dataset")


class _ClassFolders(datasets.ImageFolder):
    """An ImageFolder numbered by a given class index instead of its own folders, which skips hidden
    files and folders: a notebook's .ipynb_checkpoints or macOS's ._photo.jpg hold no image of the class."""

    def __init__(self, root: str, classes: List[str], transform):
        self.class_index = classes
        super().__init__(root, transform, loader=_read_image, is_valid_file=functools.partial(_is_visible_image, root))

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        return list(self.class_index), {name: index for index, name in enumerate(self.class_index)}


def _image_folder(root: str, classes: List[str], transform) -> Dataset:
    try:
        return _ClassFolders(root, classes, transform)
    except FileNotFoundError as error:  # a class folder without a single file of an image type
        folders = [os.path.join(root, name) for name in classes]
        empty = [folder for folder in folders if not _holds_images(folder)]
        others = f" and {len(empty) - 1} other class folders" if len(empty) > 1 else ""
        extensions = ", ".join(datasets.folder.IMG_EXTENSIONS)
        raise DatasetUnavailableError(f"--data_path: no image files in {empty[0] if empty else root}{others}; "
                                      f"expected {root}/<class>/<image files> ending in {extensions}") from error


def _holds_images(folder: str) -> bool:
    return any(_is_visible_image(folder, os.path.join(directory, name))
               for directory, _, names in os.walk(folder) for name in names)


def _is_visible_image(root: str, path: str) -> bool:
    hidden = any(_is_hidden(part) for part in os.path.relpath(path, root).split(os.sep))
    return not hidden and datasets.folder.has_file_allowed_extension(path, datasets.folder.IMG_EXTENSIONS)


def _read_image(path: str):
    try:
        return datasets.folder.default_loader(path)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise DatasetUnavailableError(_unreadable_image(path, error)) from error


def _unreadable_image(path: str, error: Exception) -> str:
    return f"--data_path: {path} is not a readable image ({_message_in_one_line(error)}); replace or remove it"


def _message_in_one_line(error: Exception) -> str:
    """The whole message on one line and without its closing full stop, to be quoted inside one of ours."""
    text = " ".join(str(error).split())
    return text.rstrip(".") or type(error).__name__


def _cifar_loader(dataset: str) -> SplitLoader:
    def load(data_path: str, train_transform, test_transform, need_train: bool):
        train = _open_cifar(dataset, data_path, True, train_transform) if need_train else None
        return train, _open_cifar(dataset, data_path, False, test_transform)

    return load


def _open_cifar(dataset: str, root: str, train: bool, transform) -> Dataset:
    name, cifar_class, archive, folder = CIFAR_FILES[dataset]
    try:
        return cifar_class(root, train=train, transform=transform, download=False)
    except RuntimeError:
        pass  # files absent or damaged: fetch them (torchvision reuses an archive already in root)
    try:
        return cifar_class(root, train=train, transform=transform, download=True)
    except (OSError, RuntimeError, tarfile.TarError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        present = [entry for entry in (archive, folder) if os.path.exists(os.path.join(root, entry))]
        state = f"is damaged in {root} ({' and '.join(present)} fail the checksum)" if present else f"is not in {root}"
        raise DatasetUnavailableError(
            f"--data_path: {name} {state} and could not be downloaded ({reason}); "
            f"place {archive} or the extracted {folder} under {root}"
        ) from error


class HeldImages(Dataset):
    """A split held in memory whole: ``images`` ``(N, 3, H, W)`` uint8 and ``labels`` ``(N,)``, each image
    through ``transform`` when it is read."""

    images: torch.Tensor
    labels: torch.Tensor
    transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class SyntheticImages(HeldImages):
    """A deterministic, learnable 10-class set of 32x32 RGB images held in memory.

    Each class has a template: a colour and a stripe pattern (orientation and frequency). A sample is
    its class template, shifted at random by up to 4 pixels, with random brightness and strong noise,
    so that a classifier must look at both colour and pattern, yet a small ViT learns it in minutes.
    """

    side = 32
    classes = [str(label) for label in range(SYNTHETIC_CLASSES)]

    def __init__(self, size: int, seed: int, transform=None):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(size) % SYNTHETIC_CLASSES
        self.labels = self.labels[torch.randperm(size, generator=generator)]
        self.images = self._render(self.labels, generator)
        self.transform = transform

    @classmethod
    def _templates(cls) -> torch.Tensor:
        """``(10, 3, 32, 32)`` class templates in [0, 1]; fixed, independent of any seed."""
        rows, cols = torch.meshgrid(torch.arange(cls.side), torch.arange(cls.side), indexing="ij")
        # Five colours, each paired with two stripe patterns: colour alone cannot tell a class.
        colours = torch.tensor(
            [[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.2], [0.7, 0.3, 0.8]]
        )
        directions = [(1, 0), (0, 1), (1, 1), (1, -1), (2, 1), (1, 2), (1, 0), (0, 1), (1, 1), (1, -1)]
        templates = []
        for label in range(SYNTHETIC_CLASSES):
            row_step, col_step = directions[label]
            period = 8.0 if label < 6 else 4.0
            phase = 2 * torch.pi * (row_step * rows + col_step * cols) / period
            stripes = 0.5 + 0.5 * torch.sin(phase)
            colour = colours[label % 5].view(3, 1, 1)
            templates.append(colour * (0.3 + 0.7 * stripes))
        return torch.stack(templates)

    def _render(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = self._templates()[labels]
        shifts = torch.randint(-4, 5, (len(labels), 2), generator=generator)
        images = torch.stack([image.roll(tuple(shift.tolist()), dims=(1, 2)) for image, shift in zip(images, shifts)])
        brightness = 0.7 + 0.6 * torch.rand(len(labels), 1, 1, 1, generator=generator)
        noise = 0.25 * torch.randn(images.shape, generator=generator)
        images = (images * brightness + noise).clamp(0, 1)
        return (images * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet-200, as tiny-imagenet-200.zip unpacks
# ---------------------------------------------------------------------------------------------

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_LAYOUT = ("wnids.txt, train/<wnid>/images/*.JPEG and val/images/*.JPEG with val/val_annotations.txt, "
                        "as tiny-imagenet-200.zip unpacks")


def tiny_imagenet_root(data_path: str) -> str:
    """The folder holding wnids.txt: ``data_path``/tiny-imagenet-200, or ``data_path`` itself."""
    for root in (os.path.join(data_path, TINY_IMAGENET_FOLDER), data_path):
        if os.path.isfile(os.path.join(root, "wnids.txt")):
            return root
    raise DatasetUnavailableError(f"--data_path: no Tiny-ImageNet in {data_path}; expected "
                                  f"{os.path.join(data_path, TINY_IMAGENET_FOLDER)} or {data_path} itself to hold "
                                  f"{TINY_IMAGENET_LAYOUT}")


def tiny_imagenet_wnids(root: str) -> List[str]:
    """The WordNet ids of wnids.txt in sorted order, which numbers the classes as an ImageFolder over
    train/ would."""
    with open(os.path.join(root, "wnids.txt")) as handle:
        wnids = sorted({line.strip() for line in handle if line.strip()})
    if not wnids:
        raise DatasetUnavailableError(f"--data_path: {os.path.join(root, 'wnids.txt')} names no class; expected "
                                      "one WordNet id (e.g. n01443537) a line")
    return wnids


def _tiny_imagenet_names(root: str, wnids: List[str]) -> List[str]:
    """Each class's words from words.txt (``<wnid>\\t<words>`` lines), its wnid where words.txt lacks it."""
    words = {}
    path = os.path.join(root, "words.txt")
    if os.path.isfile(path):
        with open(path) as handle:
            for line in handle:
                wnid, _, text = line.rstrip("\n").partition("\t")
                words[wnid] = text.strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def _tiny_imagenet_train_samples(root: str, wnids: List[str]) -> List[Tuple[str, int]]:
    samples = []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(root, "train", wnid, "images")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        images = [os.path.join(folder, name) for name in names if _is_visible_image(folder, os.path.join(folder, name))]
        if not images:
            raise DatasetUnavailableError(f"--data_path: no image files in {folder}; expected the class {wnid} of "
                                          f"wnids.txt there, as tiny-imagenet-200.zip unpacks")
        samples += [(path, label) for path in images]
    return samples


def _tiny_imagenet_val_samples(root: str, wnids: List[str]) -> List[Tuple[str, int]]:
    """val/images/<file> labelled by val/val_annotations.txt (``<file>\\t<wnid>\\t<box>`` lines), in its order."""
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise DatasetUnavailableError(f"--data_path: no {annotations}; expected {TINY_IMAGENET_LAYOUT}")
    labels = {wnid: label for label, wnid in enumerate(wnids)}
    samples = []
    with open(annotations) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1].strip() not in labels:
                raise DatasetUnavailableError(f"--data_path: line {number} of {annotations} names no class of "
                                              f"wnids.txt ({line.strip()!r}); expected '<file>\\t<wnid>\\t...' lines")
            samples.append((os.path.join(root, "val", "images", fields[0].strip()), labels[fields[1].strip()]))
    if not samples:
        raise DatasetUnavailableError(f"--data_path: {annotations} lists no image; expected {TINY_IMAGENET_LAYOUT}")
    return samples


class TinyImageNet(Dataset):
    """A split of Tiny-ImageNet-200: the image files it lists (``samples``: path and label), decoded
    when read; ``root`` is the tiny-imagenet-200 folder, ``classes`` the names of words.txt."""

    def __init__(self, root: str, samples: List[Tuple[str, int]], classes: List[str], transform=None):
        self.root = root
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform
        # Filled by stored_images; shared with shallow copies (the validation hold-out's), so decoded once.
        self.decoded: Dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = _read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _load_tiny_imagenet(data_path: str, train_transform, test_transform, need_train: bool):
    root = tiny_imagenet_root(data_path)
    wnids = tiny_imagenet_wnids(root)
    names = _tiny_imagenet_names(root, wnids)
    train = None
    if need_train:
        train = TinyImageNet(root, _tiny_imagenet_train_samples(root, wnids), names, train_transform)
    return train, TinyImageNet(root, _tiny_imagenet_val_samples(root, wnids), names, test_transform)


def _check_tiny_imagenet(data_path: str, need_train: bool) -> None:
    root = tiny_imagenet_root(data_path)
    wnids = tiny_imagenet_wnids(root)
    if need_train:
        _tiny_imagenet_train_samples(root, wnids)
    val = _tiny_imagenet_val_samples(root, wnids)
    missing = [path for path, _ in val if not os.path.isfile(path)]
    if missing:
        others, verb = (f" and {len(missing) - 1} more", "are") if len(missing) > 1 else ("", "is")
        raise DatasetUnavailableError(f"--data_path: {missing[0]}{others}, listed in val/val_annotations.txt, "
                                      f"{verb} missing; restore them from tiny-imagenet-200.zip")
    _check_images_decode([path for path, _ in val])


def _tiny_imagenet_images(data: Dataset) -> torch.Tensor:
    """Every image of the split decoded into one ``(N, 3, 64, 64)`` uint8 tensor (about 1.2 GB for the
    100,000 training images), by threads: PIL decodes outside the GIL."""
    if "images" not in data.decoded:
        with ThreadPoolExecutor() as pool:
            images = list(pool.map(_decoded_tensor, [path for path, _ in data.samples]))
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) > 1:
            odd = next(path for (path, _), image in zip(data.samples, images) if image.shape != images[0].shape)
            raise DatasetUnavailableError(f"--data_loader: {odd} differs in size from {data.samples[0][0]}; device "
                                          "loading needs images of one size: replace it or use --data_loader workers")
        data.decoded["images"] = torch.stack(images) if images else torch.zeros(0, 3, 64, 64, dtype=torch.uint8)
    return data.decoded["images"]


def _decoded_tensor(path: str) -> torch.Tensor:
    """The image as the worker path's v2.ToImage makes it of the RGB picture: ``(3, H, W)`` uint8."""
    return v2.functional.pil_to_tensor(_read_image(path))


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet (32x32 and 64x64): pickled batches, as Imagenet32_train.zip etc. unpack
# ---------------------------------------------------------------------------------------------

DOWNSAMPLED_TRAIN_BATCHES = tuple(f"train_data_batch_{number}" for number in range(1, 11))
DOWNSAMPLED_VAL_BATCH = "val_data"
IMAGENET_CLASSES = 1000


def downsampled_file(data_path: str, name: str, side: int) -> str:
    """``data_path``/``name``, else the first, in sorted order, of ``data_path``/<folder>/``name`` where the
    folder's name holds the side (Imagenet32_train/, Imagenet64_val/ as the archives unpack)."""
    direct = os.path.join(data_path, name)
    if os.path.isfile(direct):
        return direct
    folders = sorted(entry.name for entry in os.scandir(data_path) if entry.is_dir() and str(side) in entry.name) if (
        os.path.isdir(data_path)) else []
    for folder in folders:
        path = os.path.join(data_path, folder, name)
        if os.path.isfile(path):
            return path
    raise DatasetUnavailableError(
        f"--data_path: no {name} of ImageNet {side}x{side} in {data_path}; place the files of Imagenet{side}_train "
        f"and Imagenet{side}_val ({DOWNSAMPLED_TRAIN_BATCHES[0]} ... {DOWNSAMPLED_TRAIN_BATCHES[-1]}, "
        f"{DOWNSAMPLED_VAL_BATCH}) in it or in its subfolders named with {side}, e.g. Imagenet{side}_train/")


def read_downsampled_batch(path: str, side: int) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch: images ``(N, 3, side, side)`` uint8 (its rows hold the red, green and blue
    planes, like CIFAR's) and labels 0..999 (stored as 1..1000)."""
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="latin1")
        images, labels = np.asarray(content["data"]), np.asarray(content["labels"])
    # Unpickling a damaged or foreign file can raise almost any exception type.
    except Exception as error:  # noqa: BLE001
        raise DatasetUnavailableError(_damaged_batch(path, side, _message_in_one_line(error))) from error
    width = 3 * side * side
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != width:
        raise DatasetUnavailableError(_damaged_batch(path, side, f"'data' is {images.dtype} of shape "
                                                                 f"{images.shape}, not uint8 rows of {width} bytes"))
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetUnavailableError(_damaged_batch(path, side, f"'labels' is not {len(images)} integers"))
    if len(labels) and (labels.min() < 1 or labels.max() > IMAGENET_CLASSES):
        raise DatasetUnavailableError(_damaged_batch(path, side, f"labels run from {labels.min()} to {labels.max()}, "
                                                                 f"not within 1..{IMAGENET_CLASSES}"))
    return images.reshape(-1, 3, side, side), labels.astype(np.int64) - 1


def _damaged_batch(path: str, side: int, reason: str) -> str:
    return (f"--data_path: {path} is not a batch of ImageNet {side}x{side} ({reason}); replace it with the file "
            f"from the Imagenet{side} archives")


class DownsampledImageNet(HeldImages):
    """A split of Downsampled ImageNet held in memory: ``images`` ``(N, 3, side, side)`` uint8 and
    ``labels`` ``(N,)`` int64, 0..999."""

    classes = [str(label) for label in range(IMAGENET_CLASSES)]

    def __init__(self, paths: List[str], side: int, transform=None):
        batches = [read_downsampled_batch(path, side) for path in paths]
        self.images = torch.from_numpy(np.concatenate([images for images, _ in batches]))
        self.labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
        self.transform = transform


def _downsampled_loader(side: int) -> SplitLoader:
    def load(data_path: str, train_transform, test_transform, need_train: bool):
        # Every file is found before any is read: a missing one is reported at once.
        train_paths = [downsampled_file(data_path, name, side) for name in DOWNSAMPLED_TRAIN_BATCHES] if (
            need_train) else []
        test_path = downsampled_file(data_path, DOWNSAMPLED_VAL_BATCH, side)
        train = DownsampledImageNet(train_paths, side, train_transform) if need_train else None
        return train, DownsampledImageNet([test_path], side, test_transform)

    return load


def _downsampled_check(side: int) -> Callable[[str, bool], None]:
    def check(data_path: str, need_train: bool) -> None:
        names = (*DOWNSAMPLED_TRAIN_BATCHES, DOWNSAMPLED_VAL_BATCH) if need_train else (DOWNSAMPLED_VAL_BATCH,)
        for name in names:
            downsampled_file(data_path, name, side)

    return check


def _cifar_images(data: Dataset) -> torch.Tensor:
    return torch.from_numpy(data.data).permute(0, 3, 1, 2)


def _held_images(data: Dataset) -> torch.Tensor:
    """The ``images`` tensor of the sets generated or read into memory whole."""
    return data.images


# ---------------------------------------------------------------------------------------------
# The registry: one entry per --dataset choice
# ---------------------------------------------------------------------------------------------

REGISTRY: Dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry(
        normalisation=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), native_size=32,
        count_classes=_fixed_count(10), load=_cifar_loader("cifar10"), stored_images=_cifar_images,
        fetched_into_data_path=True),
    "cifar100": DatasetEntry(
        normalisation=((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)), native_size=32,
        count_classes=_fixed_count(100), load=_cifar_loader("cifar100"), stored_images=_cifar_images,
        fetched_into_data_path=True),
    "imagenet": DatasetEntry(
        normalisation=IMAGENET_NORMALISATION, native_size=None,
        count_classes=lambda data_path, need_train: len(image_folder_classes(data_path, need_train)),
        load=_load_image_folders, check=_check_image_folders, resized_crop=True,
        auto_augment_policy=v2.AutoAugmentPolicy.IMAGENET),
    "synthetic": DatasetEntry(
        normalisation=IMAGENET_NORMALISATION, native_size=SyntheticImages.side,
        count_classes=_fixed_count(SYNTHETIC_CLASSES), load=_load_synthetic, check=_check_synthetic,
        stored_images=_held_images),
    # Commonly used statistics of Tiny-ImageNet's training images.
    "tinyimagenet": DatasetEntry(
        normalisation=((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)), native_size=64,
        count_classes=lambda data_path, need_train: len(tiny_imagenet_wnids(tiny_imagenet_root(data_path))),
        load=_load_tiny_imagenet, check=_check_tiny_imagenet, stored_images=_tiny_imagenet_images,
        auto_augment_policy=v2.AutoAugmentPolicy.IMAGENET),
    # ImageNet's images downsampled (box-filtered) keep ImageNet's channel means; its statistics serve both.
    "imagenet32": DatasetEntry(
        normalisation=IMAGENET_NORMALISATION, native_size=32, count_classes=_fixed_count(IMAGENET_CLASSES),
        load=_downsampled_loader(32), check=_downsampled_check(32), stored_images=_held_images,
        auto_augment_policy=v2.AutoAugmentPolicy.IMAGENET),
    "imagenet64": DatasetEntry(
        normalisation=IMAGENET_NORMALISATION, native_size=64, count_classes=_fixed_count(IMAGENET_CLASSES),
        load=_downsampled_loader(64), check=_downsampled_check(64), stored_images=_held_images,
        auto_augment_policy=v2.AutoAugmentPolicy.IMAGENET),
}

# The names other modules read: the --dataset choices, each one's (mean, std) and native side, and the
# datasets whose images fit in memory as one uint8 tensor for --data_loader device.
DATASETS = tuple(REGISTRY)
NORMALISATION = {name: entry.normalisation for name, entry in REGISTRY.items()}
NATIVE_SIZE = {name: entry.native_size for name, entry in REGISTRY.items() if entry.native_size is not None}
IN_MEMORY_DATASETS = tuple(name for name, entry in REGISTRY.items() if entry.stored_images is not None)


# ---------------------------------------------------------------------------------------------
# Data fingerprint
# ---------------------------------------------------------------------------------------------

# Images of a split whose bytes enter the content digest, evenly spaced; the labels enter in full.
FINGERPRINT_IMAGES = 1024
FINGERPRINT_HEX_DIGITS = 12


def fingerprint(dataset: str, train_data: Optional[Dataset], test_data: Dataset) -> str:
    """One line that identifies the data of a run, e.g.
    ``cifar10 classes=10:1a2b3c4d train=50000 test=10000 content=0123456789ab``: the dataset, the number
    of classes and a hash of their names in order, the images per split (``train=none`` for evaluation
    alone), and a digest of both splits' contents: every label, and for image files every image's path
    relative to the split's ``root`` (not the file contents, so the digest costs a directory listing), for
    in-memory sets the bytes of up to ``FINGERPRINT_IMAGES`` evenly spaced images. No absolute path
    enters it, so a moved folder keeps its fingerprint."""
    names = class_names(_unwrapped(test_data)[0], 0)
    names_hash = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    content = hashlib.sha256()
    for split, data in (("train", train_data), ("test", test_data)):
        content.update(split.encode())
        if data is not None:
            _digest_split(content, data, dataset)
    train_count = "none" if train_data is None else len(train_data)
    return (f"{dataset} classes={len(names)}:{names_hash} train={train_count} test={len(test_data)} "
            f"content={content.hexdigest()[:FINGERPRINT_HEX_DIGITS]}")


def _unwrapped(data: Dataset) -> Tuple[Dataset, Optional[List[int]]]:
    """A split and the indices a ``Subset`` (a validation hold-out) takes of it, None for all."""
    if isinstance(data, Subset):
        return data.dataset, list(data.indices)
    return data, None


def _digest_split(content, data: Dataset, dataset: str) -> None:
    base, indices = _unwrapped(data)
    labels = split_labels(base)
    chosen = torch.arange(len(labels)) if indices is None else torch.tensor(indices, dtype=torch.long)
    content.update(labels[chosen].numpy().astype("<i8").tobytes())
    samples = getattr(base, "samples", None)
    if samples is not None:
        relative = [os.path.relpath(samples[index][0], base.root).replace(os.sep, "/") for index in chosen.tolist()]
        content.update("\0".join(relative).encode())
        return
    read = registry_entry(dataset).stored_images
    if read is None:
        raise ValueError(f"fingerprint: {dataset} splits hold neither file paths nor images in memory")
    spaced = torch.linspace(0, len(chosen) - 1, min(len(chosen), FINGERPRINT_IMAGES)).round().long()
    content.update(read(base)[chosen[spaced]].contiguous().numpy().tobytes())


# ---------------------------------------------------------------------------------------------
# Device-resident loading (--data_loader device)
# ---------------------------------------------------------------------------------------------


def stored_images(data: Dataset, dataset: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split's images as one ``(N, 3, H, W)`` uint8 tensor, possibly a strided view of the stored
    array, and its labels as ``(N,)`` int64."""
    if isinstance(data, Subset):  # a validation split and the training images it leaves
        images, labels = stored_images(data.dataset, dataset)
        chosen = torch.tensor(data.indices, dtype=torch.long)
        return images[chosen], labels[chosen]
    read = registry_entry(dataset).stored_images
    if read is None:
        raise ValueError(f"--data_loader: device loading needs one of {', '.join(IN_MEMORY_DATASETS)}")
    return read(data), split_labels(data)


class DeviceLoader:
    """Batches from images held on the training device, transformed there a whole batch at a time.

    The same steps as the worker path, in the same order and with the same functions, so that the
    numbers agree: resize (uint8, antialiased), with ``augment`` a random crop of the image padded by
    4 zero pixels and a random horizontal flip, then scaling to [0, 1] and normalisation, and with
    ``random_erasing`` torchvision's RandomErasing, called once per image so that each image has its own
    draw (a v2 transform called on a batch tensor draws one rectangle for the whole batch). Without
    augmentation the batches are those of the worker path's ``DataLoader``, bit for bit on the CPU.

    The sample order is the ``DataLoader``'s, drawn by the same samplers: in a single process
    (``shard`` None) a ``RandomSampler`` on ``generator``; under torchrun (``shard`` = (rank,
    world_size)) a ``DistributedSampler``, padded alike and reseeded through ``seed_epoch``; for
    evaluation (``shuffle`` False) the same ``ContiguousShards`` block. Augmentation draws from
    ``generator`` too (on the CPU, a few numbers per batch), which the training loop reseeds every epoch
    exactly as it does a ``DataLoader``'s. --auto_augment has no device path (``vit_main`` refuses it there).
    """

    def __init__(self, data: Dataset, *, dataset: str, resize: int, augment: bool, shuffle: bool,
                 batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None,
                 shard: Optional[Tuple[int, int]] = None, random_erasing: float = 0.0):
        images, labels = stored_images(data, dataset)
        self.dataset = data
        self.images = images.contiguous().to(device)
        self.labels = labels.to(device)
        self.side = image_size(dataset, resize)
        self.resize = resize > 0
        self.augment = augment
        self.erasing = v2.RandomErasing(p=random_erasing) if random_erasing > 0 else None
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.device = device
        self.generator = generator if generator is not None else torch.Generator()
        self.mean, self.std = (list(values) for values in registry_entry(dataset).normalisation)
        self.sampler = self._sampler(shard)

    def _sampler(self, shard: Optional[Tuple[int, int]]) -> Sampler:
        rank, world_size = shard if shard is not None else (0, 1)
        if not self.shuffle:
            return ContiguousShards(self.labels, num_replicas=world_size, rank=rank)
        if shard is None:
            return RandomSampler(self.labels, generator=self.generator)
        return DistributedSampler(self.labels, num_replicas=world_size, rank=rank, shuffle=True, seed=0)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size].to(self.device)
            yield self.transform(self.images[index]), self.labels[index]

    def _order(self) -> torch.Tensor:
        """This process's sample order, the one a ``DataLoader`` with the same sampler and generator
        takes: its iterator first draws its workers' base seed from the generator, then the sampler
        draws the order."""
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def transform(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalised float ``(B, 3, side, side)``."""
        if self.resize:
            batch = v2.functional.resize(batch, [self.side, self.side], antialias=True)
        if self.augment:
            batch = self._crop_and_flip(batch)
        # The worker path's functions: another order of the same arithmetic would round differently.
        batch = v2.functional.normalize(v2.functional.to_dtype(batch, torch.float32, scale=True), self.mean,
                                        self.std, inplace=True)
        if self.erasing is not None:
            batch = self._erase_each(batch)
        return batch

    def _crop_and_flip(self, batch: torch.Tensor) -> torch.Tensor:
        # The offsets and flips are drawn on the CPU, so slicing by them never waits for the device.
        size, pad, side = batch.shape[0], AUGMENT_PADDING, self.side
        offsets = torch.randint(0, 2 * pad + 1, (size, 2), generator=self.generator).tolist()
        flipped = (torch.rand(size, generator=self.generator) < 0.5).nonzero().view(-1).to(self.device)
        padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
        crops = torch.stack([padded[i, :, top : top + side, left : left + side] for i, (top, left) in enumerate(offsets)])
        crops[flipped] = crops[flipped].flip(-1)
        return crops

    def _erase_each(self, batch: torch.Tensor) -> torch.Tensor:
        # RandomErasing draws from torch's global CPU generator; seeded here from the loader's own, the
        # rectangles follow the epoch's seed like the crops, and the global stream is left as it was.
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([self.erasing(image) for image in batch])


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

# Fixed seed of the test loader's generator: evaluation must not draw from the training generators.
EVAL_LOADER_SEED = 0


def evaluation_loader(data: Dataset, *, batch_size: int, num_workers: int, device: torch.device,
                      on_device: Optional[Dict] = None):
    """A loader that evaluates ``data`` as the test split is evaluated: in order, without augmentation,
    and under torchrun in one contiguous block per rank, so that every image counts once."""
    _, loader = make_loaders(None, data, batch_size=batch_size, num_workers=num_workers, device=device,
                             on_device=on_device)
    return loader


def make_loaders(train_dataset: Optional[Dataset], test_dataset: Dataset, *, batch_size: int,
                 num_workers: int, device: torch.device, on_device: Optional[Dict] = None):
    """Loaders whose randomness comes from their own generators: the training generator is reseeded
    every epoch (see ``seed_epoch``), so an epoch's order and augmentation do not depend on earlier
    epochs, which is what makes a resumed run repeat an uninterrupted one exactly.

    Under torchrun, ``batch_size`` is per process; each rank trains on its share of a shuffle common
    to all ranks and evaluates one contiguous block of the test split.

    ``on_device`` (``dataset``, ``resize``, ``augment``, ``random_erasing``) selects ``dataset.DeviceLoader``:
    the images stay on ``device`` and are transformed there, a batch at a time."""
    if on_device is not None:
        shard = (distributed.rank(), distributed.world_size()) if distributed.is_distributed() else None
        test_loader = DeviceLoader(test_dataset, **dict(on_device, augment=False, random_erasing=0.0),
                                   shuffle=False, batch_size=batch_size, device=device, shard=shard)
        if train_dataset is None:
            return None, test_loader
        train_loader = DeviceLoader(train_dataset, **on_device, shuffle=True, batch_size=batch_size, device=device,
                                    shard=shard)
        return train_loader, test_loader
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    if distributed.is_distributed():
        return _distributed_loaders(train_dataset, test_dataset, common)
    test_loader = DataLoader(test_dataset, shuffle=False, generator=torch.Generator().manual_seed(EVAL_LOADER_SEED),
                             **common)
    if train_dataset is None:
        return None, test_loader
    train_loader = DataLoader(train_dataset, shuffle=True, generator=torch.Generator(), **common)
    return train_loader, test_loader


def _distributed_loaders(train_dataset: Optional[Dataset], test_dataset: Dataset, common: Dict):
    ranks = dict(num_replicas=distributed.world_size(), rank=distributed.rank())
    test_loader = DataLoader(test_dataset, sampler=distributed.ContiguousShards(test_dataset, **ranks),
                             generator=torch.Generator().manual_seed(EVAL_LOADER_SEED), **common)
    if train_dataset is None:
        return None, test_loader
    # seed=0: the whole shuffle seed is passed as the "epoch" by seed_epoch.
    sampler = DistributedSampler(train_dataset, shuffle=True, seed=0, **ranks)
    return DataLoader(train_dataset, sampler=sampler, generator=torch.Generator(), **common), test_loader


def seed_epoch(train_loader: DataLoader, seed: int, epoch: int) -> None:
    # Workers are started afresh each epoch (not persistent) and take their seeds from this generator.
    # The prime multiplier keeps (seed, epoch) pairs of different runs from sharing a stream.
    epoch_seed = seed * 100_003 + epoch
    train_loader.generator.manual_seed(epoch_seed)
    if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
        # The sampler (a DataLoader's or a DeviceLoader's) shuffles with its seed (0) plus this number:
        # the same on every rank.
        train_loader.sampler.set_epoch(epoch_seed)
