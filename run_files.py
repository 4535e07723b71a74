"""The files of a run's output directory: atomic replacement and line-by-line appends, the directory's
lock, the line formats of the results files, the model summary, and the plot of the learning curves.

Every output is either replaced atomically or appended line by line, so that nothing written earlier
is lost. matplotlib is imported only when a plot is drawn.
"""

import csv
import errno
import fcntl  # Linux and macOS: the output lock is a flock
import io
import os
import shutil
import stat
import tempfile
from typing import Callable, Dict, List, Optional, Set

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# ---------------------------------------------------------------------------------------------
# Files: every output is either replaced atomically or appended line by line
# ---------------------------------------------------------------------------------------------

def directory_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot take a run's files, or None. Creates nothing, so that a command refused later leaves
    no folder behind: an existing directory gets a probe file, a missing one needs its nearest existing
    ancestor to be a directory this process may write into (``make_output_directory`` then creates it)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot write to {path}: {existing} is not a directory"
    if existing != os.path.abspath(path):
        return None if os.access(existing, os.W_OK | os.X_OK) else f"cannot write to {path}: {existing} is read-only"
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
            pass
    except OSError as error:
        return f"cannot write to {path}: {error.strerror or error}"
    return None


def make_output_directory(path: str) -> None:
    """Creates the output directory once every check has passed (``directory_problem`` found it creatable)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OutputWriteError(path, error) from error


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; outputs get the usual permissions instead.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then moves it into place, so a
    crash leaves either the old file or the new one, never a half-written one."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(descriptor, _FILE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        # A full disk surfaces as OSError, or as RuntimeError from torch.save's zip writer.
        if isinstance(error, (OSError, RuntimeError)):
            raise OutputWriteError(path, error) from error
        raise


def _fsync_directory(directory: str) -> None:
    # The rename itself lives in the directory: without this, a power cut may bring the old file back.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class OutputWriteError(OSError):
    """An output file could not be written; the previous version of the file is still in place."""

    def __init__(self, path: str, cause: BaseException):
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
        super().__init__(getattr(cause, "errno", None) or errno.EIO, f"cannot write {path}: {reason}")
        self.path = path


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def append_line(path: str, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputWriteError(path, error) from error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Output directories: one live run each, and no run replaced by accident
# ---------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"
# Files that show a directory holds a training run: the checkpoints, and the logs once they hold an epoch.
RUN_FILES = ("last.pt", "best.pt", "train_eval_results.txt", "metrics.csv")
# Everything a training run writes; --overwrite removes these and nothing else.
OUTPUT_FILES = RUN_FILES + ("args.txt", "args_changes.txt", "model.txt", "curves.png", "test_results.txt",
                            "per_class_accuracy.csv", "confusion_matrix.png", "test_per_class_accuracy.csv",
                            "test_confusion_matrix.png", "environment.txt")
# Folders a training run writes (--tensorboard's event files); --overwrite removes them too.
OUTPUT_FOLDERS = ("tensorboard",)


class LockFileError(RuntimeError):
    """The output directory's lock cannot be taken; the message is one line naming the lock file."""


class DirectoryInUseError(LockFileError):
    """Another live run holds the output directory's lock."""


class OutputLock:
    """``<output_dir>/.lock``, held with ``flock`` for the life of the run that writes there.

    The kernel releases a ``flock`` when its process ends, however it ends, so a lock file that no
    process holds is what a killed run left, and it is taken over. Nothing depends on the process id,
    which the file keeps only to name the owner in messages: a restarted container whose run is again
    process 1 is not mistaken for the dead run that was process 1 before it.

    On NFS the lock spans hosts when the mount passes locks to the server (Linux's default); a mount with
    ``nolock`` or ``local_lock=flock`` guards each host separately, which is accepted here. Processes
    forked while the lock is held (data-loading workers) close their copy of it, so that a worker
    outliving a killed run does not keep its directory locked."""

    # Each try that finds the file removed by a run ending meanwhile starts over with the new file.
    _TRIES = 3

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._file: Optional[io.FileIO] = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        for _ in range(self._TRIES):
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _pid_in(handle)
                handle.close()
                raise DirectoryInUseError(in_use_message(self.path, owner)) from None
            except OSError as error:
                handle.close()
                raise LockFileError(f"cannot lock {self.path}: {error.strerror or error}") from None
            if _is_same_file(handle, self.path):
                handle.truncate(0)
                handle.write(f"{os.getpid()}\n".encode())
                self._file = handle
                _HELD_LOCK_FILES.add(handle)
                return
            handle.close()  # removed by a run that ended meanwhile: lock the file now there instead
        raise LockFileError(f"could not take the lock file {self.path}; remove it if no run uses the directory")

    def _open(self) -> io.FileIO:
        try:
            return _open_lock_file(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "a+")
        except IsADirectoryError:
            raise LockFileError(f"{self.path} is a directory, not a lock file; remove it "
                                "or choose another --output_dir") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LockFileError(f"{self.path} is a symbolic link, not a lock file; remove it "
                                    "or choose another --output_dir") from None
            raise LockFileError(f"cannot open the lock file {self.path}: {error.strerror or error}") from None

    def release(self) -> None:
        if self._file is None:
            return
        # Removed while still locked, and only when it is still this run's file, so that no other run can
        # hold the file being removed, nor lose a lock file it created after the user removed this one.
        if _is_same_file(self._file, self.path):
            _remove_if_present(self.path)
        _HELD_LOCK_FILES.discard(self._file)
        self._file.close()
        self._file = None


# Lock files held by this process. A forked child closes its copies (the parent's lock stays, as a flock
# belongs to the open file, not the process) and does not unlock them, which would unlock the parent's.
_HELD_LOCK_FILES: Set[io.FileIO] = set()


def _close_inherited_locks() -> None:
    for handle in _HELD_LOCK_FILES:
        handle.close()
    _HELD_LOCK_FILES.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def live_lock_owner(output_dir: str) -> Optional[int]:
    """Process id of the live run holding ``output_dir``'s lock (0 when it has not written it yet),
    or None when no process holds the lock. Probes with a shared lock taken and dropped at once."""
    try:
        handle = _open_lock_file(os.path.join(output_dir, LOCK_NAME), os.O_RDONLY, "r")
    except OSError:
        return None  # absent, or not a readable file: taking the lock reports what is wrong with it
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(handle)
        except OSError:
            return None
        return None  # closing the file drops the shared lock


def _open_lock_file(path: str, flags: int, mode: str) -> io.FileIO:
    """Opens a lock file that must be a regular file. A symbolic link is not followed (writing the pid
    through it would overwrite whatever it points to), and a FIFO is neither waited on nor locked."""
    descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, _FILE_MODE)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file")
    return io.FileIO(descriptor, mode)


def in_use_message(lock_path: str, owner: int) -> str:
    process = f"the running process {owner}" if owner else "a running process"
    return (f"{os.path.dirname(lock_path)} is in use by {process} (lock file {lock_path}); "
            "wait for it to end or choose another --output_dir")


def remove_stale_temporaries(output_dir: str) -> None:
    """Removes what a killed run left of an atomic write: temporary files that never got renamed.
    Only called while holding the lock, so no other run can be writing them."""
    prefixes = tuple(f".{name}." for name in OUTPUT_FILES)
    for entry in os.scandir(output_dir):
        if entry.is_file() and entry.name.startswith(prefixes):
            _remove_if_present(entry.path)


def _pid_in(handle: io.FileIO) -> int:
    """The process id written in a lock file, or 0 when it is not (yet) there."""
    try:
        text = os.pread(handle.fileno(), 32, 0).decode("ascii").strip()
        return max(int(text), 0)
    except (OSError, ValueError):
        return 0


def _is_same_file(handle: io.FileIO, path: str) -> bool:
    try:
        found = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(handle.fileno())
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def earlier_run_files(output_dir: str) -> List[str]:
    """The files that show ``output_dir`` holds a run: a checkpoint, or a log with at least one epoch.
    Logs without one (what a run stopped before its first epoch ended leaves) hold nothing to lose."""
    return [name for name in RUN_FILES if _holds_run_output(os.path.join(output_dir, name))]


def _holds_run_output(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    if path.endswith(".pt"):
        return True
    try:
        with open(path, "rb") as handle:
            lines = handle.read(4096).splitlines()
    except OSError:
        return True  # unreadable: it may hold anything
    return len(lines) > (1 if path.endswith(".csv") else 0)  # metrics.csv starts with its header


def remove_earlier_run(output_dir: str) -> None:
    """Removes the files of an earlier run (for --overwrite), so that none of them mixes with the new run."""
    for name in OUTPUT_FILES:
        _remove_if_present(os.path.join(output_dir, name))
    for name in OUTPUT_FOLDERS:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Model summary (model.txt)
# ---------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def gflops_per_image(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward-pass GFLOPs of one image, counted by PyTorch's FlopCounterMode (a multiply-add is 2 FLOPs)."""
    was_training = model.training
    model.eval()
    image = torch.zeros(1, 3, img_size, img_size, device=device)
    # Layers that sample at random draw from the global generator; fork it so that counting
    # FLOPs does not change the training run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(image)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------------------------------------
# Line formats of the results files (the reference implementation's formats)
# ---------------------------------------------------------------------------------------------

METRIC_COLUMNS = [
    "epoch", "lr", "train_loss", "train_top1", "train_top5",
    "test_loss", "test_top1", "test_top5", "epoch_seconds", "images_per_second",
]
# Appended to METRIC_COLUMNS when --val_split holds out a validation split, and only then.
VALIDATION_COLUMNS = ["val_loss", "val_top1", "val_top5"]
# Appended after those only when --ema_decay is on: the test split (and the validation split, when held
# out) with the EMA weights.
EMA_COLUMNS = ["ema_test_loss", "ema_test_top1", "ema_test_top5"]
EMA_VALIDATION_COLUMNS = ["ema_val_loss", "ema_val_top1", "ema_val_top5"]


def metric_columns(validation: bool, ema: bool) -> List[str]:
    return (METRIC_COLUMNS + (VALIDATION_COLUMNS if validation else []) + (EMA_COLUMNS if ema else [])
            + (EMA_VALIDATION_COLUMNS if validation and ema else []))


def has_validation(history: List[Dict]) -> bool:
    return bool(history) and "val_top1" in history[0]


def epoch_line(record: Dict) -> str:
    return (
        f"[Epoch {record['epoch']:03d}] Time: {record['epoch_seconds']:.4f}s | "
        f"[Train] Loss: {record['train_loss']:.8f} Accuracy: Top1: {record['train_top1']:.4f}%, "
        f"Top5: {record['train_top5']:.4f}% | "
        f"[Test] Loss: {record['test_loss']:.8f} Accuracy: Top1: {record['test_top1']:.4f}%, "
        f"Top5: {record['test_top5']:.4f}%"
        + (f" | [Validation] Loss: {record['val_loss']:.8f} Accuracy: Top1: {record['val_top1']:.4f}%, "
           f"Top5: {record['val_top5']:.4f}%" if "val_top1" in record else "")
    ) + _ema_part(record)


def _ema_part(record: Dict) -> str:
    if "ema_test_loss" not in record:
        return ""
    part = (f" | [EMA Test] Loss: {record['ema_test_loss']:.8f} Accuracy: Top1: {record['ema_test_top1']:.4f}%, "
            f"Top5: {record['ema_test_top5']:.4f}%")
    if "ema_val_loss" in record:
        part += (f" | [EMA Validation] Loss: {record['ema_val_loss']:.8f} Accuracy: Top1: "
                 f"{record['ema_val_top1']:.4f}%, Top5: {record['ema_val_top5']:.4f}%")
    return part


def average_time_line(history: List[Dict]) -> str:
    average = sum(record["epoch_seconds"] for record in history) / len(history)
    return f"Average Epoch Time: {average:.4f}s"


def best_accuracy_line(history: List[Dict]) -> str:
    best = best_record(history)
    return f"Max Accuracy: {best['test_top1']:.4f}% at epoch {best['epoch']}"


def first_best(history: List[Dict], column: str) -> Dict:
    """The epoch with the highest ``column``; the first epoch reaching the maximum wins ties."""
    return max(history, key=lambda record: (record[column], -record["epoch"]))


def best_record(history: List[Dict]) -> Dict:
    """The epoch of best test top-1, the original program's "Max Accuracy": chosen on the test split itself, so its
    accuracy is an optimistic estimate."""
    return first_best(history, "test_top1")


def best_ema_accuracy_line(history: List[Dict]) -> str:
    best = first_best(history, "ema_test_top1")
    return f"Max EMA Accuracy: {best['ema_test_top1']:.4f}% at epoch {best['epoch']}"


def selection_column(history: List[Dict]) -> str:
    """The column that selects a run's epoch: validation top-1 when a validation split is held out (the test
    split then plays no part in the choice), else test top-1, which makes the selected accuracy optimistic."""
    return "val_top1" if has_validation(history) else "test_top1"


def selected_record(history: List[Dict]) -> Dict:
    """The run's selected epoch, the first with the best ``selection_column``: the epoch whose weights best.pt
    holds, whose per-class results are written, and whose test top-1 summarize.py reports."""
    return first_best(history, selection_column(history))


def best_validation_line(history: List[Dict]) -> str:
    chosen = selected_record(history)
    return (f"Test Accuracy at best validation epoch: {chosen['test_top1']:.4f}% at epoch {chosen['epoch']} "
            f"(validation top-1 {chosen['val_top1']:.4f}%)")


def summary_lines(history: List[Dict]) -> List[str]:
    lines = [average_time_line(history), best_accuracy_line(history)]
    if "ema_test_top1" in history[-1]:
        lines.append(best_ema_accuracy_line(history))
    # Last, so that the results file ends with the number to report.
    if has_validation(history):
        lines.append(best_validation_line(history))
    return lines


def results_text(history: List[Dict]) -> str:
    return "".join(epoch_line(record) + "\n" for record in history)


def args_change_line(change: Dict) -> str:
    """``resumed after epoch 5 (2025-01-31T09:00:00) with num_epochs 5 -> 10, device cuda -> cpu``."""
    values = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in change["values"].items())
    return f"resumed after epoch {change['after_epoch']} ({change['time']}) with {values}"


def test_line(loss: float, top1: float, top5: float) -> str:
    return f"[Test] Loss: {loss:.8f} Accuracy: Top1: {top1:.4f}%, Top5: {top5:.4f}%"


class RunOutputs:
    """The files of one output directory.

    ``args.txt``, ``model.txt``, ``metrics.csv`` (rewritten only at a (re)start), ``curves.png``
    and checkpoints are replaced atomically; ``train_eval_results.txt`` and ``metrics.csv`` gain
    one line per epoch as it ends.
    """

    def __init__(self, output_dir: str, validation: bool = False, ema: bool = False):
        self.output_dir = output_dir
        self.columns = metric_columns(validation, ema)
        self.results_path = self.path("train_eval_results.txt")
        self.metrics_path = self.path("metrics.csv")

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def write_args(self, arguments: Dict) -> None:
        self._replace_when_different("args.txt", "".join(f"{name}: {value}\n" for name, value in arguments.items()))

    def write_args_changes(self, changes: List[Dict]) -> None:
        """args_changes.txt: one line per resume that changed a flag (``args_change_line``), so that args.txt,
        which holds the values in effect, never hides what the earlier epochs were trained with."""
        if changes or os.path.exists(self.path("args_changes.txt")):
            self._replace_when_different("args_changes.txt", "".join(args_change_line(change) + "\n"
                                                                      for change in changes))

    def _replace_when_different(self, name: str, text: str) -> None:
        # A resume that changes nothing leaves the run's record as it was, down to its modification time.
        try:
            with open(self.path(name), encoding="utf-8") as handle:
                if handle.read() == text:
                    return
        except (OSError, UnicodeDecodeError):
            pass
        atomic_write_text(self.path(name), text)

    def write_model_summary(self, model: nn.Module, img_size: int, device: torch.device) -> None:
        parameters = count_parameters(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        text = (
            f"{model}\n\n"
            f"Total parameters: {parameters:,}\n"
            f"Trainable parameters: {trainable:,}\n"
            f"GFLOPs per image ({img_size}x{img_size}, forward): {gflops_per_image(model, img_size, device):.4g}\n"
        )
        atomic_write_text(self.path("model.txt"), text)

    def start_logs(self, history: List[Dict]) -> None:
        """Rewrites the per-epoch logs to hold exactly ``history`` (empty for a fresh run): lines
        of epochs after a resumed checkpoint, and the summary lines of a finished run, go away."""
        atomic_write_text(self.results_path, results_text(history))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.metrics_path, table.getvalue())

    def log_epoch(self, record: Dict, history: List[Dict]) -> None:
        append_line(self.results_path, epoch_line(record))
        append_line(self.metrics_path, ",".join(repr(record[column]) for column in self.columns))
        write_curves(self.path("curves.png"), history)

    def finish(self, history: List[Dict]) -> None:
        for line in summary_lines(history):
            append_line(self.results_path, line)

    def hold_finished_run(self, history: List[Dict]) -> bool:
        """Whether the results file is already that of a run finished after ``history``'s epochs."""
        try:
            with open(self.results_path, encoding="utf-8") as handle:
                return handle.read() == results_text(history) + "".join(line + "\n" for line in summary_lines(history))
        except (OSError, UnicodeDecodeError):
            return False

    def write_test_results(self, checkpoint: str, loss: float, top1: float, top5: float) -> None:
        text = f"Checkpoint: {checkpoint}\n{test_line(loss, top1, top5)}\n"
        atomic_write_text(self.path("test_results.txt"), text)

    def write_per_class_results(self, confusion: torch.Tensor, names: List[str], weights: str,
                                evaluation: bool = False) -> List[str]:
        """The per-class accuracy table and confusion matrix of a test-split evaluation, each naming ``weights``
        (the checkpoint, its epoch and which weights): per_class_accuracy.csv and confusion_matrix.png for the
        training's own record, test_per_class_accuracy.csv and test_confusion_matrix.png for an ``evaluation``
        (--test_only), which so never rewrites the training's. Returns the paths written."""
        prefix = "test_" if evaluation else ""
        table, matrix = self.path(f"{prefix}per_class_accuracy.csv"), self.path(f"{prefix}confusion_matrix.png")
        atomic_write_text(table, per_class_table(confusion, names, weights))
        write_confusion_matrix(matrix, confusion, names, weights)
        return [table, matrix]


PER_CLASS_COLUMNS = ["class_index", "class_name", "images", "correct", "accuracy", "weights"]


def per_class_table(confusion: torch.Tensor, names: List[str], weights: str) -> str:
    """One row per class of ``confusion`` (rows: true class, columns: predicted class); accuracy in
    percent, empty for a class without test images; ``weights`` names the weights evaluated, on every row so
    that any row read alone says what it measures."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    images, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    for index, name in enumerate(names):
        accuracy = repr(100.0 * correct[index] / images[index]) if images[index] else ""
        writer.writerow([index, name, images[index], correct[index], accuracy, weights])
    return table.getvalue()


# Up to this many classes the confusion matrix shows every count and every class name.
CONFUSION_MATRIX_LABELLED_CLASSES = 20


def write_confusion_matrix(path: str, confusion: torch.Tensor, names: List[str], weights: str) -> None:
    """Each true class's row as fractions of its images, so that classes of different sizes compare;
    counts are written in the cells while the classes are few enough to read them."""
    from matplotlib.figure import Figure

    count = len(names)
    images = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    fractions = (confusion.double() / images).numpy()
    labelled = count <= CONFUSION_MATRIX_LABELLED_CLASSES
    side = 7 if labelled else 9
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.subplots()
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(shown, ax=axes, label="fraction of the true class's images")
    axes.set(xlabel="predicted class", ylabel="true class", title=f"Test split, weights of {weights}")
    if labelled:
        axes.set_xticks(range(count), names, rotation=45, ha="right")
        axes.set_yticks(range(count), names)
        for true, row in enumerate(confusion.tolist()):
            for predicted, cell in enumerate(row):
                colour = "white" if fractions[true, predicted] > 0.5 else "black"
                axes.text(predicted, true, str(cell), ha="center", va="center", fontsize=8, color=colour)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def write_curves(path: str, history: List[Dict]) -> None:
    """Loss and top-1 accuracy against epoch. Uses a bare Figure (no pyplot), so it needs no display."""
    # Imported here: matplotlib loads slowly, and only training runs draw.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    splits = ("train", "test", "val") if has_validation(history) else ("train", "test")
    for split in splits:
        loss_axes.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        accuracy_axes.plot(epochs, [r[f"{split}_top1"] for r in history], marker="o", label=split)
    if "ema_test_loss" in history[-1]:
        loss_axes.plot(epochs, [r["ema_test_loss"] for r in history], marker="o", label="test (EMA)")
        accuracy_axes.plot(epochs, [r["ema_test_top1"] for r in history], marker="o", label="test (EMA)")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Top-1 accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(True, alpha=0.3)
        axes.legend()
        # One tick is enough: by default two are wanted, and after one epoch they would fall between whole epochs.
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
