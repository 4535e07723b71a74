"""TensorBoard event files of a training run (--tensorboard), beside metrics.csv, which stays the record.

Every value is logged against one step axis, the training batches done since the run began: an epoch's
scalars at its last batch (``epoch x batches per epoch``), the training loss every ``STEP_LOSS_INTERVAL``
batches. One axis lets a resumed run purge, in one stroke, whatever an interrupted epoch had logged past
its checkpoint, so the stream continues without a duplicated step. tensorboard is an optional dependency.
"""

import importlib
import os
from typing import Dict, Optional

TENSORBOARD_DIR = "tensorboard"
STEP_LOSS_INTERVAL = 50
# metrics.csv columns logged under their own name rather than as split/metric.
UNSPLIT_COLUMNS = {"lr": "lr", "images_per_second": "images_per_second", "epoch_seconds": "epoch_seconds"}
INSTALL_HINT = "pip install tensorboard"


def tensorboard_problem() -> Optional[str]:
    """Why --tensorboard cannot work here, or None."""
    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard needs it to write events
    except ImportError:
        return f"needs the tensorboard package, which is not installed: {INSTALL_HINT} (or leave --tensorboard out)"
    return None


def scalar_tag(column: str) -> Optional[str]:
    """The TensorBoard tag of a metrics.csv column: ``test_top1`` -> ``test/top1``, ``ema_val_loss`` ->
    ``ema_val/loss``, ``lr`` -> ``lr``; None for the epoch number, which is the step."""
    if column in UNSPLIT_COLUMNS:
        return UNSPLIT_COLUMNS[column]
    split, _, metric = column.rpartition("_")
    return f"{split}/{metric}" if split and metric in ("loss", "top1", "top5") else None


class TensorBoardLog:
    """Writes ``<output_dir>/tensorboard/``. ``start_epoch``: the epochs the run holds already (0 when fresh);
    events an earlier process logged past them are purged from view."""

    def __init__(self, output_dir: str, steps_per_epoch: int, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.steps_per_epoch = steps_per_epoch
        self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR),
                                    purge_step=start_epoch * steps_per_epoch + 1)

    def log_epoch(self, record: Dict) -> None:
        step = record["epoch"] * self.steps_per_epoch
        for column, value in record.items():
            tag = scalar_tag(column)
            if tag is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_step_loss(self, epoch: int, batch: int, losses) -> None:
        """The mean of batch ``batch``'s per-sample ``losses`` (0-based, of ``epoch``, 1-based), every
        ``STEP_LOSS_INTERVAL``-th batch: only those are reduced and read from the device."""
        if (batch + 1) % STEP_LOSS_INTERVAL:
            return
        self.writer.add_scalar("train/step_loss", losses.mean().item(), (epoch - 1) * self.steps_per_epoch + batch + 1)

    def close(self) -> None:
        self.writer.close()
