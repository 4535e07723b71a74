"""Command-line entry point: train or evaluate a ViT whose token mixer is chosen by ``--layer``.

This module parses, validates and dispatches; the runs themselves are in ``runs``. Configuration
flows one way: command line -> ``argparse.Namespace`` -> plain keyword dictionaries (``model_config``,
``trainer_config``) -> constructors. Everything that can be checked without the data is checked first,
and each problem ends the program with one line naming the flag (exit code 2).
"""

import argparse
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

import dataset
import distributed
import run_files
import runs
import settings
import tensorboard_log
import train_eval
import utils
from models.vit import ViT
from models.vit_layers import options_from
from runs import UsageError, continues_in_place, resume_path
from settings import FRESH_MODEL, str2bool

DESCRIPTION = "Train and evaluate Vision Transformers with ConvNN-Attention and other token mixers."

def build_parser(parser_class=settings.CommandLineParser) -> argparse.ArgumentParser:
    """The command line, built from the flags' one declaration (``settings.FLAGS``)."""
    return settings.build_parser(parser_class, DESCRIPTION)


# ---------------------------------------------------------------------------------------------
# Config files (--config)
# ---------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """A config file that cannot be used; the message is one line naming --config, the file and the line."""


class _RaisingParser(argparse.ArgumentParser):
    """Raises instead of exiting, so that a config file's bad value is reported with its file and line."""

    def error(self, message):
        raise ConfigError(message)


def parse_arguments(parser: argparse.ArgumentParser,
                    argv: Optional[List[str]]) -> Tuple[argparse.Namespace, Set[str], Dict[str, str]]:
    """The flags; the names of those set on the command line or in the --config file; and for each value
    that comes from the file, its place there ("FILE line N"). A config file's values take the place of the
    parser's defaults, so that the command line overrides them."""
    args = parser.parse_args(argv)
    given = given_flags(argv)
    if args.config is None:
        return args, given, {}
    try:
        values, lines, facts = read_config(args.config)
    except ConfigError as error:
        parser.error(str(error))
    parser.set_defaults(**values)
    places = {name: f"{args.config} line {lines[name]}" for name in values if name not in given}
    args = parser.parse_args(argv)
    if "batch_size" not in given:
        problem = _global_batch_problem(args.batch_size, facts, args.config, lines)
        if problem:
            parser.error(problem)
    return args, given | set(values), places


def _global_batch_problem(batch_size: int, facts: Dict[str, str], path: str, lines: Dict[str, int]) -> Optional[str]:
    """A run's args.txt used as a config file must train with the global batch that run had: --batch_size is
    per process, so the same file read by another number of processes would change it unseen."""
    if "global_batch" not in facts:
        return None
    try:
        recorded = int(facts["global_batch"])
    except ValueError:
        return f"--config: {path} line {lines['global_batch']}: global_batch must be a whole number of images"
    processes = runs.processes_now()
    if batch_size * processes == recorded:
        return None
    fix = (f"give --batch_size {recorded // processes} for {processes} process(es)" if recorded % processes == 0
           else f"run it in {facts.get('processes', 'its number of')} processes")
    return (f"--batch_size: {path} records a global batch of {recorded} images (line {lines['global_batch']}), "
            f"--batch_size {batch_size} in {processes} process(es) makes {batch_size * processes}; {fix}")


def read_config(path: str) -> Tuple[Dict[str, object], Dict[str, int], Dict[str, str]]:
    """The values of a config file, the line of each, and the facts of a run it records. The file holds
    ``name: value`` lines (a run's args.txt is one), ``#`` comment lines and blank lines, in UTF-8 with or
    without a byte-order mark. Each value is read by the parser, with the command line's types, choices and
    checks; ``None`` is accepted where it is the default. Flags that act on one command are skipped, with a
    warning when set; a run's facts (settings.FACTS) are returned as written, for the caller to check."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a UTF-8 text file"
        raise ConfigError(f"--config: cannot read {path} ({reason}); give a file of 'name: value' lines") from error
    value_parser = build_parser(_RaisingParser)
    defaults = settings.defaults()
    values, first_line, facts = {}, {}, {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        place = f"--config: {path} line {number}"
        name, colon, value = (part.strip() for part in text.partition(":"))
        if not colon or not name:
            raise ConfigError(f"{place}: expected 'name: value', got {text!r}")
        if name not in defaults and name not in settings.FACTS:
            raise ConfigError(f"{place}: unknown flag {name!r} (python vit_main.py --help lists the flags, "
                              "written here without their --)")
        if name in first_line:
            raise ConfigError(f"{place}: {name} is set twice (first on line {first_line[name]}); keep one")
        first_line[name] = number
        if name in settings.FACTS:
            facts[name] = value
        elif not settings.FLAGS[name].role.read_from_config:
            _warn_ignored(place, name, value, defaults[name])
        else:
            values[name] = _config_value(value_parser, name, value, defaults[name], place)
    return values, first_line, facts


def _config_value(value_parser: argparse.ArgumentParser, name: str, value: str, default, place: str):
    if value == "None" and default is None:
        return None
    if isinstance(default, bool):  # switches and True/False flags alike
        try:
            return str2bool(value)
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"{place}: argument --{name}: {error}") from error
    try:
        return getattr(value_parser.parse_args([f"--{name}={value}"]), name)
    except ConfigError as error:
        raise ConfigError(f"{place}: {error}") from error


def _warn_ignored(place: str, name: str, value: str, default) -> None:
    if value == str(default):
        return
    if name == "config":  # an args.txt names the file its run read, whose values are its other lines
        reason = "a config file does not read another; copy the lines you need"
    else:
        reason = f"--{name} acts on one command: give it on the command line"
    print(f"warning: {place}: {name}: {value} is not applied; {reason}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Checks that need no data
# ---------------------------------------------------------------------------------------------


def argument_problems(args: argparse.Namespace) -> List[str]:
    """Every value or combination that cannot work, as one-line messages starting with the flag: first each
    flag's declared bounds (``settings.FLAGS``), then the combinations. The model's flags are checked further
    where the model is built (``ViT`` and its layers), before any data."""
    problems = settings.bound_problems(vars(args))
    if args.scheduler == "step" and args.lr_step < 1:
        problems.append(f"--lr_step: must be >= 1 with --scheduler step, got {args.lr_step}")
    if args.scheduler == "step" and args.lr_gamma <= 0:
        problems.append(f"--lr_gamma: must be > 0 with --scheduler step, got {args.lr_gamma}")
    problems += _recipe_problems(args)
    if args.data_loader == "device" and args.dataset not in dataset.IN_MEMORY_DATASETS:
        problems.append(f"--data_loader: device loading holds the images in memory, which {args.dataset} does "
                        f"not fit; use it with {', '.join(dataset.IN_MEMORY_DATASETS)} or use --data_loader workers")
    problems += _augmentation_problems(args)
    tensorboard_problem = tensorboard_log.tensorboard_problem() if args.tensorboard and not args.test_only else None
    if tensorboard_problem:
        problems.append(f"--tensorboard: {tensorboard_problem}")
    problems += _mode_problems(args)
    device_problem = utils.device_problem(args.device)
    if device_problem:
        problems.append(f"--device: {device_problem}")
    return problems


def _augmentation_problems(args: argparse.Namespace) -> List[str]:
    problems = []
    if args.augment_magnitude != dataset.DEFAULT_AUGMENT_MAGNITUDE and args.auto_augment != "randaugment":
        problems.append("--augment_magnitude: only --auto_augment randaugment takes a magnitude (trivialaugment "
                        "draws its own, autoaugment's policy fixes them); leave it out or use randaugment")
    if args.data_loader == "device" and args.auto_augment != "none":
        # The device path transforms whole batches, and a v2 policy called on a batch draws one set of
        # operations for every image in it; a call per image would be a Python loop of small device operations.
        problems.append(f"--auto_augment: {args.auto_augment} has no per-image device path; use --data_loader "
                        "workers")
    return problems


def _recipe_problems(args: argparse.Namespace) -> List[str]:
    problems = []
    if args.warmup_epochs >= args.num_epochs:
        problems.append(f"--warmup_epochs: must be below --num_epochs ({args.num_epochs}), got {args.warmup_epochs}")
    if args.label_smoothing > 0 and args.criterion != "CrossEntropy":
        problems.append(f"--label_smoothing: smooths the cross-entropy's targets; use it with --criterion "
                        f"CrossEntropy, not {args.criterion}")
    if args.amp_dtype != "float16" and not args.use_amp:
        problems.append(f"--amp_dtype: {args.amp_dtype} has no effect without --use_amp; add --use_amp or leave it out")
    return problems


def _mode_problems(args: argparse.Namespace) -> List[str]:
    problems = []
    if args.test_only and args.resume:
        problems.append("--resume: cannot be combined with --test_only (use --checkpoint to choose the weights)")
    if args.checkpoint and not args.test_only:
        problems.append("--checkpoint: only used with --test_only (use --resume to continue training)")
    if args.checkpoint and args.checkpoint != FRESH_MODEL and not os.path.isfile(args.checkpoint):
        problems.append(f"--checkpoint: no file {args.checkpoint}")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        problems.append(f"--resume: no file {args.resume} (use --resume auto to start fresh when absent)")
    if args.test_weights != "model" and not args.test_only:
        problems.append("--test_weights: only used with --test_only (training evaluates both weight sets itself)")
    if args.overwrite and args.test_only:
        problems.append("--overwrite: only for training, not with --test_only")
    elif args.overwrite and args.resume and continues_in_place(args):
        problems.append("--overwrite: would remove the run that --resume continues; it only goes with a fresh run "
                        "or a --resume PATH outside --output_dir")
    return problems


def earlier_run_problem(args: argparse.Namespace) -> Optional[str]:
    """A training run must not write beside a live one, nor silently replace an earlier run: neither a fresh
    run nor one that continues, in this directory, a checkpoint from elsewhere."""
    if args.test_only:
        return None
    owner = run_files.live_lock_owner(args.output_dir)
    if owner is not None:
        return f"--output_dir: {run_files.in_use_message(os.path.join(args.output_dir, run_files.LOCK_NAME), owner)}"
    best = os.path.join(args.output_dir, "best.pt")
    if args.resume == "auto" and resume_path(args) is None and os.path.isfile(best):
        # Starting afresh would replace best.pt, the one checkpoint left of that run.
        return (f"--resume: {args.output_dir} has a best.pt but no last.pt; continue from it with "
                f"--resume {best} or replace it with --overwrite")
    if args.overwrite or (args.resume and continues_in_place(args)):
        return None
    found = run_files.earlier_run_files(args.output_dir)
    if not found:
        return None
    if args.resume:
        return (f"--resume: {args.resume} is not in --output_dir {args.output_dir}, which holds another run "
                f"({', '.join(found)}); continue it in another --output_dir or replace that run with --overwrite")
    return (f"--output_dir: {args.output_dir} holds an earlier run ({', '.join(found)}); "
            "continue it with --resume auto or replace it with --overwrite")


def given_flags(argv: Optional[List[str]]) -> Set[str]:
    """The flags written on the command line: a flag left at its default was not given."""
    parser = build_parser()
    # argparse fills in a default only for a name the namespace lacks: names still holding the marker were not given.
    unset = object()
    namespace = argparse.Namespace(**{name: unset for name in settings.FLAGS})
    return {name for name, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


# ---------------------------------------------------------------------------------------------
# Plain configuration handed to the constructors
# ---------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, img_size: int, num_classes: int) -> Dict:
    return dict(
        img_size=img_size, num_classes=num_classes, layer=args.layer,
        layer_options=options_from(args.layer, vars(args)), patch_size=args.patch_size,
        num_layers=args.num_layers, num_heads=args.num_heads, d_hidden=args.d_hidden, d_mlp=args.d_mlp,
        dropout=args.dropout, attention_dropout=args.attention_dropout, drop_path=args.drop_path,
    )


def build_model(args: argparse.Namespace, img_size: int, num_classes: int) -> Tuple[ViT, str]:
    """The model, and the torch.compile mode that runs --compile_mode. reduce-memory is this project's
    mode, not torch.compile's: the model recomputes every block's activations in the backward pass
    instead of storing them, and is compiled in the default mode."""
    model = ViT(**model_config(args, img_size, num_classes))
    if args.use_compiled and args.compile_mode == "reduce-memory":
        model.set_activation_checkpointing(True)
        return model, "default"
    return model, args.compile_mode


def trainer_config(args: argparse.Namespace) -> Dict:
    return dict(
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        scheduler=args.scheduler, lr_step=args.lr_step, lr_gamma=args.lr_gamma, num_epochs=args.num_epochs,
        criterion=args.criterion, clip_grad_norm=args.clip_grad_norm, use_amp=args.use_amp,
        use_compiled=args.use_compiled, compile_mode=args.compile_mode, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix, ema_decay=args.ema_decay,
        no_decay_norm_bias=args.no_decay_norm_bias, accumulation_steps=args.accumulation_steps,
        amp_dtype=args.amp_dtype,
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args, given, config_places = parse_arguments(parser, argv)
    try:
        dispatch(args, given, config_places)
    except UsageError as error:
        parser.error(str(error))
    except runs.RunEnded as end:
        print(f"{parser.prog}: {end}", file=sys.stderr, flush=True)
        sys.exit(end.exit_code)


def dispatch(args: argparse.Namespace, given: Set[str], config_places: Optional[Dict[str, str]] = None) -> None:
    """Checks what can be checked before the data is read, builds the model, and starts the run: the
    evaluation of a checkpoint with --test_only, training otherwise. ``given``: the flags set on the command
    line or in the --config file, which a checkpoint's stored values do not replace; ``config_places``: where
    in the --config file each value it set is, named in the error when that value is refused."""
    # Stored absolute: a resume or evaluation started from another directory must read the same data, not
    # whatever the relative path names there.
    args.data_path = os.path.abspath(args.data_path)
    mode_problems = _mode_problems(args)  # first: the settings below come from the files these name
    if mode_problems:
        raise UsageError(mode_problems[0])
    resumed, evaluated = None, None
    if args.test_only:
        args, evaluated = runs.evaluation_settings(args, given)
        runs.check_evaluated_weights(args, evaluated)
    elif resume_path(args):
        args, resumed = runs.resume_settings(args, given, resume_path(args))
    problems = argument_problems(args)
    if problems:
        raise UsageError(_with_config_place(problems[0], config_places or {}))
    directory_problem = run_files.directory_problem(args.output_dir)
    if directory_problem and args.test_only:
        raise UsageError(f"--output_dir: {directory_problem}; --test_only writes test_results.txt there: give a "
                         f"writable --output_dir (and the weights with --checkpoint "
                         f"{evaluated[0] if evaluated else FRESH_MODEL})")
    if directory_problem:
        raise UsageError(f"--output_dir: {directory_problem}")
    if not args.use_compiled and args.compile_mode != "default":
        print("warning: --compile_mode has no effect without --use_compiled", file=sys.stderr)

    train_eval.configure_determinism(args.deterministic)  # before CUDA starts: cuBLAS reads its setting then
    # Seeding comes before the model is built, so that the initial weights follow --seed.
    utils.seed_everything(args.seed)
    try:
        device = distributed.setup(args.device)  # under torchrun it also joins the process group
        dataset.check_data_path(args.dataset, args.data_path)
        img_size = dataset.image_size(args.dataset, args.resize)
        num_classes = dataset.num_classes(args.dataset, args.data_path, need_train=not args.test_only)
        model, compile_mode = build_model(args, img_size, num_classes)
    except (ValueError, dataset.DatasetUnavailableError) as error:
        raise UsageError(str(error)) from error
    if resumed:
        runs.check_weights_fit("--resume", resumed.path, resumed.checkpoint, model)
    if evaluated:
        runs.check_weights_fit("--checkpoint", *evaluated, model)
    run_problem = earlier_run_problem(args)  # after the model flags: those errors say more
    if run_problem:
        raise UsageError(run_problem)
    trainer_options = {**trainer_config(args), "compile_mode": compile_mode, "model": model, "device": device,
                       "num_classes": num_classes}
    if args.test_only:
        runs.evaluate(args, trainer_options, evaluated)
    else:
        runs.train(args, trainer_options, img_size, resumed)


def _with_config_place(problem: str, config_places: Dict[str, str]) -> str:
    flag = problem.split(":", 1)[0].lstrip("-")
    return f"{problem} (set in --config {config_places[flag]})" if flag in config_places else problem


if __name__ == "__main__":
    main()
