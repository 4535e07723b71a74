"""Faults and bad input: each ends the program with one line naming the cause and the right exit code
(2 for bad input, 1 for runtime faults, 128 + the signal for SIGINT / SIGTERM), never with a traceback,
and never costs more than the epoch in progress."""

import contextlib
import csv
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from urllib.error import URLError

import pytest
import torch

import checkpoints
import dataset
import distributed
import run_files
import train_eval
import utils
import vit_main
from tests.helpers import TINY_MODEL_FLAGS, expect_one_line_error, train_small_run, without_hint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(REPO, "vit_main.py")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch Attention run on the small synthetic set, built once; tests work on copies."""
    return train_small_run(tmp_path_factory.mktemp("finished"), "--num_epochs", "1")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(directory):
    """Every file's bytes, so that a test can prove nothing was lost or changed."""
    if not directory.exists():
        return {}
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


# Locks taken by the table's setups; each is released after its test.
HELD_LOCKS = []


@pytest.fixture(autouse=True)
def release_held_locks():
    yield
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()


def hold_lock(directory):
    """Takes ``directory``'s lock in this process, as a live run would, until the test ends."""
    lock = run_files.OutputLock(str(directory))
    lock.acquire()
    HELD_LOCKS.append(lock)


HOLD_LOCK_PROGRAM = """
import sys
import run_files
run_files.OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes the pipe
"""


@contextlib.contextmanager
def lock_held_by_another_process(directory):
    """Yields the process id of a live process holding ``directory``'s lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_PROGRAM, str(directory)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_image_folders(root, split_files):
    """``split_files``: {split: {class: {file name: bytes}}} under ``root``."""
    for split, classes in split_files.items():
        for name, files in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for file_name, content in files.items():
                (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
                (folder / file_name).write_bytes(content)


def png_bytes():
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg_bytes():
    """The first half of a JPEG: it opens, passes PIL's verify(), and fails only when decoded."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.effect_noise((96, 96), 80).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def class_folders(*names):
    return {name: {f"{name}.png": png_bytes()} for name in names}


def offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)


# ---------------------------------------------------------------------------------------------
# The table: bad command lines and bad inputs against a directory holding a finished run
# ---------------------------------------------------------------------------------------------

# Each case: (id, setup, flags, flag the message starts with, text the message holds).
# ``setup(run_dir, tmp_path, monkeypatch)`` prepares the inputs and returns extra flags (or None).


def no_setup(run_dir, tmp_path, monkeypatch):
    return None


def resume(run_dir, tmp_path, monkeypatch):
    return ["--resume", "auto"]


def truncated_last(run_dir, tmp_path, monkeypatch):
    truncate(run_dir / "last.pt")
    return ["--resume", "auto"]


def empty_last(run_dir, tmp_path, monkeypatch):
    (run_dir / "last.pt").write_bytes(b"")
    return ["--resume", "auto", "--num_epochs", "2"]


def only_best(run_dir, tmp_path, monkeypatch):
    (run_dir / "last.pt").unlink()
    return ["--resume", "auto", "--num_epochs", "2"]


def truncated_best(run_dir, tmp_path, monkeypatch):
    truncate(run_dir / "best.pt")
    return ["--test_only"]


def garbage_checkpoint(run_dir, tmp_path, monkeypatch):
    (tmp_path / "garbage.pt").write_text("these are not weights")
    return ["--test_only", "--checkpoint", tmp_path / "garbage.pt"]


def list_checkpoint(run_dir, tmp_path, monkeypatch):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return ["--test_only", "--checkpoint", tmp_path / "list.pt"]


def bare_weights_resume(run_dir, tmp_path, monkeypatch):
    torch.save(checkpoints.load_checkpoint(run_dir / "last.pt")["model"], tmp_path / "weights.pt")
    return ["--resume", tmp_path / "weights.pt", "--num_epochs", "2"]


def bare_weights_test_only(run_dir, tmp_path, monkeypatch):
    torch.save(checkpoints.load_checkpoint(run_dir / "last.pt")["model"], tmp_path / "weights.pt")
    return ["--test_only", "--checkpoint", tmp_path / "weights.pt"]


def other_run_resumed(run_dir, tmp_path, monkeypatch):
    shutil.copytree(run_dir, tmp_path / "other")
    return ["--resume", tmp_path / "other" / "last.pt", "--num_epochs", "2"]


def best_lost(run_dir, tmp_path, monkeypatch):
    (run_dir / "best.pt").unlink()
    return ["--test_only"]


def mistyped_output_dir(run_dir, tmp_path, monkeypatch):
    return ["--test_only", "--output_dir", tmp_path / "mistyped"]


def read_only_run(run_dir, tmp_path, monkeypatch):
    directory_problem = run_files.directory_problem
    monkeypatch.setattr(run_files, "directory_problem", lambda path: f"cannot write to {path}: Read-only file system"
                        if str(path) == str(run_dir) else directory_problem(path))
    return ["--test_only"]


def live_lock(run_dir, tmp_path, monkeypatch):
    hold_lock(run_dir)
    return ["--resume", "auto", "--num_epochs", "2"]


def lock_directory(run_dir, tmp_path, monkeypatch):
    (run_dir / run_files.LOCK_NAME).mkdir()
    return ["--resume", "auto", "--num_epochs", "2"]


def lock_symlink(run_dir, tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("a file outside the run, which the pid must not overwrite")
    (run_dir / run_files.LOCK_NAME).symlink_to(precious)
    return ["--resume", "auto", "--num_epochs", "2"]


def lock_fifo(run_dir, tmp_path, monkeypatch):
    os.mkfifo(run_dir / run_files.LOCK_NAME)  # opening a FIFO for reading would wait for a writer forever
    return ["--resume", "auto", "--num_epochs", "2"]


def blocked_output_dir(run_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    return ["--output_dir", tmp_path / "a_file" / "run"]


def imagenet(run_dir, tmp_path, monkeypatch):
    return ["--dataset", "imagenet", "--resize", "32", "--data_path", tmp_path / "images",
            "--output_dir", tmp_path / "fresh"]


def no_class_folders(run_dir, tmp_path, monkeypatch):
    (tmp_path / "images" / "train").mkdir(parents=True)
    return imagenet(run_dir, tmp_path, monkeypatch)


def no_image_files(run_dir, tmp_path, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": {"cat": {"notes.txt": b"hello"}, "dog": {"a.png": png_bytes()}},
                                              "val": {"cat": {"b.png": png_bytes()}, "dog": {"c.png": png_bytes()}}})
    return imagenet(run_dir, tmp_path, monkeypatch)


def damaged_image(run_dir, tmp_path, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": {"cat": {"a.png": b"not a png"}, "dog": {"b.png": png_bytes()}},
                                              "val": {"cat": {"c.png": png_bytes()}, "dog": {"d.png": png_bytes()}}})
    return imagenet(run_dir, tmp_path, monkeypatch)


def val_lacks_a_class(run_dir, tmp_path, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": class_folders("cat", "dog", "fox"),
                                              "val": class_folders("cat", "fox")})
    return imagenet(run_dir, tmp_path, monkeypatch)


def val_has_an_extra_class(run_dir, tmp_path, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": class_folders("cat", "dog"),
                                              "val": class_folders("cat", "dog", "owl")})
    return imagenet(run_dir, tmp_path, monkeypatch)


def val_renames_a_class(run_dir, tmp_path, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": class_folders("cat", "dog"), "val": class_folders("cat", "Dog")})
    return imagenet(run_dir, tmp_path, monkeypatch)


def damaged_val_image(run_dir, tmp_path, monkeypatch):
    val = {"cat": {"c.png": png_bytes()}, "dog": {"d.jpg": truncated_jpeg_bytes()}}
    write_image_folders(tmp_path / "images", {"train": class_folders("cat", "dog"), "val": val})
    return imagenet(run_dir, tmp_path, monkeypatch)


def damaged_cifar(run_dir, tmp_path, monkeypatch):
    offline(monkeypatch)
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
    return ["--dataset", "cifar10", "--data_path", tmp_path / "cifar", "--output_dir", tmp_path / "fresh"]


def uncreatable_data_path(run_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    return ["--dataset", "cifar10", "--data_path", tmp_path / "a_file" / "Data", "--output_dir", tmp_path / "fresh"]


def bad_synthetic_sizes(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "many,few")
    return ["--output_dir", tmp_path / "fresh"]


def fresh_output_dir(run_dir, tmp_path, monkeypatch):
    return ["--output_dir", tmp_path / "fresh"]


def huge_synthetic_sizes(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(dataset.SYNTHETIC_SIZES_VARIABLE, "100000000,1")
    return ["--output_dir", tmp_path / "fresh"]


CONVNN = ["--layer", "ConvNNAttention"]
CASES = [
    ("epochs-zero", no_setup, ["--num_epochs", "0"], "--num_epochs", "must be >= 1"),
    ("batch-negative", no_setup, ["--batch_size", "-3"], "--batch_size", "-3"),
    ("lr-zero", no_setup, ["--lr", "0"], "--lr", "must be > 0"),
    ("dropout-one", no_setup, ["--dropout", "1"], "--dropout", "[0, 1)"),
    ("padding-negative", no_setup, ["--sample_padding", "-1"], "--sample_padding", ">= 0"),
    ("step-zero", no_setup, ["--scheduler", "step", "--lr_step", "0"], "--lr_step", ">= 1"),
    ("gamma-zero", no_setup, ["--scheduler", "step", "--lr_gamma", "0"], "--lr_gamma", "> 0"),
    ("branch-ratio", no_setup, ["--layer", "BranchConv", "--branch_ratio", "1.5"], "--branch_ratio", "between 0 and 1"),
    ("k-zero", no_setup, [*CONVNN, "--K", "0"], "--K", "between 1 and 17"),
    ("k-too-large", no_setup, [*CONVNN, "--K", "18"], "--K", "between 1 and 17"),
    ("k-branch", no_setup, ["--layer", "BranchAttention", "--K", "40"], "--K", "between 1"),
    ("k-kvt", no_setup, ["--layer", "KvtAttention", "--K", "100"], "--K", ""),
    ("grid-too-large", no_setup, [*CONVNN, "--sampling_type", "spatial", "--num_samples", "5"], "--num_samples",
     "5x5 grid"),
    ("grid-padding", no_setup, [*CONVNN, "--sampling_type", "spatial", "--num_samples", "2", "--sample_padding", "2"],
     "--num_samples", "--sample_padding 2"),
    ("random-too-many", no_setup, [*CONVNN, "--sampling_type", "random", "--num_samples", "100"], "--num_samples",
     "17 tokens"),
    ("k-above-samples", no_setup, [*CONVNN, "--sampling_type", "random", "--num_samples", "4", "--K", "9"], "--K", ""),
    ("patch-size", no_setup, ["--patch_size", "7"], "--patch_size", ""),
    ("heads", no_setup, ["--num_heads", "5"], "--num_heads", ""),
    ("resize-imagenet", no_setup, ["--dataset", "imagenet", "--resize", "0"], "--resize", "--resize 224"),
    ("resume-test-only", no_setup, ["--test_only", "--resume", "auto"], "--resume", "--test_only"),
    ("checkpoint-training", no_setup, ["--checkpoint", "x.pt"], "--checkpoint", "only used with --test_only"),
    ("missing-checkpoint", no_setup, ["--test_only", "--checkpoint", "/no/such.pt"], "--checkpoint", "/no/such.pt"),
    ("missing-resume", no_setup, ["--resume", "/no/last.pt"], "--resume", "/no/last.pt"),
    ("overwrite-resume", resume, ["--overwrite"], "--overwrite", "--resume"),
    ("overwrite-test-only", no_setup, ["--overwrite", "--test_only"], "--overwrite", "--test_only"),
    ("earlier-run", no_setup, [], "--output_dir", "--overwrite"),
    ("live-lock", live_lock, [], "--output_dir", f"running process {os.getpid()}"),
    ("lock-directory", lock_directory, [], "--output_dir", ".lock is a directory, not a lock file"),
    ("lock-symlink", lock_symlink, [], "--output_dir", ".lock is a symbolic link, not a lock file"),
    ("lock-fifo", lock_fifo, [], "--output_dir", "cannot open the lock file"),
    ("unwritable-output", blocked_output_dir, [], "--output_dir", "cannot write"),
    ("truncated-last", truncated_last, [], "--resume", "last.pt is damaged"),
    ("empty-last", empty_last, [], "--resume", "last.pt is damaged"),
    ("best-without-last", only_best, [], "--resume", "has a best.pt but no last.pt"),
    ("truncated-best", truncated_best, [], "--checkpoint", "best.pt is damaged"),
    ("garbage-checkpoint", garbage_checkpoint, [], "--checkpoint", "garbage.pt is damaged"),
    ("list-checkpoint", list_checkpoint, [], "--checkpoint", "not a checkpoint"),
    ("bare-weights-resume", bare_weights_resume, [], "--resume", "not a training checkpoint"),
    ("other-width", resume, ["--d_hidden", "16"], "--d_hidden", "last.pt was trained with --d_hidden 32, not 16"),
    ("other-depth", resume, ["--num_layers", "3"], "--num_layers", "trained with --num_layers 2"),
    ("other-layer", no_setup, ["--test_only", *CONVNN, "--K", "4"], "--layer",
     "best.pt was trained with --layer Attention, not ConvNNAttention (and with --K 9); leave --layer out"),
    ("weights-other-width", bare_weights_test_only, ["--d_hidden", "16"], "--checkpoint", "of another shape"),
    ("weights-other-depth", bare_weights_test_only, ["--num_layers", "3"], "--checkpoint",
     "parameters missing from the checkpoint"),
    ("weights-fewer-layers", bare_weights_test_only, ["--num_layers", "1"], "--checkpoint",
     "unexpected parameters (transformer_encoder.1."),
    ("weights-other-layer", bare_weights_test_only, [*CONVNN, "--K", "4"], "--checkpoint",
     "2 parameters missing from the checkpoint (transformer_encoder.0.attention.conv.weight"),
    ("resume-other-lr", resume, ["--lr", "0.01"], "--lr", "trained with --lr 0.001, not 0.01; a resumed run keeps"),
    ("resume-other-sampling", resume, ["--sampling_type", "random"], "--sampling_type", "--sampling_type all"),
    ("resume-other-similarity", resume, ["--magnitude_type", "cosine", "--softmax_topk_val", "False"],
     "--softmax_topk_val", "--softmax_topk_val True, not False (and with --magnitude_type matmul)"),
    ("resume-other-heads", resume, ["--num_heads", "4"], "--num_heads", "trained with --num_heads 2"),
    ("resume-other-optimizer", resume, ["--optimizer", "sgd"], "--optimizer", "trained with --optimizer adamw"),
    ("resume-other-batch", resume, ["--batch_size", "32"], "--batch_size",
     "global batch of 64 (--batch_size 64 in each of 1 process(es)); give --batch_size 64 for 1 process(es)"),
    ("resume-other-seed", resume, ["--seed", "1"], "--seed", "trained with --seed 0"),
    ("resume-other-run", other_run_resumed, [], "--resume", "holds another run (last.pt, best.pt"),
    ("test-only-other-heads", no_setup, ["--test_only", "--num_heads", "4"], "--num_heads", "--num_heads 2, not 4"),
    ("test-only-other-resize", no_setup, ["--test_only", "--resize", "64"], "--resize", "--resize 0, not 64"),
    ("test-only-no-checkpoint", mistyped_output_dir, [], "--checkpoint", "mistyped/best.pt to evaluate"),
    ("test-only-best-lost", best_lost, [], "--checkpoint", "has a last.pt but no best.pt; evaluate the last epoch"),
    ("test-only-read-only", read_only_run, [], "--output_dir", "give a writable --output_dir (and the weights "
     "with --checkpoint"),
    ("missing-image-folder", imagenet, [], "--data_path", "no image folder"),
    ("no-class-folders", no_class_folders, [], "--data_path", "no class folders"),
    ("no-image-files", no_image_files, [], "--data_path", "no image files in"),
    ("damaged-image", damaged_image, [], "--data_path", "a.png is not a readable image"),
    ("damaged-image-in-worker", damaged_image, ["--num_workers", "1"], "--data_path", "a.png is not a readable image"),
    ("val-lacks-a-class", val_lacks_a_class, [], "--data_path", "hold different classes (missing from val/: dog)"),
    ("val-has-an-extra-class", val_has_an_extra_class, [], "--data_path", "hold different classes (only in val/: owl)"),
    ("val-renames-a-class", val_renames_a_class, [], "--data_path",
     "hold different classes (missing from val/: dog; only in val/: Dog)"),
    ("damaged-val-image", damaged_val_image, [], "--data_path",
     "d.jpg is not a readable image (image file is truncated"),
    ("damaged-val-image-test-only", damaged_val_image, ["--test_only", "--checkpoint", "none"], "--data_path", "d.jpg is not a readable image"),
    ("damaged-cifar", damaged_cifar, [], "--data_path", "CIFAR-10 is damaged"),
    ("uncreatable-data-path", uncreatable_data_path, [], "--data_path", "cannot create"),
    ("synthetic-sizes", bad_synthetic_sizes, [], "CONVNN_SYNTHETIC_SIZES", "'many,few'"),
    ("synthetic-too-large", huge_synthetic_sizes, [], "CONVNN_SYNTHETIC_SIZES", "100000000,1 is 100000001 images"),
    ("batch-beyond-64-bit", no_setup, ["--batch_size", 2**63], "--batch_size", f"at most {2**63 - 1}"),
    ("window-beyond-64-bit", no_setup, ["--local_window", -2**63 - 1], "--local_window", "64-bit integer"),
    ("seed-negative", no_setup, ["--seed", "-1"], "--seed", "between 0 and 4294967295"),
    ("val-split-negative", no_setup, ["--val_split", "-0.1"], "--val_split", "in [0, 1)"),
    ("val-split-one", no_setup, ["--val_split", "1"], "--val_split", "in [0, 1)"),
    ("split-seed-negative", no_setup, ["--split_seed", "-1"], "--split_seed", "must be >= 0"),
    ("resume-other-val-split", resume, ["--val_split", "0.2"], "--val_split", "trained with --val_split 0.0, not 0.2"),
    ("resume-other-split-seed", resume, ["--split_seed", "3"], "--split_seed", "trained with --split_seed 0, not 3"),
    ("val-split-empties-a-class", fresh_output_dir, ["--val_split", "0.02"], "--val_split",
     "0.02 holds out no image of class 0 (20 training images)"),
    ("val-split-takes-a-class", fresh_output_dir, ["--val_split", "0.99"], "--val_split",
     "holds out all 20 training images of class 0"),
    ("seed-beyond-numpy", no_setup, ["--seed", 2**32], "--seed", "between 0 and 4294967295"),
    *[(f"{name}-{value}", no_setup, [f"--{name}", value, *more], f"--{name}", f"must be a finite number, got {value}")
      for name, value, more in [("lr", "nan", []), ("lr", "inf", []), ("weight_decay", "nan", []),
                                ("clip_grad_norm", "nan", []), ("clip_grad_norm", "inf", []), ("momentum", "nan", []),
                                ("dropout", "nan", []), ("attention_dropout", "nan", []), ("val_split", "nan", []),
                                ("lr_gamma", "nan", ["--scheduler", "step"]), ("lr_gamma", "inf", []),
                                ("branch_ratio", "nan", ["--layer", "BranchConv"])]],
    ("branch-ratio-no-convnn-channel", no_setup, ["--layer", "BranchAttention", "--branch_ratio", "0.02"],
     "--branch_ratio", "gives the ConvNN branch 0 of the 32 channels"),
    ("kernel-beyond-sequence", no_setup, ["--layer", "Conv1d", "--kernel_size", "34"], "--kernel_size", "at most 33"),
    ("kernel-branch", no_setup, ["--layer", "BranchConv", "--kernel_size", 2**40], "--kernel_size", "at most 33"),
]
# Data faults found before the run writes anything (args.txt, model.txt) into its fresh output directory.
FOUND_BEFORE_ANY_OUTPUT = ["missing-image-folder", "no-class-folders", "val-lacks-a-class", "val-has-an-extra-class",
                           "val-renames-a-class", "damaged-val-image", "synthetic-sizes", "synthetic-too-large",
                           "val-split-empties-a-class", "val-split-takes-a-class"]
if "cuda" not in utils.available_devices():
    CASES.append(("no-cuda", no_setup, ["--device", "cuda"], "--device", "available: cpu"))


@pytest.mark.parametrize("setup, flags, flag, text", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_loses_nothing(setup, flags, flag, text, run_copy, tmp_path, tiny_argv, capsys,
                                                 monkeypatch):
    extra = setup(run_copy, tmp_path, monkeypatch) or []
    before = snapshot(run_copy)
    line = expect_one_line_error(capsys, tiny_argv(run_copy, *flags, *extra), 2, flag)
    assert text in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("setup, flags, flag", [case[1:4] for case in CASES if case[0] in FOUND_BEFORE_ANY_OUTPUT],
                         ids=FOUND_BEFORE_ANY_OUTPUT)
def test_data_faults_are_found_before_any_output(setup, flags, flag, run_copy, tmp_path, tiny_argv, capsys,
                                                 monkeypatch):
    extra = setup(run_copy, tmp_path, monkeypatch) or []
    expect_one_line_error(capsys, tiny_argv(run_copy, *flags, *extra), 2, flag)
    assert snapshot(tmp_path / "fresh") == {}


def test_ctrl_c_while_the_test_images_are_checked_is_one_line(tmp_path, tiny_argv, capsys, monkeypatch):
    write_image_folders(tmp_path / "images", {"train": class_folders("cat", "dog"), "val": class_folders("cat", "dog")})

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "_decode_quickly", interrupted)
    line = expect_one_line_error(capsys, tiny_argv(tmp_path / "run", "--dataset", "imagenet", "--resize", "32",
                                                   "--data_path", tmp_path / "images"), 130, "interrupted")
    assert line.endswith("interrupted while checking the data; nothing was written")
    assert snapshot(tmp_path / "run") == {}


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, tiny_argv, capsys):
    folders = {"train": class_folders("cat", "dog"), "val": class_folders("cat", "dog")}
    for split in folders.values():
        split[".ipynb_checkpoints"] = {}  # Jupyter's, empty
        split["cat"][".ipynb_checkpoints/cat-checkpoint.png"] = png_bytes()
        split["dog"]["._dog.png"] = b"macOS metadata, not an image"
    write_image_folders(tmp_path / "images", folders)
    vit_main.main(tiny_argv(tmp_path / "run", "--dataset", "imagenet", "--resize", "32",
                            "--data_path", tmp_path / "images", "--num_epochs", "1"))
    assert "imagenet: 2 training and 2 test images" in capsys.readouterr().out
    assert checkpoints.load_checkpoint(tmp_path / "run" / "last.pt")["model"]["classifier.weight"].shape[0] == 2


def test_test_only_needs_no_train_folder_and_its_classes_must_fit_the_checkpoint(tmp_path, tiny_argv, capsys):
    images = tmp_path / "images"
    write_image_folders(images, {"train": class_folders("cat", "dog"), "val": class_folders("cat", "dog")})
    flags = ["--dataset", "imagenet", "--resize", "32", "--data_path", images]
    vit_main.main(tiny_argv(tmp_path / "run", *flags, "--num_epochs", "1"))
    shutil.rmtree(images / "train")
    vit_main.main(tiny_argv(tmp_path / "run", *flags, "--test_only"))
    assert (tmp_path / "run" / "test_results.txt").read_text().startswith("Checkpoint: ")
    write_image_folders(images, {"val": class_folders("owl")})
    expect_one_line_error(capsys, tiny_argv(tmp_path / "run", *flags, "--test_only"), 2, "--checkpoint")


def test_a_relative_data_path_means_the_same_data_from_another_directory(tmp_path, tiny_argv, monkeypatch):
    """Found by a hostile user: a stored relative --data_path was read again from the directory that
    --test_only or --resume ran in, which evaluated or trained on other images without a word."""
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_image_folders(tmp_path / "first" / "images", {"train": class_folders("cat", "dog"),
                                                        "val": class_folders("cat", "dog")})
    monkeypatch.chdir(tmp_path / "first")
    vit_main.main(tiny_argv(tmp_path / "run", "--dataset", "imagenet", "--resize", "32", "--data_path", "images",
                            "--num_epochs", "1"))
    assert checkpoints.load_checkpoint(tmp_path / "run" / "last.pt")["args"]["data_path"] == str(
        tmp_path / "first" / "images")
    monkeypatch.chdir(tmp_path / "elsewhere")  # where "images" names nothing
    vit_main.main(["--test_only", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--device", "cpu",
                   "--num_workers", "0"])
    assert (tmp_path / "run" / "test_results.txt").is_file()


def test_the_largest_seed_also_seeds_the_other_ranks_under_torchrun(monkeypatch):
    """Ranks other than 0 reseed from --seed plus an offset, which must stay within numpy's seed range."""
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    generators = utils.capture_rng_state()
    try:
        distributed.decorrelate_ranks(utils.SEED_MAX, 7)
        first = torch.rand(4)
        distributed.decorrelate_ranks(utils.SEED_MAX, 8)
        assert not torch.equal(first, torch.rand(4))  # a new stream per resumed epoch, as with small seeds
    finally:
        utils.restore_rng_state(generators)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [["random", "--num_samples", "4"], ["spatial", "--num_samples", "2"]])
def test_K_1_with_sampled_candidates_trains(sampling, tmp_path, tiny_argv):
    """Once a traceback in a reshape after the checks had passed; K = 1 is the token alone."""
    vit_main.main(tiny_argv(tmp_path, *CONVNN, "--K", "1", "--sampling_type", *sampling, "--num_epochs", "1"))
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_the_table_holds_at_least_30_cases():
    assert len(CASES) >= 30


def test_mismatch_message_counts_and_names_a_few_parameters(run_copy, tmp_path, tiny_argv, capsys):
    flags = bare_weights_test_only(run_copy, tmp_path, None)
    line = expect_one_line_error(capsys, tiny_argv(run_copy, *flags, "--num_layers", "4"), 2, "--checkpoint")
    missing = len([name for name in checkpoints.load_checkpoint(run_copy / "last.pt")["model"]
                   if name.startswith("transformer_encoder.0.")]) * 2  # blocks 2 and 3 are missing
    assert f"{missing} parameters missing from the checkpoint (transformer_encoder.2." in line and ", ...)" in line


def test_resuming_a_finished_run_says_so_and_changes_nothing(run_copy, tiny_argv, capsys):
    before = snapshot(run_copy)
    vit_main.main(tiny_argv(run_copy, "--resume", "auto"))
    assert capsys.readouterr().out == (f"nothing to do: {run_copy} finished all 1 epochs; raise --num_epochs to "
                                       "train it further\n")
    assert snapshot(run_copy) == before


def test_resuming_a_run_killed_before_its_summary_lines_writes_them(run_copy, tiny_argv):
    results = run_copy / "train_eval_results.txt"
    complete = results.read_text()
    results.write_text("".join(complete.splitlines(keepends=True)[:1]))
    vit_main.main(tiny_argv(run_copy, "--resume", "auto"))
    assert results.read_text() == complete


def test_a_checkpoint_of_an_older_version_still_resumes(run_copy, tiny_argv, capsys):
    """Older versions stored fewer flags (none at all, or not the newer ones): those come from the command line."""
    checkpoint = checkpoints.load_checkpoint(run_copy / "last.pt")
    del checkpoint["args"]["data_loader"]
    for key in ("args_changes", "processes"):
        checkpoint.pop(key, None)
    torch.save(checkpoint, run_copy / "last.pt")
    vit_main.main(tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2", "--batch_size", "64"))
    assert f"warning: {run_copy / 'last.pt'} stores no --data_loader (an older version wrote it); using the command " \
           "line's\n" in capsys.readouterr().err
    resumed = checkpoints.load_checkpoint(run_copy / "last.pt")
    assert resumed["epoch"] == 2 and resumed["args"]["data_loader"] == "workers"

    del resumed["args"]
    torch.save(resumed, run_copy / "last.pt")
    vit_main.main(tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "3"))
    assert "stores no flags (an older version wrote it); resuming with the command line's" in capsys.readouterr().err
    assert checkpoints.load_checkpoint(run_copy / "last.pt")["epoch"] == 3


def test_an_earlier_checkpoint_with_no_epoch_left_to_train_is_refused(run_copy, tiny_argv, capsys):
    """Found by a hostile user: resuming a copy of epoch 1's last.pt after the run went on to epoch 2
    rewrote the results and best.pt to epoch 1 beside epoch 2's last.pt, and trained nothing."""
    shutil.copy(run_copy / "last.pt", run_copy / "epoch1.pt")
    vit_main.main(tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2"))
    before = snapshot(run_copy)
    line = expect_one_line_error(capsys, tiny_argv(run_copy, "--resume", run_copy / "epoch1.pt"), 2, "--num_epochs")
    assert "has trained 1 epochs already" in line
    assert snapshot(run_copy) == before


def test_overwrite_with_a_checkpoint_from_elsewhere_replaces_the_run(run_copy, finished_run, tmp_path, tiny_argv):
    (run_copy / "test_results.txt").write_text("of the earlier run\n")
    flags = other_run_resumed(run_copy, tmp_path, None)
    vit_main.main(tiny_argv(run_copy, *flags, "--overwrite"))
    assert not (run_copy / "test_results.txt").exists()
    assert [row["epoch"] for row in metric_rows(run_copy)] == ["1", "2"]
    best = run_copy / "best.pt"
    assert not best.exists() or checkpoints.load_checkpoint(best)["epoch"] == 2  # never the replaced run's
    # The run was started in finished_run: run_copy and other are copies of it.
    assert (run_copy / "args_changes.txt").read_text().endswith(
        f"with num_epochs 1 -> 2, output_dir {finished_run} -> {run_copy}\n")


# ---------------------------------------------------------------------------------------------
# Output directories
# ---------------------------------------------------------------------------------------------


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(run_copy, tiny_argv):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its process id now belongs to no process
    (run_copy / run_files.LOCK_NAME).write_text(f"{dead.pid}\n")
    (run_copy / ".last.pt.abc123").write_bytes(b"half a checkpoint left by a killed run")
    vit_main.main(tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2"))
    assert not (run_copy / run_files.LOCK_NAME).exists() and not (run_copy / ".last.pt.abc123").exists()
    assert checkpoints.load_checkpoint(run_copy / "last.pt")["epoch"] == 2


def test_a_lock_naming_this_very_process_is_taken_over_when_nobody_holds_it(run_copy, tiny_argv):
    """A container's run is process 1, and so is the same job restarted after a kill: the lock the dead
    run left names the new run's own process id, which must not pass for a live owner."""
    (run_copy / run_files.LOCK_NAME).write_text(f"{os.getpid()}\n")
    vit_main.main(tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2"))
    assert not (run_copy / run_files.LOCK_NAME).exists()
    assert checkpoints.load_checkpoint(run_copy / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_a_lock_held_by_another_process_refuses_a_second_run(run_copy, tiny_argv, capsys):
    with lock_held_by_another_process(run_copy) as holder:
        before = snapshot(run_copy)
        line = expect_one_line_error(capsys, tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2"), 2,
                                     "--output_dir")
        assert f"in use by the running process {holder} " in line
        # The probe before the model is built, and taking the lock itself, both see the holder.
        with pytest.raises(run_files.DirectoryInUseError, match=f"running process {holder} "):
            run_files.OutputLock(str(run_copy)).acquire()
        assert snapshot(run_copy) == before
    assert run_files.live_lock_owner(str(run_copy)) is None  # the holder ended: its lock went with it


FORK_AND_DIE_PROGRAM = """
import os, sys, time
import run_files
run_files.OutputLock(sys.argv[1]).acquire()
worker = os.fork()
if worker == 0:  # a data-loading worker that outlives its killed run
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    time.sleep(60)
    os._exit(0)
print(worker, flush=True)
os._exit(0)  # killed: the lock is never released
"""


@pytest.mark.slow
def test_a_forked_worker_outliving_its_run_does_not_hold_the_lock(tmp_path):
    dying = subprocess.run([sys.executable, "-c", FORK_AND_DIE_PROGRAM, str(tmp_path)], cwd=REPO, timeout=60,
                           stdout=subprocess.PIPE, text=True)
    worker = int(dying.stdout)
    try:
        assert (tmp_path / run_files.LOCK_NAME).exists() and run_files.live_lock_owner(str(tmp_path)) is None
        lock = run_files.OutputLock(str(tmp_path))
        lock.acquire()
        assert (tmp_path / run_files.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        lock.release()
        assert not (tmp_path / run_files.LOCK_NAME).exists()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_overwrite_replaces_the_earlier_run(run_copy, tiny_argv):
    (run_copy / "test_results.txt").write_text("of the earlier run\n")
    (run_copy / "notes.md").write_text("the user's own file\n")
    vit_main.main(tiny_argv(run_copy, "--overwrite", "--num_epochs", "1", "--seed", "5"))
    assert not (run_copy / "test_results.txt").exists() and (run_copy / "notes.md").exists()
    assert checkpoints.load_checkpoint(run_copy / "last.pt")["args"]["seed"] == 5


def test_test_only_works_on_a_finished_run_and_beside_a_live_one(run_copy, tiny_argv):
    hold_lock(run_copy)
    before = snapshot(run_copy)
    vit_main.main(tiny_argv(run_copy, "--test_only"))
    after = snapshot(run_copy)
    assert after.pop("test_results.txt").startswith(b"Checkpoint: ")
    # The evaluation's per-class results are its own files, and those of the same best.pt as the training's
    # (which names the directory the run was trained in, before this copy).
    def counts(table):
        return [row[:-1] for row in csv.reader(table.decode().splitlines())]
    assert counts(after.pop("test_per_class_accuracy.csv")) == counts(before["per_class_accuracy.csv"])
    assert after.pop("test_confusion_matrix.png").startswith(b"\x89PNG")
    assert after == before


# ---------------------------------------------------------------------------------------------
# Runtime faults in-process: non-finite loss, full disk, a write that dies half-way
# ---------------------------------------------------------------------------------------------


def fail_in_epoch(monkeypatch, epoch, step):
    """Makes the training loss NaN at the given epoch (counting from this run's first) and step."""
    per_sample_loss = train_eval.per_sample_loss
    batches_per_epoch = 4  # 200 images in batches of 64

    def poisoned(criterion, num_classes, **options):
        loss_of, calls = per_sample_loss(criterion, num_classes, **options), {"train": 0}

        def loss(logits, targets):
            losses = loss_of(logits, targets)
            if torch.is_grad_enabled():
                calls["train"] += 1
                if calls["train"] == (epoch - 1) * batches_per_epoch + step:
                    return losses * float("nan")
            return losses

        return loss

    monkeypatch.setattr(train_eval, "per_sample_loss", poisoned)


def test_non_finite_loss_stops_and_keeps_the_last_good_epoch(run_copy, tiny_argv, capsys, monkeypatch):
    before = snapshot(run_copy)
    fail_in_epoch(monkeypatch, epoch=1, step=3)  # the resumed run's first epoch: epoch 2
    line = expect_one_line_error(capsys, tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "3"), 1,
                                 "non-finite loss")
    assert "epoch 2 train, step 3/4" in line and "best.pt and last.pt keep the last good epoch" in line
    after = snapshot(run_copy)
    for name in ("last.pt", "best.pt", "metrics.csv"):
        assert after[name] == before[name], name
    # The resumed run's restart dropped the finished run's two summary lines; epoch 1 is kept.
    assert after["train_eval_results.txt"].splitlines() == before["train_eval_results.txt"].splitlines()[:1]
    assert not (run_copy / run_files.LOCK_NAME).exists()


def test_a_step_the_gradient_scaler_skips_is_not_a_fault():
    """Huge inputs give a finite loss whose scaled gradients overflow: the scaler skips the step (the
    weights stay, the scale drops), and since the check reads the unscaled loss, training goes on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    trainer = train_eval.Trainer(model=model, device=torch.device("cpu"), num_classes=3, optimizer="sgd", lr=0.1,
                                 weight_decay=0.0, momentum=0.0, scheduler="none", lr_step=1, lr_gamma=0.5,
                                 num_epochs=1, criterion="CrossEntropy", clip_grad_norm=0.0, use_amp=False,
                                 use_compiled=False, compile_mode="default", show_progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # CUDA's float16 scaler, on the CPU
    weights = [parameter.detach().clone() for parameter in model.parameters()]
    batches = [(torch.full((4, 12), 1e36), torch.tensor([0, 1, 2, 0]))]
    result = trainer.train_one_epoch(batches, "epoch 1 train")
    assert torch.isfinite(torch.tensor(result.loss)) and trainer.scaler.get_scale() < 2.0**16
    for before, after in zip(weights, model.parameters()):
        assert torch.equal(before, after)


def test_stop_signals_given_to_the_trainer_end_the_epoch_at_the_next_step():
    stop_signals = train_eval.StopSignals()
    trainer = train_eval.Trainer(model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)),
                                 device=torch.device("cpu"), num_classes=3, optimizer="sgd", lr=0.1, weight_decay=0.0,
                                 momentum=0.0, scheduler="none", lr_step=1, lr_gamma=0.5, num_epochs=1,
                                 criterion="CrossEntropy", clip_grad_norm=0.0, use_amp=False, use_compiled=False,
                                 compile_mode="default", show_progress=False, stop_signals=stop_signals)
    batches = [(torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))] * 3
    with stop_signals:
        signal.raise_signal(signal.SIGTERM)  # only recorded while the signals are caught
        with pytest.raises(train_eval.TrainingStopped, match="SIGTERM at epoch 1 train, step 1/3"):
            trainer.train_one_epoch(batches, "epoch 1 train")


def test_the_non_finite_watch_names_the_first_bad_step():
    watch = train_eval._NonFiniteWatch(torch.device("cpu"))
    watch.add(0, torch.tensor([1.0, 2.0]))
    watch.raise_if_found("epoch 1 train", 2)
    watch.add(1, torch.tensor([1.0, float("inf")]))
    watch.add(2, torch.tensor([float("nan")]))
    with pytest.raises(train_eval.NonFiniteLoss, match="epoch 1 train, step 2/3"):
        watch.raise_if_found("epoch 1 train", 3)


def test_full_disk_keeps_the_earlier_checkpoint(run_copy, tiny_argv, capsys, monkeypatch):
    before = snapshot(run_copy)

    def disk_full(state, handle):
        handle.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    line = expect_one_line_error(capsys, tiny_argv(run_copy, "--resume", "auto", "--num_epochs", "2"), 1,
                                 "--output_dir: cannot write")
    assert "last.pt" in line and "--resume auto" in line
    assert snapshot(run_copy)["last.pt"] == before["last.pt"]
    assert not [name for name in os.listdir(run_copy) if name.startswith(".")]


@pytest.mark.slow
def test_best_pt_that_a_full_disk_kept_from_being_written_is_written_on_resume(tmp_path, tiny_argv, capsys,
                                                                                 monkeypatch):
    """last.pt is written before best.pt: a disk filling up in between leaves last.pt holding the best
    epoch and no best.pt of it. Resumed, the run writes best.pt from that state at once, since a later
    epoch that does not improve would never write it."""
    save_checkpoint = checkpoints.save_checkpoint

    def best_pt_fails(path, state):
        if os.path.basename(path) == "best.pt":
            raise run_files.OutputWriteError(path, OSError(errno.ENOSPC, "No space left on device"))
        save_checkpoint(path, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", best_pt_fails)
        line = expect_one_line_error(capsys, tiny_argv(tmp_path, "--num_epochs", "2"), 1, "--output_dir: cannot write")
    assert "best.pt: No space left on device" in line and not (tmp_path / "best.pt").exists()
    best_epoch = checkpoints.load_checkpoint(tmp_path / "last.pt")

    evaluate = train_eval.Trainer.evaluate

    def later_epochs_do_not_improve(self, loader, description="test", **options):
        result = evaluate(self, loader, description, **options)
        return result if description.startswith("epoch 1 ") else dataclasses.replace(result, top1=0.0)

    monkeypatch.setattr(train_eval.Trainer, "evaluate", later_epochs_do_not_improve)
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2", "--resume", "auto"))
    best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == best["best_epoch"] == 1 and best["history"] == best_epoch["history"]
    for name, weights in best_epoch["model"].items():
        assert torch.equal(best["model"][name], weights), name
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["best_epoch"] == 1

    # Resumed after a later epoch, the best epoch's state is gone: said, not hidden.
    (tmp_path / "best.pt").unlink()
    capsys.readouterr()
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "3", "--resume", "auto"))
    assert "best.pt does not hold the best epoch 1 of the resumed run" in capsys.readouterr().err


def test_checkpoint_write_that_dies_half_way_leaves_the_old_file(tmp_path):
    checkpoints.save_checkpoint(str(tmp_path / "last.pt"), {"epoch": 1})

    def dies(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_files.atomic_write(str(tmp_path / "last.pt"), dies)
    assert checkpoints.load_checkpoint(tmp_path / "last.pt") == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


# ---------------------------------------------------------------------------------------------
# Real processes: no traceback reaches the terminal, signals, SIGKILL and resume
# ---------------------------------------------------------------------------------------------

# Subprocesses see the full synthetic set unless told otherwise; one thread each keeps two of them
# from fighting over the cores.
SUBPROCESS_ENV = {**os.environ, dataset.SYNTHETIC_SIZES_VARIABLE: "192,64", "OMP_NUM_THREADS": "1"}
SUBPROCESS_FLAGS = [*TINY_MODEL_FLAGS, "--batch_size", "32", "--seed", "3"]


def start(output_dir, *flags):
    return subprocess.Popen([sys.executable, PROGRAM, *SUBPROCESS_FLAGS, "--output_dir", str(output_dir),
                             *map(str, flags)], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def metric_rows(output_dir):
    try:
        with open(output_dir / "metrics.csv", newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


def wait_for_epochs(process, output_dir, epochs, timeout=240):
    deadline = time.monotonic() + timeout
    while len(metric_rows(output_dir)) < epochs:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not finish its epochs in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_errors_reach_the_terminal_as_one_line(run_copy):
    truncate(run_copy / "last.pt")
    process = start(run_copy, "--resume", "auto")
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 2 and "Traceback" not in stderr and stdout == ""
    last_line = without_hint(stderr).rstrip().splitlines()[-1]
    assert last_line.startswith(f"vit_main.py: error: --resume: {run_copy / 'last.pt'}")


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_the_run_with_last_pt_of_the_last_completed_epoch(signal_number, code, tmp_path):
    process = start(tmp_path, "--num_epochs", "50")
    wait_for_epochs(process, tmp_path, 1)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr
    last_line = without_hint(stderr).rstrip().splitlines()[-1]
    assert last_line.startswith(f"vit_main.py: stopped by {signal.Signals(signal_number).name} at epoch ")
    assert last_line.endswith("continue with --resume auto")
    checkpoint = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert [int(row["epoch"]) for row in metric_rows(tmp_path)] == list(range(1, checkpoint["epoch"] + 1))
    assert not (tmp_path / run_files.LOCK_NAME).exists()


def test_sigterm_during_set_up_ends_at_the_first_step(tmp_path, tiny_argv, capsys, monkeypatch):
    write_model_summary = run_files.RunOutputs.write_model_summary

    def then_terminated(self, *args):
        write_model_summary(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_files.RunOutputs, "write_model_summary", then_terminated)
    handler_before = signal.getsignal(signal.SIGTERM)
    line = expect_one_line_error(capsys, tiny_argv(tmp_path, "--num_epochs", "2"), 143, "stopped by SIGTERM")
    assert "epoch 1 train, step 1/4" in line and line.endswith("no epoch was completed, so there is nothing to resume")
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / run_files.LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the program's handler is gone again


def test_a_run_stopped_before_its_first_epoch_does_not_refuse_the_same_command(tmp_path, tiny_argv, capsys):
    """A SIGTERM just after the lock is taken leaves args.txt, model.txt and logs without an epoch: no
    run's results, so the same command starts afresh instead of being refused as an earlier run."""
    argv = tiny_argv(tmp_path, "--num_epochs", "1")
    with pytest.MonkeyPatch.context() as patch:
        write_args = run_files.RunOutputs.write_args

        def then_terminated(self, arguments):  # the first file the run writes
            write_args(self, arguments)
            os.kill(os.getpid(), signal.SIGTERM)

        patch.setattr(run_files.RunOutputs, "write_args", then_terminated)
        expect_one_line_error(capsys, argv, 143, "stopped by SIGTERM")
    assert {"args.txt", "metrics.csv", "train_eval_results.txt"} <= set(os.listdir(tmp_path))
    vit_main.main(argv)
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    flags = ["--num_epochs", "3", "--augment", "--layer", "ConvNNAttention", "--K", "4"]
    uninterrupted = start(straight, *flags)
    victim = start(killed, *flags)
    wait_for_epochs(victim, killed, 1)
    time.sleep(0.2)  # into the second epoch
    victim.kill()
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL and len(metric_rows(killed)) < 3  # killed before its end
    assert (killed / run_files.LOCK_NAME).exists()  # a SIGKILL leaves its lock behind; the next run takes it over

    resumed = start(killed, *flags, "--resume", "auto")
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert uninterrupted.wait(timeout=240) == 0

    expected, actual = metric_rows(straight), metric_rows(killed)
    assert [row["epoch"] for row in actual] == ["1", "2", "3"]
    for expected_row, actual_row in zip(expected, actual, strict=True):
        for column in ("lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5"):
            assert float(actual_row[column]) == pytest.approx(float(expected_row[column]), rel=0, abs=1e-6)
    lines = (killed / "train_eval_results.txt").read_text().splitlines()
    assert [line[:11] for line in lines[:3]] == ["[Epoch 001]", "[Epoch 002]", "[Epoch 003]"] and len(lines) == 5
    assert not (killed / run_files.LOCK_NAME).exists()
