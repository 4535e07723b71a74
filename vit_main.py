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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    convnn_options = LAYER_REGISTRY["ConvNNAttention"].options
    _add_layer_options(parser.add_argument_group("ConvNN-Attention"),
                       [name for name in LAYER_OPTIONS if name in convnn_options])
    _add_layer_options(parser.add_argument_group("other layers"),
                       [name for name in LAYER_OPTIONS if name not in convnn_options])

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="cifar10", choices=list(dataset.DATASETS), help="dataset")
    data.add_argument("--data_path", default="./Data", help="dataset directory")
    data.add_argument("--resize", type=int, default=224, help="resize images to N x N; 0 keeps the native size")
    data.add_argument("--augment", action="store_true", help="random crop (padding 4) and horizontal flip")
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
    output.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue training from a last.pt; auto = <output_dir>/last.pt if present")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output_dir (otherwise such a directory is refused)")
    return parser


# ---------------------------------------------------------------------------------------------
# Checks that need no data
# ---------------------------------------------------------------------------------------------


def argument_problems(args: argparse.Namespace) -> List[str]:
    """Every value or combination that cannot work, as one-line messages starting with the flag.
    The model's flags are checked where the model is built (``ViT`` and its layers), before any data."""
    problems = _number_problems(args)
    problems += [f"--{name}: must be >= 1, got {getattr(args, name)}" for name in ("num_epochs", "batch_size")
                 if getattr(args, name) < 1]
    not_negative = ["resize", "num_workers", "clip_grad_norm", "weight_decay", "momentum"]
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
    if args.data_loader == "device" and args.dataset not in dataset.IN_MEMORY_DATASETS:
        problems.append(f"--data_loader: device loading holds the images in memory, which {args.dataset} does "
                        f"not fit; use it with {', '.join(dataset.IN_MEMORY_DATASETS)} or use --data_loader workers")
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
        dropout=args.dropout, attention_dropout=args.attention_dropout,
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
        use_compiled=args.use_compiled, compile_mode=args.compile_mode,
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dispatch(args, argv)
    except UsageError as error:
        parser.error(str(error))
    except runs.RunEnded as end:
        print(f"{parser.prog}: {end}", file=sys.stderr, flush=True)
        sys.exit(end.exit_code)


def dispatch(args: argparse.Namespace, argv: Optional[List[str]]) -> None:
    """Checks what can be checked before the data is read, builds the model, and starts the run: the
    evaluation of a checkpoint with --test_only, training otherwise."""
    # Stored absolute: a resume or evaluation started from another directory must read the same data, not
    # whatever the relative path names there.
    args.data_path = os.path.abspath(args.data_path)
    mode_problems = _mode_problems(args)  # first: the settings below come from the files these name
    if mode_problems:
        raise UsageError(mode_problems[0])
    resumed, evaluated = None, None
    if args.test_only:
        args, evaluated = runs.evaluation_settings(args, given_flags(argv))
    elif resume_path(args):
        args, resumed = runs.resume_settings(args, given_flags(argv), resume_path(args))
    problems = argument_problems(args)
    if problems:
        raise UsageError(problems[0])
    directory_problem = run_files.directory_problem(args.output_dir)
    if directory_problem and args.test_only:
        raise UsageError(f"--output_dir: {directory_problem}; --test_only writes test_results.txt there: give a "
                         f"writable --output_dir (and the weights with --checkpoint "
                         f"{evaluated[0] if evaluated else FRESH_MODEL})")
    if directory_problem:
        raise UsageError(f"--output_dir: {directory_problem}")
    if not args.use_compiled and args.compile_mode != "default":
        print("warning: --compile_mode has no effect without --use_compiled", file=sys.stderr)

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


if __name__ == "__main__":
    main()
