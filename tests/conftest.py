"""Fixtures shared by the test modules; plain helpers are in tests/helpers.py."""

import os

import pytest
import torch
from matplotlib.figure import Figure

# Without a GPU, Triton's interpreter runs the GPU path's kernels on CPU tensors (tests/test_convnn.py). It is
# chosen when triton.language is first imported, which torch.compile's machinery may do early, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataset  # noqa: E402
from tests.helpers import TINY_MODEL_FLAGS  # noqa: E402


@pytest.fixture
def small_synthetic(monkeypatch):
    """Shrinks the synthetic set (the command-line default is 5000 / 1000 images)."""
    monkeypatch.setattr(dataset, "SYNTHETIC_TRAIN_SIZE", 200)
    monkeypatch.setattr(dataset, "SYNTHETIC_TEST_SIZE", 100)


@pytest.fixture
def tiny_argv(small_synthetic):
    """``tiny_argv(output_dir, *flags)``: command line of a tiny run on the small synthetic set;
    later flags override earlier ones, as argparse keeps the last value."""

    def build(output_dir, *flags):
        return [*TINY_MODEL_FLAGS, "--output_dir", str(output_dir), *map(str, flags)]

    return build


@pytest.fixture
def files_only_integrity(monkeypatch):
    """The fake CIFAR files cannot match torchvision's MD5 sums; accept any file that exists."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity",
                        lambda path, md5=None: os.path.isfile(path))


@pytest.fixture
def saved_figures(monkeypatch):
    """Every Figure saved while the test runs, with the dpi it was saved at."""
    figures = []
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append((figure, kwargs.get("dpi", figure.dpi)))
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures
