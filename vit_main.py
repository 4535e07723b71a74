"""Command-line entry point: train or evaluate a ViT whose token mixer is chosen by ``--layer``.

This module parses, validates and dispatches; the runs themselves are in ``runs``. Configuration
flows one way: command line -> ``argparse.Namespace`` -> plain keyword dictionaries (``model_config``,
``trainer_config``) -> constructors. Everything that can be checked without the data is checked first,
and each problem ends the program with one line naming the flag (exit code 2).
"""

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

import dataset
import distributed
import run_files
import runs
import train_eval
import utils
from models.vit import ViT
from models.layer_options import LAYER_OPTIONS
from models.vit_layers import LAYER_REGISTRY, options_from
from runs import FRESH_MODEL, MODEL_FLAGS, UsageError, continues_in_place, resume_path

COMPILE_MODES = ["default", "reduce-overhead", "reduce-memory", "max-autotune"]
# Integer flags must fit the 64-bit sizes of torch and Python's slicing.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


_TRUE_WORDS = {"true", "t", "yes", "y", "1"}
_FALSE_WORDS = {"false", "f", "no", "n", "0"}


def str2bool(value) -> bool:
    """Reads a boolean written as a word, so both ``--flag False`` and ``--flag true`` work."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _boolean(parser_group, flag: str, default: bool, help_text: str) -> None:
    # nargs="?" with const=True: a bare ``--flag`` means True, ``--flag False`` is read as a word.
    parser_group.add_argument(flag, type=str2bool, nargs="?", const=True, default=default,
                              metavar="{True,False}", help=help_text)


def _add_layer_options(parser_group, names: List[str]) -> None:
    for option in map(LAYER_OPTIONS.get, names):
        if option.type is bool:
            _boolean(parser_group, f"--{option.name}", option.default, option.help)
        else:
            parser_group.add_argument(f"--{option.name}", type=option.type, default=option.default,
                                      choices=option.choices, help=option.help)


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        description="Train and evaluate Vision Transformers with ConvNN-Attention and other token mixers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and layer")
    model.add_argument("--layer", default="Attention", choices=list(LAYER_REGISTRY), help="token-mixing layer of every block")
    model.add_argument("--patch_size", type=int, default=16, help="side of the square patches")
    model.add_argument("--num_layers", type=int, default=12, help="number of encoder blocks")
    model.add_argument("--num_heads", type=int, default=3, help="attention heads (ConvNNAttention uses one)")
    model.add_argument("--d_hidden", type=int, default=192, help="token width")
    model.add_argument("--d_mlp", type=int, default=768, help="hidden width of the MLP")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout of the residual branches and MLP")
    model.add_argument("--attention_dropout", type=float, default=0.1, help="dropout inside the token mixer")
    model.add_argument("--drop_path", type=float, default=0.0,
                       help="stochastic depth of the residual branches, rising linearly over the blocks to this "
                            "rate; 0 disables")

    convnn_options = LAYER_REGISTRY["ConvNNAttention"].options
    _add_layer_options(parser.add_argument_group("ConvNN-Attention"),
                       [name for name in LAYER_OPTIONS if name in convnn_options])
    _add_layer_options(parser.add_argument_group("other layers"),
                       [name for name in LAYER_OPTIONS if name not in convnn_options])

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="cifar10", choices=list(dataset.DATASETS), help="dataset")
    data.add_argument("--data_path", default="./Data", help="dataset directory")
    data.add_argument("--resize", type=int, default=224, help="resize images to N x N; 0 keeps the native size")
    data.add_argument("--augment", action="store_true",
                      help="random crop (padding 4) and horizontal flip; imagenet: random resized crop and flip")
    data.add_argument("--auto_augment", default="none", choices=list(dataset.AUTO_AUGMENTS),
                      help="automatic augmentation policy of the training images (autoaugment: the dataset's policy)")
    data.add_argument("--augment_magnitude", type=int, default=dataset.DEFAULT_AUGMENT_MAGNITUDE,
                      help=f"RandAugment's magnitude, 0 to {dataset.RANDAUGMENT_BINS - 1}")
    data.add_argument("--random_erasing", type=float, default=0.0,
                      help="probability of erasing a random rectangle of a normalised training image")
    data.add_argument("--num_workers", type=int, default=4, help="data-loading processes")
    data.add_argument("--data_loader", default="workers", choices=["workers", "device"],
                      help="workers: torchvision loader in worker processes; device: images held on --device "
                           "and transformed there per batch (cifar10, cifar100, synthetic)")
    data.add_argument("--val_split", type=float, default=0.0, metavar="F",
                      help="hold out this fraction of each class of the training split for validation, which "
                           "then chooses best.pt and drives --scheduler plateau; 0 = no validation split")
    data.add_argument("--split_seed", type=int, default=0,
                      help="seed of the --val_split hold-out alone (not --seed), so runs of every --seed and "
                           "--layer hold out the same images")

    training = parser.add_argument_group("training")
    training.add_argument("--batch_size", type=int, default=256, help="batch size of training and evaluation, per process under torchrun")
    training.add_argument("--num_epochs", type=int, default=150, help="number of epochs")
    training.add_argument("--use_amp", action="store_true", help="mixed precision")
    training.add_argument("--use_compiled", action="store_true", help="compile the model with torch.compile")
    training.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                          help="torch.compile mode; reduce-memory = default mode + activation checkpointing")
    training.add_argument("--clip_grad_norm", type=float, default=1.0, help="gradient-norm limit; 0 disables")
    training.add_argument("--amp_dtype", default="float16", choices=list(train_eval.AMP_DTYPES),
                          help="--use_amp on CUDA: float16 (with gradient scaling) or bfloat16 (without)")
    training.add_argument("--accumulation_steps", type=int, default=1,
                          help="batches whose gradients are summed into one optimiser step (one large batch's)")

    training.add_argument("--checkpoint_steps", type=int, default=0, help="also write last.pt every N optimiser steps, with the position in the epoch; 0 = once per epoch")
    training.add_argument("--deterministic", action="store_true", help="deterministic algorithms only (torch.use_deterministic_algorithms), cuDNN benchmarking off")
    recipe = parser.add_argument_group("training recipe (all off by default)")
    recipe.add_argument("--warmup_epochs", type=float, default=0.0,
                        help="linear warmup of the learning rate over this many epochs, moved every step")
    recipe.add_argument("--label_smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    recipe.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha; 0 disables")
    recipe.add_argument("--cutmix", type=float, default=0.0,
                        help="CutMix alpha; 0 disables (with --mixup, each batch uses one of them)")
    recipe.add_argument("--ema_decay", type=float, default=0.0,
                        help="decay of an exponential moving average of the weights, also evaluated; 0 disables")
    _boolean(recipe, "--no_decay_norm_bias", False,
             "no weight decay on biases, normalisation weights and the class token")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--criterion", default="CrossEntropy", choices=list(train_eval.LOSSES), help="loss")
    optimisation.add_argument("--optimizer", default="adamw", choices=list(train_eval.OPTIMIZERS), help="optimiser")
    optimisation.add_argument("--lr", type=float, default=1e-4, help="initial learning rate")
    optimisation.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay")
    optimisation.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optimisation.add_argument("--scheduler", default="none", choices=list(train_eval.SCHEDULERS),
                              help="learning-rate schedule (plateau watches the validation loss with --val_split, "
                                   "else the test loss)")
    optimisation.add_argument("--lr_step", type=int, default=20, help="step scheduler: epochs between decays")
    optimisation.add_argument("--lr_gamma", type=float, default=0.1, help="step scheduler: decay factor")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="cuda", choices=["cpu", "cuda", "mps"], help="device")
    system.add_argument("--seed", type=int, default=0, help="seed of every random generator")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="./Output/VGG/ConvNN", help="directory of results and checkpoints")
    output.add_argument("--test_only", action="store_true", help="only evaluate the test split")
    output.add_argument("--checkpoint", default=None, metavar="PATH|none",
                        help="weights for --test_only (default: <output_dir>/best.pt); none = a freshly "
                             "initialised model")
    output.add_argument("--test_weights", default="model", choices=["model", "ema"],
                        help="--test_only: evaluate the trained weights or their moving average (--ema_decay)")
    output.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue training from a last.pt; auto = <output_dir>/last.pt if present")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output_dir (otherwise such a directory is refused)")
    output.add_argument("--config", default=None, metavar="FILE",
                        help="read flags from FILE, 'name: value' lines as in a run's args.txt; flags on the "
                             "command line win")
    return parser


# ---------------------------------------------------------------------------------------------
# Config files (--config)
# ---------------------------------------------------------------------------------------------

# Keys of a config file that act on one command rather than set up a run: a run's args.txt holds them
# (--overwrite, --resume auto), and applying them again would replace or continue a run unasked.
CONFIG_IGNORED_KEYS = ("test_only", "checkpoint", "resume", "overwrite", "config")


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
        values, lines = read_config(args.config)
    except ConfigError as error:
        parser.error(str(error))
    parser.set_defaults(**values)
    places = {name: f"{args.config} line {lines[name]}" for name in values if name not in given}
    return parser.parse_args(argv), given | set(values), places


def read_config(path: str) -> Tuple[Dict[str, object], Dict[str, int]]:
    """The values of a config file, and the line of each. The file holds ``name: value`` lines (a run's
    args.txt is one), ``#`` comment lines and blank lines. Each value is read by the parser, with the command
    line's types, choices and checks; ``None`` is accepted where it is the default. CONFIG_IGNORED_KEYS are
    skipped, with a warning when set."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a UTF-8 text file"
        raise ConfigError(f"--config: cannot read {path} ({reason}); give a file of 'name: value' lines") from error
    value_parser = build_parser(_RaisingParser)
    defaults = vars(value_parser.parse_args([]))
    values, first_line = {}, {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        place = f"--config: {path} line {number}"
        name, colon, value = (part.strip() for part in text.partition(":"))
        if not colon or not name:
            raise ConfigError(f"{place}: expected 'name: value', got {text!r}")
        if name not in defaults:
            raise ConfigError(f"{place}: unknown flag {name!r} (python vit_main.py --help lists the flags, "
                              "written here without their --)")
        if name in first_line:
            raise ConfigError(f"{place}: {name} is set twice (first on line {first_line[name]}); keep one")
        first_line[name] = number
        if name in CONFIG_IGNORED_KEYS:
            _warn_ignored(place, name, value, defaults[name])
            continue
        values[name] = _config_value(value_parser, name, value, defaults[name], place)
    return values, first_line


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
    """Every value or combination that cannot work, as one-line messages starting with the flag.
    The model's flags are checked where the model is built (``ViT`` and its layers), before any data."""
    problems = _number_problems(args)
    problems += [f"--{name}: must be >= 1, got {getattr(args, name)}" for name in ("num_epochs", "batch_size")
                 if getattr(args, name) < 1]
    not_negative = ["resize", "num_workers", "clip_grad_norm", "weight_decay", "momentum", "checkpoint_steps"]
    problems += [f"--{name}: must be >= 0, got {getattr(args, name)}" for name in not_negative
                 if getattr(args, name) < 0]
    # Bounds of the layer options, refused whatever --layer is; the layer checks the rest when it is built.
    problems += list(filter(None, (option.problem(getattr(args, name)) for name, option in LAYER_OPTIONS.items())))
    if args.lr <= 0:
        problems.append(f"--lr: must be > 0, got {args.lr}")
    if not 0 <= args.val_split < 1:
        problems.append(f"--val_split: must be >= 0 and < 1 (a fraction of each class), got {args.val_split}")
    if args.split_seed < 0:
        problems.append(f"--split_seed: must be >= 0, got {args.split_seed}")
    if args.scheduler == "step" and args.lr_step < 1:
        problems.append(f"--lr_step: must be >= 1 with --scheduler step, got {args.lr_step}")
    if args.scheduler == "step" and args.lr_gamma <= 0:
        problems.append(f"--lr_gamma: must be > 0 with --scheduler step, got {args.lr_gamma}")
    problems += _recipe_problems(args)
    if args.data_loader == "device" and args.dataset not in dataset.IN_MEMORY_DATASETS:
        problems.append(f"--data_loader: device loading holds the images in memory, which {args.dataset} does "
                        f"not fit; use it with {', '.join(dataset.IN_MEMORY_DATASETS)} or use --data_loader workers")
    problems += _augmentation_problems(args)
    problems += _mode_problems(args)
    device_problem = utils.device_problem(args.device)
    if device_problem:
        problems.append(f"--device: {device_problem}")
    return problems


def _number_problems(args: argparse.Namespace) -> List[str]:
    """Numbers no flag can mean: NaN or infinity (NaN passes every comparison, so a range check lets it
    through to the optimiser, or makes --clip_grad_norm nan mean "off"), integers that overflow the 64-bit
    sizes of torch and Python's slicing, and seeds outside numpy's range."""
    problems = []
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{name}: must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            bound = f"at most {INT64_MAX}" if value > 0 else f"at least {INT64_MIN}"
            problems.append(f"--{name}: {value} does not fit a 64-bit integer; must be {bound}")
    if not 0 <= args.seed <= utils.SEED_MAX:
        problems.append(f"--seed: must be between 0 and {utils.SEED_MAX} (the seeds numpy takes), got {args.seed}")
    return problems


def _augmentation_problems(args: argparse.Namespace) -> List[str]:
    problems = []
    highest_magnitude = dataset.RANDAUGMENT_BINS - 1
    if not 0 <= args.augment_magnitude <= highest_magnitude:
        problems.append(f"--augment_magnitude: must be between 0 and {highest_magnitude} (RandAugment's "
                        f"{dataset.RANDAUGMENT_BINS} magnitude bins), got {args.augment_magnitude}")
    elif args.augment_magnitude != dataset.DEFAULT_AUGMENT_MAGNITUDE and args.auto_augment != "randaugment":
        problems.append("--augment_magnitude: only --auto_augment randaugment takes a magnitude (trivialaugment "
                        "draws its own, autoaugment's policy fixes them); leave it out or use randaugment")
    if not 0 <= args.random_erasing <= 1:
        problems.append(f"--random_erasing: is a probability, must be between 0 and 1, got {args.random_erasing}")
    if args.data_loader == "device" and args.auto_augment != "none":
        # The device path transforms whole batches, and a v2 policy called on a batch draws one set of
        # operations for every image in it; a call per image would be a Python loop of small device operations.
        problems.append(f"--auto_augment: {args.auto_augment} has no per-image device path; use --data_loader "
                        "workers")
    return problems


def _recipe_problems(args: argparse.Namespace) -> List[str]:
    problems = [f"--{name}: must be >= 0, got {getattr(args, name)}" for name in ("warmup_epochs", "mixup", "cutmix")
                if getattr(args, name) < 0]
    problems += [f"--{name}: must be in [0, 1), got {getattr(args, name)}" for name in ("label_smoothing", "ema_decay")
                 if not 0 <= getattr(args, name) < 1]
    if args.accumulation_steps < 1:
        problems.append(f"--accumulation_steps: must be >= 1, got {args.accumulation_steps}")
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
    namespace = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
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
