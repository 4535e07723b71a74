"""Plain helpers several test modules share: the tiny model's flags, fake CIFAR files, reading a run's
outputs, training a small run, one-line errors, crashing a run part-way, and checking saved figures.
Fixtures live in conftest.py."""

import csv
import pickle

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import dataset
import train_eval
import vit_main

# A model small enough for a CPU epoch on the shrunken synthetic set to take a fraction of a second:
# 32 px images, patch 8 (16 patches + class token), 2 blocks of width 32.
TINY_MODEL_FLAGS = [
    "--dataset", "synthetic", "--resize", "0", "--device", "cpu", "--num_workers", "0",
    "--patch_size", "8", "--num_layers", "2", "--num_heads", "2", "--d_hidden", "32", "--d_mlp", "64",
    "--batch_size", "64", "--lr", "1e-3",
]

# Columns that must repeat exactly between two runs of the same seed (timings do not).
DETERMINISTIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5"]


HINT = ": see --help for every flag and its default"


def without_hint(stderr: str) -> str:
    """stderr without the hint line that follows a refusal of the command line."""
    lines = stderr.rstrip("\n").splitlines()
    if lines and lines[-1].endswith(HINT):
        lines = lines[:-1]
    return "\n".join(lines) + "\n"


def expect_one_line_error(capsys, argv, code, starts_with, main=vit_main.main):
    """Runs ``main`` (vit_main's, or a script's) in-process; checks the exit code, that stderr ends with exactly one
    error line starting with ``starts_with`` after the program name, and that no traceback was printed. Returns
    that line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(value) for value in argv])
    assert exit_info.value.code == code
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "usage:" not in stderr
    last = without_hint(stderr).rstrip("\n").splitlines()[-1]
    assert sum(": error: " in line for line in stderr.splitlines()) <= 1
    message = last.split(": error: ", 1)[-1] if ": error: " in last else last.split(": ", 1)[-1]
    assert message.startswith(starts_with), last
    return last


def train_small_run(output_dir, *flags):
    """Trains the tiny model on the synthetic set shrunk to 200 training and 100 test images into
    ``output_dir``, for module-scoped fixtures (which cannot take the function-scoped ``tiny_argv``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataset, "SYNTHETIC_TRAIN_SIZE", 200)
        patch.setattr(dataset, "SYNTHETIC_TEST_SIZE", 100)
        vit_main.main([*TINY_MODEL_FLAGS, "--output_dir", str(output_dir), *flags])
    return output_dir


def write_pickle(path, content):
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def cifar_images(count, offset):
    """Rows of 3072 bytes (1024 red, 1024 green, 1024 blue) with a value unique to each image."""
    values = (np.arange(count, dtype=np.uint8) * 20 + offset).reshape(count, 1)
    return np.repeat(values, 3072, axis=1).astype(np.uint8)


def write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for index in range(1, 6):
        write_pickle(folder / f"data_batch_{index}", {
            "batch_label": f"training batch {index} of 5", "data": cifar_images(per_batch, index),
            "labels": [(index + i) % 10 for i in range(per_batch)], "filenames": [f"{i}.png" for i in range(per_batch)],
        })
    write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": cifar_images(3, 100),
                                         "labels": [7, 8, 9], "filenames": ["a.png", "b.png", "c.png"]})
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)],
                                           "num_cases_per_batch": per_batch, "num_vis": 3072})


def write_cifar100(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    write_pickle(folder / "train", {"data": cifar_images(6, 0), "fine_labels": [0, 10, 20, 30, 40, 99],
                                    "coarse_labels": [0, 1, 2, 3, 4, 19], "filenames": [f"{i}.png" for i in range(6)]})
    write_pickle(folder / "test", {"data": cifar_images(2, 50), "fine_labels": [5, 98],
                                   "coarse_labels": [1, 18], "filenames": ["a.png", "b.png"]})
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})


def read_metrics(output_dir):
    with open(output_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def results_lines(output_dir):
    return (output_dir / "train_eval_results.txt").read_text().splitlines()


class Interrupted(Exception):
    pass


def interrupt_in_epoch(monkeypatch, epoch):
    """Makes training crash part-way through the given epoch, as a killed job would."""
    train_one_epoch = train_eval.Trainer.train_one_epoch
    calls = {"count": 0}

    def crashing(self, loader, description, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == epoch:
            raise Interrupted
        return train_one_epoch(self, loader, description, *args, **kwargs)

    monkeypatch.setattr(train_eval.Trainer, "train_one_epoch", crashing)


def assert_resume_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch, flags, crash_epoch):
    """Runs ``flags`` straight through, and again crashed in ``crash_epoch`` then continued with
    ``--resume auto``; every deterministic metric of every epoch must agree. Returns both directories."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    vit_main.main(tiny_argv(straight, *flags))
    with monkeypatch.context() as patch:
        interrupt_in_epoch(patch, crash_epoch)
        with pytest.raises(Interrupted):
            vit_main.main(tiny_argv(resumed, *flags))
    assert len(results_lines(resumed)) == crash_epoch - 1
    vit_main.main(tiny_argv(resumed, *flags, "--resume", "auto"))
    for expected, actual in zip(read_metrics(straight), read_metrics(resumed), strict=True):
        for column in DETERMINISTIC_COLUMNS:
            assert float(actual[column]) == pytest.approx(float(expected[column]), rel=0, abs=1e-6), column
    return straight, resumed


def texts_outside_or_overlapping(figure, dpi):
    """Titles (the suptitle among them) and legends of ``figure``, saved at ``dpi``, that are cut off by its
    edge or overlap one another, and x tick labels that overlap their neighbour. Measured at that dpi: text
    does not scale exactly with it."""
    figure.set_dpi(dpi)
    renderer = FigureCanvasAgg(figure).get_renderer()  # what savefig renders a PNG with
    texts = [text for text in [*figure.texts, *(axes.title for axes in figure.axes)] if text.get_text()]
    texts += [axes.get_legend() for axes in figure.axes if axes.get_legend()]
    extents = [text.get_window_extent(renderer) for text in texts]
    outside = [text for text, box in zip(texts, extents) if not figure.bbox.contains(box.x0, box.y0)
               or not figure.bbox.contains(box.x1, box.y1)]
    overlapping = [(a, b) for i, (a, box_a) in enumerate(zip(texts, extents))
                   for b, box_b in list(zip(texts, extents))[i + 1:] if box_a.overlaps(box_b)]
    for axes in figure.axes:
        ticks = [(label, label.get_window_extent(renderer)) for label in axes.get_xticklabels() if label.get_text()]
        overlapping += [(a, b) for (a, box_a), (b, box_b) in zip(ticks, ticks[1:]) if box_a.overlaps(box_b)]
    return outside, overlapping
