"""Checkpoints: what a training checkpoint holds, writing it atomically, reading it back, and how a
checkpoint's weights fit a model."""

import os
import pickle
import sys
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

import distributed
from run_files import RunOutputs, atomic_write, first_line, selected_record
from utils import capture_rng_state

if TYPE_CHECKING:  # annotations only: train_eval saves its checkpoints through this module
    from train_eval import Trainer

# What a checkpoint that is damaged, not a checkpoint, or of another architecture raises on loading.
CHECKPOINT_ERRORS = (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError)
# What a training checkpoint (last.pt, best.pt) holds beyond a bare state dict; --resume needs all of it.
TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "rng")


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


# ---------------------------------------------------------------------------------------------
# The training checkpoints: last.pt after every epoch, best.pt after each that improved test top-1
# (validation top-1 when --val_split holds out a validation split)
# ---------------------------------------------------------------------------------------------


def _checkpoint_state(trainer: "Trainer", epoch: int, history: List[Dict], run_arguments: Dict,
                      args_changes: List[Dict], class_names: Optional[List[str]] = None) -> Dict:
    # The names of the classifier's outputs, in order: a checkpoint labels new images without its dataset.
    named = {"class_names": list(class_names)} if class_names is not None else {}
    state = {
        **trainer.state_dict(),
        "epoch": epoch,
        "rng": capture_rng_state(),
        "history": history,
        "args": run_arguments,
        "args_changes": args_changes,
        # --batch_size is per process: a resume checks the global batch against this.
        "processes": distributed.world_size(),
        **named,
    }
    if history:  # a mid-epoch checkpoint of the first epoch has no best epoch yet
        best = selected_record(history)
        state.update(best_accuracy=best["test_top1"], best_epoch=best["epoch"])
    return state


def save_checkpoints(trainer: "Trainer", outputs: RunOutputs, epoch: int, history: List[Dict],
                     run_arguments: Dict, args_changes: List[Dict], class_names: Optional[List[str]] = None) -> None:
    state = _checkpoint_state(trainer, epoch, history, run_arguments, args_changes, class_names)
    save_checkpoint(outputs.path("last.pt"), state)
    if state["best_epoch"] == epoch:
        save_checkpoint(outputs.path("best.pt"), state)


def save_mid_epoch_checkpoint(trainer: "Trainer", outputs: RunOutputs, history: List[Dict], run_arguments: Dict,
                              args_changes: List[Dict], in_epoch: Dict,
                              class_names: Optional[List[str]] = None) -> None:
    """``last.pt`` part-way through epoch ``in_epoch["epoch"]``: the trainer's and the generators' state
    after an optimiser step, the completed epochs (``epoch``, ``history``: whole epochs only) and where the
    epoch stands (``in_epoch``: its number and rate, and train_eval.EpochProgress). best.pt is left alone."""
    state = _checkpoint_state(trainer, in_epoch["epoch"] - 1, history, run_arguments, args_changes, class_names)
    state["in_epoch"] = in_epoch
    save_checkpoint(outputs.path("last.pt"), state)


def in_epoch_description(checkpoint: Dict) -> Optional[str]:
    """Where a mid-epoch checkpoint continues, e.g. "step 5/8 of epoch 3", or None for an epoch's checkpoint."""
    in_epoch = checkpoint.get("in_epoch")
    if in_epoch is None:
        return None
    return f"step {in_epoch['batches'] + 1}/{in_epoch['batches_total']} of epoch {in_epoch['epoch']}"


def complete_best_checkpoint(trainer: "Trainer", outputs: RunOutputs, epoch: int, history: List[Dict],
                             run_arguments: Dict, args_changes: List[Dict], class_names: Optional[List[str]] = None,
                             state_is_the_epochs: bool = True) -> None:
    """On resuming after ``epoch``: makes ``best.pt`` hold the best epoch of ``history`` when it does not.

    A run that ended because ``best.pt`` could not be written (a full disk) left ``last.pt`` of the best
    epoch and no matching ``best.pt``; later epochs that do not improve would never write it. The state
    just resumed is that epoch's (unless ``state_is_the_epochs`` is False: a mid-epoch checkpoint is past
    it), so it is written now. Any other best epoch's state is gone: a warning says so, and ``best.pt`` is
    replaced when an epoch improves on it."""
    best_epoch = selected_record(history)["epoch"]
    best_history = [record for record in history if record["epoch"] <= best_epoch]
    path = outputs.path("best.pt")
    try:
        if os.path.isfile(path) and load_checkpoint(path).get("history") == best_history:
            return
    except CheckpointError:
        pass  # damaged: replaced below when possible
    if best_epoch == epoch and state_is_the_epochs:
        save_checkpoint(path, _checkpoint_state(trainer, epoch, history, run_arguments, args_changes, class_names))
    else:
        print(f"warning: {path} does not hold the best epoch {best_epoch} of the resumed run, whose state is gone; "
              "it is replaced when an epoch improves on it", file=sys.stderr)
