"""The runs the command line starts: training (fresh or continued from a checkpoint) and evaluation of
a checkpoint's weights.

A run that continues or evaluates a checkpoint takes its settings from it (``resume_settings``,
``evaluation_settings``). Bad input found here raises ``UsageError``, which the command line reports
like argparse, in one line (exit code 2); a fault that ends a run raises ``RunEnded``, reported in one
line with its own exit code. Neither prints a traceback.
"""

import argparse
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

import checkpoints
import dataset
import distributed
import environment
import run_files
import settings
import tensorboard_log
import train_eval
import utils
from settings import FRESH_MODEL

# Exit code of faults found while running (bad input is 2; signals give 128 + their number).
RUNTIME_FAULT = 1


class UsageError(Exception):
    """Bad input: a flag, a file a flag names, or the data. The message is one line starting with the flag."""


class RunEnded(Exception):
    """A fault or a signal ended the run: the message is the line that says why and what is left."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# The checkpoint a training run continues
# ---------------------------------------------------------------------------------------------


def resume_path(args: argparse.Namespace) -> Optional[str]:
    if args.resume == "auto":
        candidate = os.path.join(args.output_dir, "last.pt")
        return candidate if os.path.isfile(candidate) else None
    return args.resume


def continues_in_place(args: argparse.Namespace) -> bool:
    """Whether --resume continues the run of --output_dir (auto, or a checkpoint in that directory)."""
    return args.resume == "auto" or _same_path(os.path.dirname(os.path.abspath(args.resume)), args.output_dir)


def _same_path(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


# ---------------------------------------------------------------------------------------------
# Settings taken from the checkpoint that is resumed or evaluated
# ---------------------------------------------------------------------------------------------


@dataclass
class Resumed:
    """The checkpoint a training run continues, and the record of the run's flags that it carries on."""

    path: str
    checkpoint: Dict
    record: Dict  # the flags in effect, as stored in the checkpoints and written to args.txt
    args_changes: List[Dict]  # every resume that changed a flag (run_files.args_change_line), this one's last


def resume_settings(args: argparse.Namespace, given: Set[str], path: str) -> Tuple[argparse.Namespace, Resumed]:
    """The run's settings are the checkpoint's: a flag given with another value is refused, unless it is
    one a resumed run may change, in which case the change is recorded. Flags not given take the stored
    values, so ``--output_dir RUN --resume auto`` alone continues RUN as it was started."""
    checkpoint = _read_checkpoint("--resume", path)
    missing = [key for key in checkpoints.TRAINING_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise UsageError(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
                         "resume from a last.pt or best.pt, or evaluate it with --test_only --checkpoint")
    stored = checkpoint.get("args")
    if stored is not None:  # a flag newer than the checkpoint has the value its run had; after the stored flags,
        # whose order args.txt keeps. A flag saying where it runs is the command line's (with a warning).
        stored = {**stored, **{name: flag.value_of_older_runs for name, flag in settings.FLAGS.items()
                               if name not in stored and flag.role.stored and not flag.role.resumable}}
    if stored is None:
        print(f"warning: {path} stores no flags (an older version wrote it); resuming with the command line's",
              file=sys.stderr)
        merged, record, values = args, dict(vars(args)), {}
    else:
        _warn_unstored(path, args, stored)
        processes_known = "processes" in checkpoint
        may_change = set(settings.RESUMABLE) | ({"batch_size"} if processes_known else set())
        _refuse_other_values(args, given, stored, set(_settings(args)) - may_change, path,
                             lambda flag: f"a resumed run keeps its settings: leave {flag} out, or start a new "
                                          "run in another --output_dir")
        merged = _with_stored_values(args, given, stored)
        values = {name: [stored[name], getattr(merged, name)] for name in settings.RESUMABLE
                  if name in stored and stored[name] != getattr(merged, name)}
        if processes_known:
            values.update(_batch_changes(merged, stored, checkpoint["processes"], path))
        if "output_dir" in stored and not _same_path(stored["output_dir"], args.output_dir):
            values["output_dir"] = [stored["output_dir"], args.output_dir]
        record = {**stored, **{name: getattr(merged, name) for name in _settings(args) if name not in stored},
                  **{name: new for name, (_, new) in values.items() if name in stored}}
    epoch = checkpoint["epoch"]
    # With no epoch left to train, only the run's own last.pt may be resumed (to finish its results files):
    # any other checkpoint would rewrite the results and best.pt to its earlier epochs beside a later last.pt.
    nothing_to_train = merged.num_epochs == epoch and (
        "num_epochs" in values or not _same_path(path, os.path.join(args.output_dir, "last.pt")))
    if merged.num_epochs < epoch or nothing_to_train:
        raise UsageError(f"--num_epochs: {path} has trained {epoch} epochs already; give more than {epoch} "
                         "to train it further")
    if "num_epochs" in values and getattr(merged, "warmup_epochs", 0) > 0 and merged.scheduler == "cosine":
        # The cosine after a warmup anneals over the steps planned at the start; it is not refitted.
        raise UsageError(f"--num_epochs: {path} anneals a cosine after its warmup over {values['num_epochs'][0]} "
                         "epochs, which cannot change on a resume; leave --num_epochs out or start a new run")
    args_changes = list(checkpoint.get("args_changes", []))
    if values:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        args_changes.append({"after_epoch": epoch, "time": now, "values": values})
    return merged, Resumed(path, checkpoint, record, args_changes)


def _batch_changes(merged: argparse.Namespace, stored: Dict, stored_processes: int, path: str) -> Dict[str, List]:
    """--batch_size is per process: it may change with the number of processes, so that the global
    batch of every optimiser step stays the one the run was trained with."""
    processes = processes_now()
    global_batch = stored["batch_size"] * stored_processes
    if merged.batch_size * processes != global_batch:
        fix = (f"give --batch_size {global_batch // processes} for {processes} process(es)"
               if global_batch % processes == 0 else f"resume it with {stored_processes} process(es)")
        raise UsageError(f"--batch_size: {path} was trained with a global batch of {global_batch} (--batch_size "
                         f"{stored['batch_size']} in each of {stored_processes} process(es)); {fix}")
    changes = {}
    if merged.batch_size != stored["batch_size"]:
        changes["batch_size"] = [stored["batch_size"], merged.batch_size]
    if processes != stored_processes:
        changes["processes"] = [stored_processes, processes]
    return changes


def processes_now() -> int:
    # Known before the process group is joined: torchrun's environment, or a single process.
    environment = distributed.torchrun_environment()
    return environment["world_size"] if environment else 1


def evaluation_settings(args: argparse.Namespace,
                        given: Set[str]) -> Tuple[argparse.Namespace, Optional[Tuple[str, Dict]]]:
    """--test_only: the checkpoint to evaluate (None for --checkpoint none) and the settings to build its
    model and test split with, the checkpoint's own: a model or dataset flag given with another value is
    refused. test_results.txt goes to --output_dir, else beside the --checkpoint."""
    path = evaluated_checkpoint_path(args)
    if path is None:
        return args, None
    checkpoint = _read_checkpoint("--checkpoint", path)
    if args.checkpoint and "output_dir" not in given:
        args = argparse.Namespace(**{**vars(args), "output_dir": os.path.dirname(args.checkpoint) or "."})
    stored = checkpoint.get("args")
    if stored is None:  # a bare state dict: the command line describes its model
        return args, (path, checkpoint)
    _refuse_other_values(args, given, stored, settings.EVALUATED, path,
                         lambda flag: f"leave {flag} out to evaluate it as trained")
    return _with_stored_values(args, given, stored), (path, checkpoint)


def check_evaluated_weights(args: argparse.Namespace, evaluated: Optional[Tuple[str, Dict]]) -> None:
    """--test_weights ema needs a checkpoint of a run trained with --ema_decay."""
    if args.test_weights != "ema":
        return
    if evaluated is None or "ema" not in evaluated[1]:
        source = evaluated[0] if evaluated else f"--checkpoint {FRESH_MODEL}"
        raise UsageError(f"--test_weights: {source} holds no EMA weights (its run had no --ema_decay); "
                         "evaluate its weights with --test_weights model")


def ema_weights(checkpoint: Dict) -> Dict:
    """The model state dict of the EMA weights a checkpoint holds (AveragedModel keeps them under ``module.``)."""
    prefix = "module."
    return {name[len(prefix):]: value for name, value in checkpoint["ema"].items() if name.startswith(prefix)}


def evaluated_checkpoint_path(args: argparse.Namespace) -> Optional[str]:
    """--checkpoint, else <output_dir>/best.pt; never, unasked, the random weights of a fresh model."""
    if args.checkpoint == FRESH_MODEL:
        return None
    if args.checkpoint:
        return args.checkpoint
    best, last = (os.path.join(args.output_dir, name) for name in ("best.pt", "last.pt"))
    if os.path.isfile(best):
        return best
    if os.path.isfile(last):
        raise UsageError(f"--checkpoint: {args.output_dir} has a last.pt but no best.pt; evaluate the last epoch "
                         f"with --checkpoint {last}")
    raise UsageError(f"--checkpoint: no {best} to evaluate; give the weights with --checkpoint PATH (or evaluate a "
                     f"freshly initialised model with --checkpoint {FRESH_MODEL})")


def _settings(args: argparse.Namespace) -> List[str]:
    """The names of the flags that are settings of a run, in the parser's order."""
    return [name for name in vars(args) if settings.FLAGS[name].role.stored]


def _with_stored_values(args: argparse.Namespace, given: Set[str], stored: Dict) -> argparse.Namespace:
    taken = {name: stored[name] for name in _settings(args) if name in stored and name not in given}
    return argparse.Namespace(**{**vars(args), **taken})


def _refuse_other_values(args: argparse.Namespace, given: Set[str], stored: Dict, checked: Iterable[str], path: str,
                         advice) -> None:
    """One line naming the first checked flag given with a value other than the stored one (and the others)."""
    checked = set(checked)
    different = [name for name in _settings(args) if name in checked and name in given and name in stored
                 and getattr(args, name) != stored[name]]
    if not different:
        return
    first, *others = different
    also = f" (and with {', '.join(f'--{name} {stored[name]}' for name in others)})" if others else ""
    raise UsageError(f"--{first}: {path} was trained with --{first} {stored[first]}, not {getattr(args, first)}"
                     f"{also}; {advice('--' + first)}")


def _warn_unstored(path: str, args: argparse.Namespace, stored: Dict) -> None:
    unstored = [name for name in _settings(args) if name not in stored]
    if unstored:
        print(f"warning: {path} stores no {', '.join('--' + name for name in unstored)} (an older version wrote "
              "it); using the command line's", file=sys.stderr)


def _read_checkpoint(flag: str, path: str) -> Dict:
    try:
        return checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as error:
        raise UsageError(f"{flag}: {error}; give an intact copy (best.pt and last.pt are separate copies)") from error


def check_weights_fit(flag: str, path: str, checkpoint: Dict, model: torch.nn.Module) -> None:
    """Refuses a checkpoint whose parameters are not the model's, naming what differs."""
    mismatch = checkpoints.state_dict_mismatch(model.state_dict(), checkpoints.model_weights(checkpoint))
    if mismatch:
        raise UsageError(f"{flag}: {path} is of another model: {mismatch}; pass the model flags it was trained "
                         "with (see its args.txt)")


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, trainer_options: Dict, img_size: int, resumed: Optional[Resumed]) -> None:
    """Trains the run of --output_dir: afresh, or continuing ``resumed``. ``trainer_options`` are the
    keyword arguments of the Trainer that the command line settles (model, device, optimiser, ...)."""
    outputs = run_files.RunOutputs(args.output_dir, validation=args.val_split > 0, ema=args.ema_decay > 0)
    if resumed and _is_finished(args, resumed, outputs):
        distributed.print_main(f"nothing to do: {args.output_dir} finished all {args.num_epochs} epochs; raise "
                               "--num_epochs to train it further")
        return
    _check_data(args)
    # Signals are caught from the lock on, not only in the epoch loop: a SIGTERM during the set-up still
    # ends with the message and exit code (at the first step), a second one at once.
    stop_signals = train_eval.StopSignals()
    # Every rank has checked the output directory (vit_main.earlier_run_problem) before rank 0 locks it;
    # otherwise a slower rank would find the directory in use by rank 0.
    distributed.wait_for_all_processes()
    with faults_explained(outputs):
        run_files.make_output_directory(args.output_dir)  # only now: a command refused earlier leaves no folder
        # Under torchrun rank 0 writes every file, so it alone holds the directory's lock.
        claim = output_directory_claimed(args.output_dir) if distributed.is_main_process() else (
            contextlib.nullcontext())
        with claim, stop_signals:
            _train(args, trainer_options, stop_signals, outputs, img_size, resumed)


def evaluate(args: argparse.Namespace, trainer_options: Dict, evaluated: Optional[Tuple[str, Dict]]) -> None:
    """--test_only: evaluates the test split with the weights of ``evaluated`` (path and checkpoint), or with
    freshly initialised ones when it is None (--checkpoint none). Reads a checkpoint only, so it may run
    beside a live training run; writes only test_results.txt, test_per_class_accuracy.csv and
    test_confusion_matrix.png, so the args.txt, model.txt, logs and per-class record of the training run stay as
    they were."""
    outputs = run_files.RunOutputs(args.output_dir)
    _check_data(args)
    trainer = _trainer(trainer_options)
    with faults_explained(outputs):
        run_files.make_output_directory(args.output_dir)
        _evaluate(args, trainer, outputs, evaluated)


def _check_data(args: argparse.Namespace) -> None:
    try:  # after the cheap checks: it may read the whole test split, so under torchrun rank 0 alone does
        distributed.on_rank_zero(
            lambda: dataset.check_data(args.dataset, args.data_path, need_train=not args.test_only))
    except dataset.DatasetUnavailableError as error:
        raise UsageError(str(error)) from error
    except KeyboardInterrupt:
        raise RunEnded("interrupted while checking the data; nothing was written", 130) from None


def _trainer(options: Dict, stop_signals: Optional[train_eval.StopSignals] = None) -> train_eval.Trainer:
    terminal = train_eval.show_progress_bars()
    plain_seconds = train_eval.PLAIN_PROGRESS_SECONDS if not terminal and distributed.is_main_process() else None
    return train_eval.Trainer(**options, stop_signals=stop_signals, distributed_replica=distributed.is_distributed(),
                              show_progress=terminal and distributed.is_main_process(),
                              plain_progress_seconds=plain_seconds)


def _train(args: argparse.Namespace, trainer_options: Dict, stop_signals: train_eval.StopSignals,
           outputs: run_files.RunOutputs, img_size: int, resumed: Optional[Resumed]) -> None:
    started = datetime.datetime.now(datetime.timezone.utc)
    # The data first: when it cannot be had, the output directory is left as it was. The trainer comes
    # after it, as a warmup's schedule counts the batches of an epoch.
    train_data, test_data, num_classes, _ = _load_data(args, need_train=True)
    data = dataset.fingerprint(args.dataset, train_data, test_data)  # of the whole training split: before hold-out
    val_data = None
    if args.val_split > 0:
        train_data, val_data = _hold_out_validation(args, train_data)
    train_loader, test_loader = dataset.make_loaders(train_data, test_data,
                                                     **loader_config(args, trainer_options["device"]))
    val_loader, validation = None, ""
    if val_data is not None:
        val_loader = dataset.evaluation_loader(val_data, **loader_config(args, trainer_options["device"]))
        validation = f", {len(val_data)} validation (held out of training)"
    trainer = _trainer({**trainer_options, "steps_per_epoch": len(train_loader)}, stop_signals)
    start_epoch, history, rng_state, in_epoch = 0, [], None, None
    record, args_changes = vars(args), []
    if resumed:
        try:
            trainer.load_state_dict(resumed.checkpoint)
        except checkpoints.CHECKPOINT_ERRORS as error:
            raise UsageError(f"--resume: {resumed.path} does not fit this model and optimiser: "
                             f"{run_files.first_line(error)}") from error
        checkpoint = resumed.checkpoint
        start_epoch, history, rng_state = checkpoint["epoch"], checkpoint["history"], checkpoint["rng"]
        trainer.fit_schedule_to(args.num_epochs, start_epoch)
        record, args_changes = resumed.record, resumed.args_changes
        in_epoch = checkpoint.get("in_epoch")
        if in_epoch is not None and in_epoch["batches_total"] != len(train_loader):
            raise UsageError(f"--resume: {resumed.path} stopped part-way through epoch {in_epoch['epoch']} of "
                             f"{in_epoch['batches_total']} steps, but an epoch now has {len(train_loader)}; resume "
                             "it with the --batch_size and number of processes it was trained with")
        continues = checkpoints.in_epoch_description(checkpoint)
        distributed.print_main(f"Resuming from {resumed.path} after epoch {start_epoch}"
                               + (f", at {continues}" if continues else ""))
    facts = settings.run_facts(args.batch_size, distributed.world_size(), data)
    if resumed:
        _check_same_data(resumed, facts)
    # The facts follow the flags, refreshed: a resume may change the processes, never the global batch or data.
    record = {**{name: value for name, value in record.items() if name not in settings.FACTS}, **facts}

    if distributed.is_main_process():
        if args.overwrite:
            run_files.remove_earlier_run(args.output_dir)
        outputs.write_args(record)
        outputs.write_args_changes(args_changes)
        if not resumed or not os.path.isfile(outputs.path("model.txt")):
            outputs.write_model_summary(trainer.model, img_size, trainer.device)
    environment.record_start(outputs.path(environment.ENVIRONMENT_FILE), trainer.device, started)
    distributed.print_main(f"{args.layer} ViT, {run_files.count_parameters(trainer.model):,} parameters, on "
                           f"{args.device}; {args.dataset}: {len(train_data)} training{validation} and "
                           f"{len(test_data)} test images of {img_size}x{img_size}", flush=True)
    tensorboard = None
    if args.tensorboard and distributed.is_main_process():
        tensorboard = tensorboard_log.TensorBoardLog(args.output_dir, len(train_loader), start_epoch)
    if rng_state is not None:
        # Restored last: the run continues with exactly the generator states it had after start_epoch.
        utils.restore_rng_state(rng_state)
    distributed.decorrelate_ranks(args.seed, start_epoch)
    names = dataset.class_names(test_data, num_classes)
    history = train_eval.fit(trainer, train_loader, test_loader, outputs=outputs, num_epochs=args.num_epochs,
                             seed=args.seed, run_arguments=record, start_epoch=start_epoch, history=history,
                             args_changes=args_changes, val_loader=val_loader, class_names=names,
                             tensorboard=tensorboard, checkpoint_steps=args.checkpoint_steps, in_epoch=in_epoch)
    _per_class_results_of_best(trainer, outputs, test_loader, names, history)


def _check_same_data(resumed: Resumed, facts: Dict) -> None:
    """--data_path may move with the data, but a resumed run must go on with the data it was trained on."""
    trained_on = resumed.record.get("data")  # None for a run recorded before the fingerprint
    if trained_on is not None and trained_on != facts["data"]:
        raise UsageError(f"--data_path: {resumed.path} was trained on other data ({trained_on}) than "
                         f"{resumed.record.get('data_path')} holds now ({facts['data']}); give the folder it was "
                         "trained on")


def _hold_out_validation(args: argparse.Namespace, train_data):
    try:
        return dataset.hold_out_validation(train_data, args.dataset, args.resize, args.val_split, args.split_seed)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _per_class_results_of_best(trainer: train_eval.Trainer, outputs: run_files.RunOutputs, test_loader,
                               names: List[str], history: List[Dict]) -> None:
    """per_class_accuracy.csv and confusion_matrix.png of the test split, evaluated with best.pt's weights:
    the model the run reports (chosen by validation top-1 when a validation split is held out)."""
    distributed.barrier()  # every rank reads the best.pt that rank 0 has just written
    chosen_epoch = run_files.selected_record(history)["epoch"]
    path = outputs.path("best.pt")
    try:
        best = checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as error:
        best = {"epoch": None}
        print(f"warning: {error}", file=sys.stderr)
    if best.get("epoch") != chosen_epoch:
        if distributed.is_main_process():
            print(f"warning: {path} does not hold the best epoch {chosen_epoch}; per_class_accuracy.csv and "
                  "confusion_matrix.png are not written", file=sys.stderr)
        return
    trainer.model.load_state_dict(best["model"])
    result = trainer.evaluate(test_loader, "per-class test", confusion=True)
    if distributed.is_main_process():
        outputs.write_per_class_results(result.confusion, names,
                                        f"best.pt (epoch {chosen_epoch}, trained weights)")
        distributed.print_main(f"Per-class test accuracy of best.pt (epoch {chosen_epoch}): "
                               f"{outputs.path('per_class_accuracy.csv')}, {outputs.path('confusion_matrix.png')}",
                               flush=True)


def _evaluate(args: argparse.Namespace, trainer: train_eval.Trainer, outputs: run_files.RunOutputs,
              evaluated: Optional[Tuple[str, Dict]]) -> None:
    if evaluated:
        checkpoint, epoch = evaluated[0], evaluated[1].get("epoch")
        weights = ema_weights(evaluated[1]) if args.test_weights == "ema" else checkpoints.model_weights(evaluated[1])
        try:
            trainer.model.load_state_dict(weights)
        except checkpoints.CHECKPOINT_ERRORS as error:
            raise UsageError(f"--checkpoint: {checkpoint} does not fit this model (pass the model flags it was "
                             f"trained with, see its args.txt): {run_files.first_line(error)}") from error
    else:
        checkpoint, epoch = "none (freshly initialised model)", None
    _, test_data, num_classes, _ = _load_data(args, need_train=False)
    _, test_loader = dataset.make_loaders(None, test_data, **loader_config(args, trainer.device))
    result = trainer.evaluate(test_loader, confusion=True)
    if args.test_weights == "ema":
        checkpoint += " (EMA weights)"
    distributed.print_main(f"Checkpoint: {checkpoint}")
    distributed.print_main(run_files.test_line(result.loss, result.top1, result.top5), flush=True)
    if distributed.is_main_process():
        outputs.write_test_results(checkpoint, result.loss, result.top1, result.top5)
        written = outputs.write_per_class_results(result.confusion, dataset.class_names(test_data, num_classes),
                                                  _weights_label(evaluated, epoch, args.test_weights), evaluation=True)
        distributed.print_main(f"Per-class test accuracy: {', '.join(written)}", flush=True)


def _weights_label(evaluated: Optional[Tuple[str, Dict]], epoch: Optional[int], test_weights: str) -> str:
    if not evaluated:
        return "a freshly initialised model"
    which = "EMA weights" if test_weights == "ema" else "trained weights"
    return f"{evaluated[0]} ({f'epoch {epoch}, ' if epoch is not None else ''}{which})"


def _is_finished(args: argparse.Namespace, resumed: Resumed, outputs: run_files.RunOutputs) -> bool:
    """Whether resuming would change nothing: the run holds every epoch and its results say so."""
    return (resumed.checkpoint["epoch"] == args.num_epochs and continues_in_place(args)
            and outputs.hold_finished_run(resumed.checkpoint["history"]))


@contextlib.contextmanager
def output_directory_claimed(output_dir: str):
    """Holds <output_dir>/.lock while training, so that a second run cannot write into the same files."""
    lock = run_files.OutputLock(output_dir)
    try:
        lock.acquire()
    except run_files.LockFileError as error:
        raise UsageError(f"--output_dir: {error}") from error
    try:
        run_files.remove_stale_temporaries(output_dir)
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def faults_explained(outputs: run_files.RunOutputs):
    """Faults met while running end the program with one line and a non-zero exit code, never a traceback.
    None of them costs more than the epoch in progress (with --checkpoint_steps, more than the steps since the
    last mid-epoch checkpoint): the per-epoch outputs are only written at epoch ends."""
    try:
        yield
    except train_eval.TrainingStopped as stop:
        raise RunEnded(f"{stop}; {_resume_hint(outputs, stop.saved)}", stop.exit_code) from stop
    except KeyboardInterrupt:
        raise RunEnded(f"interrupted; {_resume_hint(outputs)}", 130) from None
    except train_eval.NonFiniteLoss as fault:
        raise RunEnded(f"error: {fault}; best.pt and last.pt keep the last good epoch (try a lower --lr, "
                       "--clip_grad_norm or no --use_amp)", RUNTIME_FAULT) from fault
    except run_files.OutputWriteError as fault:
        raise RunEnded(f"error: --output_dir: {fault.strerror}; earlier versions of the files are intact, "
                       "free some space and continue with --resume auto", RUNTIME_FAULT) from fault
    except dataset.DatasetUnavailableError as error:  # an unreadable image met while training
        raise UsageError(_last_line(error)) from error


def _resume_hint(outputs: run_files.RunOutputs, saved: Optional[str] = None) -> str:
    """What the stop line says is kept; ``saved``: the part of the epoch in progress that last.pt holds."""
    if saved is not None:
        return f"last.pt holds the completed epochs and {saved}: continue with --resume auto, which goes on from there"
    if os.path.isfile(outputs.path("last.pt")):
        return "last.pt and the results hold the completed epochs: continue with --resume auto"
    return "no epoch was completed, so there is nothing to resume"


def _last_line(error: Exception) -> str:
    # A DataLoader worker's error comes back with the worker's traceback in its message; the cause is its
    # last line, after the exception's qualified name.
    line = str(error).strip().splitlines()[-1]
    return line.split(": ", 1)[1] if "Original Traceback" in str(error) and ": " in line else line


def _load_data(args: argparse.Namespace, need_train: bool):
    try:  # a download (CIFAR) is made by one process while the others wait
        return distributed.rank_zero_first(lambda: dataset.load_datasets(**data_config(args), need_train=need_train))
    except dataset.DatasetUnavailableError as error:
        raise UsageError(str(error)) from error


def data_config(args: argparse.Namespace) -> Dict:
    return dict(dataset=args.dataset, data_path=args.data_path, resize=args.resize, augment=args.augment,
                auto_augment=args.auto_augment, augment_magnitude=args.augment_magnitude,
                random_erasing=args.random_erasing)


def loader_config(args: argparse.Namespace, device: torch.device) -> Dict:
    on_device = None
    if args.data_loader == "device":
        on_device = dict(dataset=args.dataset, resize=args.resize, augment=args.augment,
                         random_erasing=args.random_erasing)
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, on_device=on_device)
