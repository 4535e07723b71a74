"""Checkpoints: writing them atomically, reading them back, and how a checkpoint's weights fit a model."""

from typing import Dict, List, Optional

import torch

from run_files import atomic_write, first_line


def save_checkpoint(path: str, state: Dict) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line naming the file."""


def load_checkpoint(path: str, map_location="cpu") -> Dict:
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    # Unpickling damaged bytes can fail with almost any exception type (IndexError, UnicodeDecodeError, ...),
    # and each means the same thing here: this file cannot be used.
    except Exception as error:
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({first_line(error)})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint (holds a {type(checkpoint).__name__}, not a dictionary)")
    return checkpoint


# How many parameter names a mismatch message shows of each kind; the counts are always complete.
_NAMES_SHOWN = 3


def state_dict_mismatch(expected: Dict, found: Dict) -> Optional[str]:
    """What differs between the model's state dict and a checkpoint's, as one line, or None when they fit."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [f"{name} {_shape(found[name])} vs {_shape(expected[name])}" for name in expected
                if name in found and _shape(found[name]) != _shape(expected[name])]
    parts = [f"{len(names)} {kind} ({', '.join(names[:_NAMES_SHOWN])}{', ...' if len(names) > _NAMES_SHOWN else ''})"
             for kind, names in (("parameters missing from the checkpoint", missing),
                                 ("unexpected parameters", unexpected),
                                 ("parameters of another shape (checkpoint vs model)", reshaped)) if names]
    return "; ".join(parts) if parts else None


def _shape(value) -> List[int]:
    return list(value.shape) if isinstance(value, torch.Tensor) else []


def model_weights(checkpoint: Dict) -> Dict:
    """The model state dict of a training checkpoint, or the checkpoint itself when it is a bare state dict."""
    return checkpoint["model"] if "model" in checkpoint else checkpoint

