"""Fixtures shared by the command-line, training and dataset tests."""

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the GPU path's kernels on CPU tensors (tests/test_convnn.py). It is
# chosen when triton.language is first imported, which torch.compile's machinery may do early, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataset  # noqa: E402

# A model small enough for a CPU epoch on the shrunken synthetic set to take a fraction of a second:
# 32 px images, patch 8 (16 patches + class token), 2 blocks of width 32.
TINY_MODEL_FLAGS = [
    "--dataset", "synthetic", "--resize", "0", "--device", "cpu", "--num_workers", "0",
    "--patch_size", "8", "--num_layers", "2", "--num_heads", "2", "--d_hidden", "32", "--d_mlp", "64",
    "--batch_size", "64", "--lr", "1e-3",
]


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
