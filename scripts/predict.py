"""Label a folder of images with a trained model: the top-k classes of every image and their softmax
probabilities, in a CSV.

Every image under the folder, recursively and in sorted order (hidden files and folders skipped), goes
through the checkpoint's own evaluation transform, the one --test_only uses for its test split: the
dataset's normalisation and its --resize, both from the flags stored in the checkpoint. An image that
cannot be read is reported on stderr and skipped.

    python scripts/predict.py --checkpoint Output/run/best.pt --images photos/ --output photos.csv --top_k 5
"""

import argparse
import contextlib
import csv
import os
import pickle
import sys
from pathlib import Path, PurePath
from typing import Dict, Iterator, List, Optional, TextIO, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import run_files  # noqa: E402
import runs  # noqa: E402
import train_eval  # noqa: E402
import utils  # noqa: E402
import vit_main  # noqa: E402
from models.vit import ViT  # noqa: E402
from settings import CommandLineParser, defaults as flag_defaults  # noqa: E402

WEIGHTS = ("trained", "ema")
DEFAULT_TOP_K = 5
# --test_only counts top-1 from logits.topk(min(5, classes)); asking topk for at least as many ranks breaks
# ties between equal logits (frequent in reduced precision) the same way, so both name the same class.
TEST_ONLY_RANKS = 5
# Exit code of an interrupted program, as a shell reports SIGINT.
INTERRUPTED = 130


class PredictionError(Exception):
    """Bad input found before any image is labelled; the message is one line starting with the flag."""


# ---------------------------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------------------------


def image_paths(root: str) -> List[str]:
    """The image files under ``root`` (by torchvision's image extensions), recursively, as paths relative
    to ``root``, sorted folder by folder. Hidden files and folders (.ipynb_checkpoints, macOS's ._photo.jpg)
    are skipped, as the image folders of training skip them."""
    found = []
    for directory, folders, names in os.walk(root, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [os.path.relpath(os.path.join(directory, name), root) for name in names
                  if not name.startswith(".") and datasets.folder.has_file_allowed_extension(
                      name, datasets.folder.IMG_EXTENSIONS)]
    return sorted(found, key=lambda path: PurePath(path).parts)


class ImageFiles(Dataset):
    """The images at ``paths`` (relative to ``root``) through ``transform``, read as the image folders of
    training read them (PIL, converted to RGB). An item is ``(index, image, None)``, or ``(index, None,
    reason)`` for an image that cannot be used, so that one bad file never stops a batch. ``native_side``:
    the only image side a model trained with --resize 0 takes (None when the transform resizes)."""

    def __init__(self, root: str, paths: List[str], transform, native_side: Optional[int]):
        self.root = root
        self.paths = paths
        self.transform = transform
        self.native_side = native_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        path = os.path.join(self.root, self.paths[index])
        try:
            image = datasets.folder.default_loader(path)
        except dataset.UNREADABLE_IMAGE_ERRORS as error:
            reason = "an empty file" if os.path.getsize(path) == 0 else " ".join(str(error).split())
            return index, None, f"not a readable image ({reason or type(error).__name__})"
        side = self.native_side
        if side is not None and image.size != (side, side):
            width, height = image.size
            return index, None, (f"{width}x{height} pixels, but the model takes {side}x{side} images (its run "
                                 "had --resize 0); resize it")
        return index, self.transform(image), None


def collate_readable(items: List[Tuple[int, Optional[torch.Tensor], Optional[str]]]):
    """A batch of the readable images: their indices and stacked tensors (None when there is none), and
    ``(index, reason)`` of each image left out."""
    readable = [(index, image) for index, image, _ in items if image is not None]
    images = torch.stack([image for _, image in readable]) if readable else None
    return [index for index, _ in readable], images, [(index, reason) for index, _, reason in items if reason]


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str) -> Dict:
    if not os.path.isfile(path):
        raise PredictionError(f"--checkpoint: no file {path}")
    try:
        checkpoint = checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as error:
        raise PredictionError(f"--checkpoint: {error}") from error
    if not isinstance(checkpoint.get("args"), dict):
        raise PredictionError(f"--checkpoint: {path} stores no run flags (a bare state dict), so its model, "
                              "transform and classes are unknown; give a last.pt or best.pt that training wrote")
    return checkpoint


def run_settings(checkpoint: Dict) -> argparse.Namespace:
    """The flags of the checkpoint's run; flags newer than the checkpoint take their defaults, as
    --test_only takes them."""
    return argparse.Namespace(**{**flag_defaults(), **checkpoint["args"]})


def chosen_weights(checkpoint: Dict, path: str, weights: str) -> Dict:
    if weights == "trained":
        return checkpoints.model_weights(checkpoint)
    if "ema" not in checkpoint:
        raise PredictionError(f"--weights: {path} holds no EMA weights (its run had no --ema_decay); "
                              "use --weights trained")
    return runs.ema_weights(checkpoint)


def class_names(checkpoint: Dict, settings: argparse.Namespace, path: str) -> Tuple[List[str], bool]:
    """The names of the classifier's outputs, in order, and whether they were read from the run's dataset:
    checkpoints written before they held the names are named by their dataset, as training named them."""
    if "class_names" in checkpoint:
        return list(checkpoint["class_names"]), False
    try:
        return dataset_class_names(settings), True
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError,
            dataset.DatasetUnavailableError) as error:
        raise PredictionError(
            f"--checkpoint: {path} stores no class names (an older version wrote it) and its run's {settings.dataset} "
            f"data at {settings.data_path} cannot name them ({run_files.first_line(error)}); put that data back "
            "there, or label with a checkpoint written since") from error


def dataset_class_names(settings: argparse.Namespace) -> List[str]:
    """The class names of the run's dataset, read as training reads them: CIFAR's from its meta file, the
    image folders' from their class folders, the synthetic set's are its class indices."""
    if settings.dataset in dataset.CIFAR_FILES:
        _, cifar_class, _, _ = dataset.CIFAR_FILES[settings.dataset]
        meta = os.path.join(settings.data_path, cifar_class.base_folder, cifar_class.meta["filename"])
        with open(meta, "rb") as handle:
            return list(pickle.load(handle, encoding="latin1")[cifar_class.meta["key"]])
    if settings.dataset == "imagenet":
        return dataset.image_folder_classes(settings.data_path, need_train=False)
    return [str(index) for index in range(dataset.num_classes(settings.dataset, settings.data_path))]


def fitted_model(settings: argparse.Namespace, weights: Dict, names: List[str], names_from_data: bool,
                 path: str) -> ViT:
    """The run's model, built from its stored flags, holding ``weights``, in evaluation mode."""
    try:
        model = ViT(**vit_main.model_config(settings, dataset.image_size(settings.dataset, settings.resize),
                                            len(names)))
    except ValueError as error:
        raise PredictionError(f"--checkpoint: {path} stores flags that build no model ({error})") from error
    mismatch = checkpoints.state_dict_mismatch(model.state_dict(), weights)
    if mismatch:
        source = f"; its {len(names)} class names were read from {settings.data_path}" if names_from_data else ""
        raise PredictionError(f"--checkpoint: {path} does not fit the model its stored flags build: {mismatch}{source}")
    model.load_state_dict(weights)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Labelling
# ---------------------------------------------------------------------------------------------


def csv_header(top_k: int) -> List[str]:
    header = ["path", "prediction", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"prediction_{rank}", f"probability_{rank}"]
    return header


def autocast(settings: argparse.Namespace, device: torch.device):
    """The reduced precision the run evaluated in with --use_amp, chosen as training chooses it."""
    if not settings.use_amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=train_eval.AMP_DTYPES[settings.amp_dtype])
    return torch.autocast(device.type, dtype=train_eval.AMP_DTYPE[device.type])


@torch.inference_mode()
def ranked_classes(model: ViT, images: torch.Tensor, top_k: int, settings: argparse.Namespace,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(classes, probabilities)``, each ``(B, top_k)``: the most probable classes of each image, best first,
    and their softmax probabilities."""
    with autocast(settings, device):
        logits = model(images.to(device, non_blocking=True))
    ranks = max(top_k, min(TEST_ONLY_RANKS, logits.shape[1]))
    classes = logits.topk(ranks, dim=1).indices[:, :top_k]
    probabilities = logits.float().softmax(dim=1).gather(1, classes)
    return classes.cpu(), probabilities.cpu()


@contextlib.contextmanager
def replaced_at_end(path: str) -> Iterator[TextIO]:
    """A text file written beside ``path`` and moved onto it once complete, so that ``path`` holds either
    its earlier content or the whole new one; the rows stream to disk, whatever the folder's size."""
    directory, name = os.path.split(os.path.abspath(path))
    # Our process id keeps a concurrent run from writing the same file; one of that name is a dead run's.
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def label_images(model: ViT, settings: argparse.Namespace, names: List[str], root: str, paths: List[str],
                 output: str, top_k: int, batch_size: int, num_workers: int, device: torch.device) -> Tuple[int, int]:
    """Writes the CSV of ``paths``; returns how many images were labelled and how many were skipped, each
    skipped one reported on stderr with its path."""
    native_side = None if settings.resize > 0 else dataset.image_size(settings.dataset, settings.resize)
    files = ImageFiles(root, paths, dataset.build_transform(settings.dataset, settings.resize, augment=False),
                       native_side)
    loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable, pin_memory=device.type == "cuda")
    labelled = skipped = 0
    with replaced_at_end(output) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(csv_header(top_k))
        for indices, images, unusable in tqdm(loader, desc="labelling", leave=False, dynamic_ncols=True,
                                              disable=not train_eval.show_progress_bars()):
            for index, reason in unusable:
                # tqdm.write keeps the line from tearing a progress bar still on screen.
                tqdm.write(f"skipped {os.path.join(root, paths[index])}: {reason}", file=sys.stderr)
            skipped += len(unusable)
            if images is None:
                continue
            classes, probabilities = ranked_classes(model, images, top_k, settings, device)
            for index, ranked, chances in zip(indices, classes.tolist(), probabilities.tolist()):
                row = [PurePath(paths[index]).as_posix()]
                for label, chance in zip(ranked, chances):
                    row += [names[label], f"{chance:.6g}"]
                writer.writerow(row)
            labelled += len(indices)
    return labelled, skipped


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by training")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    parser.add_argument("--output", required=True, metavar="FILE.csv", help="CSV to write (replaced when present)")
    parser.add_argument("--top_k", type=int, default=None,
                        help=f"classes listed per image, most probable first (default: {DEFAULT_TOP_K}, or all "
                             "the model's when it has fewer)")
    parser.add_argument("--weights", default="trained", choices=WEIGHTS,
                        help="the trained weights, or their moving average (runs trained with --ema_decay) "
                             "(default: trained)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                        help="device (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per batch (default: the run's --batch_size)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-reading processes (default: 4, or the CPU's cores when fewer)")
    return parser


def option_problems(options: argparse.Namespace) -> List[str]:
    """What is wrong with the flags themselves, found before any file is read."""
    problems = []
    if options.top_k is not None and options.top_k < 1:
        problems.append(f"--top_k: must be >= 1, got {options.top_k}")
    if options.batch_size is not None and options.batch_size < 1:
        problems.append(f"--batch_size: must be >= 1, got {options.batch_size}")
    if options.num_workers < 0:
        problems.append(f"--num_workers: must be >= 0, got {options.num_workers}")
    if options.device is not None and utils.device_problem(options.device):
        problems.append(f"--device: {utils.device_problem(options.device)}")
    if not os.path.isdir(options.images):
        problems.append(f"--images: no folder {options.images}")
    folder = os.path.dirname(os.path.abspath(options.output))
    if os.path.isdir(options.output):
        problems.append(f"--output: {options.output} is a folder; give the path of the CSV file to write")
    elif not os.path.isdir(folder):
        problems.append(f"--output: no folder {folder} to write {os.path.basename(options.output)} in; create it first")
    elif not os.access(folder, os.W_OK):
        problems.append(f"--output: cannot write to {folder}; give a CSV path in a writable folder")
    return problems


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    problems = option_problems(options)
    if problems:
        parser.error(problems[0])
    try:
        checkpoint = read_checkpoint(options.checkpoint)
        settings = run_settings(checkpoint)
        weights = chosen_weights(checkpoint, options.checkpoint, options.weights)
        names, names_from_data = class_names(checkpoint, settings, options.checkpoint)
        top_k = min(DEFAULT_TOP_K, len(names)) if options.top_k is None else options.top_k
        if top_k > len(names):
            raise PredictionError(f"--top_k: the model has {len(names)} classes; give at most {len(names)}, "
                                  f"got {top_k}")
        paths = image_paths(options.images)
        if not paths:
            raise PredictionError(f"--images: no image files under {options.images} (looked for "
                                  f"{', '.join(datasets.folder.IMG_EXTENSIONS)}, hidden files and folders skipped)")
        model = fitted_model(settings, weights, names, names_from_data, options.checkpoint)
    except PredictionError as error:
        parser.error(str(error))
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = options.batch_size or settings.batch_size
    try:
        labelled, skipped = label_images(model.to(device), settings, names, options.images, paths, options.output,
                                         top_k, batch_size, options.num_workers, device)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; {options.output} was not written", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except OSError as error:
        print(f"{parser.prog}: error: --output: cannot write {options.output} ({error.strerror or error})",
              file=sys.stderr)
        sys.exit(runs.RUNTIME_FAULT)
    reported = " (reported above)" if skipped else ""
    print(f"Labelled {labelled} image{'' if labelled == 1 else 's'} into {options.output}; skipped {skipped} that "
          f"could not be used{reported}")


if __name__ == "__main__":
    main()
