"""Command-line entry point: train or evaluate a ViT whose token mixer is chosen by ``--layer``.

Configuration flows one way: command line -> ``argparse.Namespace`` -> plain keyword dictionaries
(``model_config``, ``trainer_config``) -> constructors. Everything that can be checked without the
data is checked first, and each problem ends the program with one line naming the flag (exit code 2).
"""

import argparse
import contextlib
import datetime
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

import checkpoints
import dataset
import distributed
import run_files
import train_eval
import utils
from models.vit import ViT
from models.vit_layers import LAYER_REGISTRY

COMPILE_MODES = ["default", "reduce-overhead", "reduce-memory", "max-autotune"]
# What a checkpoint that is damaged, not a checkpoint, or of another architecture raises on loading.
CHECKPOINT_ERRORS = (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError)
# What a training checkpoint (last.pt, best.pt) holds beyond a bare state dict; --resume needs all of it.
TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "rng")
# Integer flags must fit the 64-bit sizes of torch and Python's slicing.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Exit code of faults found while running (bad input found before is 2; signals give 128 + their number).
RUNTIME_FAULT = 1
# --checkpoint none: evaluate a freshly initialised model, which is never done unasked.
FRESH_MODEL = "none"

# The flags that build the model (the keyword arguments of ViT besides the image size and class count).
MODEL_FLAGS = (
    "layer", "patch_size", "num_layers", "num_heads", "d_hidden", "d_mlp", "dropout", "attention_dropout", "K",
    "kernel_size", "sampling_type", "num_samples", "sample_padding", "magnitude_type", "coordinate_encoding",
    "convolution_type", "softmax_topk_val", "similarity_type", "aggregation_type", "branch_ratio", "sparse_mode",
    "sparse_context_window", "local_window",
)
# What a checkpoint's weights mean: --test_only takes these from the checkpoint and refuses other values.
EVALUATED_FLAGS = MODEL_FLAGS + ("dataset", "resize")
# Flags of one invocation rather than settings of a run: never taken from a checkpoint.
INVOCATION_FLAGS = ("output_dir", "test_only", "checkpoint", "resume", "overwrite")
# Settings a resumed run may change: how long it trains, and where and how fast it runs, not what it computes.
# Each change is recorded (args_changes.txt). --batch_size may change too when the global batch stays the same.
RESUMABLE_FLAGS = ("num_epochs", "device", "num_workers", "data_path", "data_loader", "use_compiled", "compile_mode")


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

    convnn = parser.add_argument_group("ConvNN-Attention")
    convnn.add_argument("--convolution_type", default="depthwise",
                        choices=["standard", "depthwise", "depthwise-separable"], help="aggregation convolution")
    _boolean(convnn, "--softmax_topk_val", True, "softmax over the K neighbour similarities")
    convnn.add_argument("--K", type=int, default=9, help="neighbours per token (kernel of the aggregation)")
    convnn.add_argument("--sampling_type", default="all", choices=["all", "random", "spatial"],
                        help="which tokens are neighbour candidates")
    convnn.add_argument("--num_samples", type=int, default=-1,
                        help="random: number of candidates; spatial: side n of the n x n grid; -1 with all")
    convnn.add_argument("--sample_padding", type=int, default=0, help="border skipped by the spatial grid")
    convnn.add_argument("--magnitude_type", default="matmul", choices=["cosine", "euclidean", "matmul"],
                        help="similarity between a query and the candidates' keys")
    _boolean(convnn, "--coordinate_encoding", False, "append each token's position as an extra channel")
    convnn.add_argument("--similarity_type", default="Col", choices=["Col", "Loc", "Loc_Col"],
                        help="neighbours by features (Col), position (Loc) or both")
    convnn.add_argument("--aggregation_type", default="Col", choices=["Col", "Loc_Col"],
                        help="Loc_Col appends the position channel to the aggregated values")

    other = parser.add_argument_group("other layers")
    other.add_argument("--kernel_size", type=int, default=9, help="kernel of the Conv1d layer")
    other.add_argument("--branch_ratio", type=float, default=0.5,
                       help="share of channels in the ConvNN branch of BranchConv / BranchAttention")
    other.add_argument("--sparse_mode", default="all", choices=["all", "local", "strided"],
                       help="SparseAttention mask")
    other.add_argument("--sparse_context_window", type=int, default=128, help="SparseAttention window c")
    other.add_argument("--local_window", type=int, default=128, help="LocalAttention window")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="cifar10", choices=list(dataset.DATASETS), help="dataset")
    data.add_argument("--data_path", default="./Data", help="dataset directory")
    data.add_argument("--resize", type=int, default=224, help="resize images to N x N; 0 keeps the native size")
    data.add_argument("--augment", action="store_true", help="random crop (padding 4) and horizontal flip")
    data.add_argument("--num_workers", type=int, default=4, help="data-loading processes")
    data.add_argument("--data_loader", default="workers", choices=["workers", "device"],
                      help="workers: torchvision loader in worker processes; device: images held on --device "
                           "and transformed there per batch (cifar10, cifar100, synthetic)")

    training = parser.add_argument_group("training")
    training.add_argument("--batch_size", type=int, default=256, help="batch size of training and evaluation, per process under torchrun")
    training.add_argument("--num_epochs", type=int, default=150, help="number of epochs")
    training.add_argument("--use_amp", action="store_true", help="mixed precision")
    training.add_argument("--use_compiled", action="store_true", help="compile the model with torch.compile")
    training.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                          help="torch.compile mode; reduce-memory = default mode + activation checkpointing")
    training.add_argument("--clip_grad_norm", type=float, default=1.0, help="gradient-norm limit; 0 disables")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--criterion", default="CrossEntropy", choices=["CrossEntropy", "MSE"], help="loss")
    optimisation.add_argument("--optimizer", default="adamw", choices=["adam", "sgd", "adamw"], help="optimiser")
    optimisation.add_argument("--lr", type=float, default=1e-4, help="initial learning rate")
    optimisation.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay")
    optimisation.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optimisation.add_argument("--scheduler", default="none", choices=["step", "cosine", "plateau", "none"],
                              help="learning-rate schedule (plateau watches the test loss)")
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
    """Every value or combination that cannot work, as one-line messages starting with the flag."""
    problems = _number_problems(args)
    at_least_one = ["num_epochs", "batch_size", "patch_size", "num_layers", "num_heads", "d_hidden", "d_mlp"]
    problems += [f"--{name}: must be >= 1, got {getattr(args, name)}" for name in at_least_one
                 if getattr(args, name) < 1]
    not_negative = ["resize", "num_workers", "clip_grad_norm", "weight_decay", "momentum", "sample_padding"]
    problems += [f"--{name}: must be >= 0, got {getattr(args, name)}" for name in not_negative
                 if getattr(args, name) < 0]
    if args.lr <= 0:
        problems.append(f"--lr: must be > 0, got {args.lr}")
    for name in ("dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            problems.append(f"--{name}: must be in [0, 1), got {getattr(args, name)}")
    if not 0.0 <= args.branch_ratio <= 1.0:
        problems.append(f"--branch_ratio: must be in [0, 1], got {args.branch_ratio}")
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


def resume_path(args: argparse.Namespace) -> Optional[str]:
    if args.resume == "auto":
        candidate = os.path.join(args.output_dir, "last.pt")
        return candidate if os.path.isfile(candidate) else None
    return args.resume


def continues_in_place(args: argparse.Namespace) -> bool:
    """Whether --resume continues the run of --output_dir (auto, or a checkpoint in that directory)."""
    return args.resume == "auto" or _same_directory(os.path.dirname(os.path.abspath(args.resume)), args.output_dir)


def _same_directory(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


# ---------------------------------------------------------------------------------------------
# Settings taken from the checkpoint that is resumed or evaluated
# ---------------------------------------------------------------------------------------------


def given_flags(argv: Optional[List[str]]) -> Set[str]:
    """The flags written on the command line: a flag left at its default was not given."""
    parser = build_parser()
    # argparse fills in a default only for a name the namespace lacks: names still holding the marker were not given.
    unset = object()
    namespace = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    return {name for name, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


@dataclass
class Resumed:
    """The checkpoint a training run continues, and the record of the run's flags that it carries on."""

    path: str
    checkpoint: Dict
    record: Dict  # the flags in effect, as stored in the checkpoints and written to args.txt
    args_changes: List[Dict]  # every resume that changed a flag (run_files.args_change_line), this one's last


def resume_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, given: Set[str],
                    path: str) -> Tuple[argparse.Namespace, Resumed]:
    """The run's settings are the checkpoint's: a flag given with another value is refused, unless it is
    one a resumed run may change, in which case the change is recorded. Flags not given take the stored
    values, so ``--output_dir RUN --resume auto`` alone continues RUN as it was started."""
    checkpoint = _load_checkpoint(parser, "--resume", path)
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        parser.error(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
                     "resume from a last.pt or best.pt, or evaluate it with --test_only --checkpoint")
    stored = checkpoint.get("args")
    if stored is None:
        print(f"warning: {path} stores no flags (an older version wrote it); resuming with the command line's",
              file=sys.stderr)
        merged, record, values = args, dict(vars(args)), {}
    else:
        _warn_unstored(path, args, stored)
        processes_known = "processes" in checkpoint
        may_change = set(RESUMABLE_FLAGS) | ({"batch_size"} if processes_known else set())
        _refuse_other_values(parser, args, given, stored, set(_settings(args)) - may_change, path,
                             lambda flag: f"a resumed run keeps its settings: leave {flag} out, or start a new "
                                          "run in another --output_dir")
        merged = _with_stored_values(args, given, stored)
        values = {name: [stored[name], getattr(merged, name)] for name in RESUMABLE_FLAGS
                  if name in stored and stored[name] != getattr(merged, name)}
        if processes_known:
            values.update(_batch_changes(parser, merged, stored, checkpoint["processes"], path))
        if "output_dir" in stored and not _same_directory(stored["output_dir"], args.output_dir):
            values["output_dir"] = [stored["output_dir"], args.output_dir]
        record = {**stored, **{name: getattr(merged, name) for name in _settings(args) if name not in stored},
                  **{name: new for name, (_, new) in values.items() if name in stored}}
    epoch = checkpoint["epoch"]
    if merged.num_epochs < epoch or (merged.num_epochs == epoch and "num_epochs" in values):
        parser.error(f"--num_epochs: {path} has trained {epoch} epochs already; give more than {epoch} "
                     "to train it further")
    args_changes = list(checkpoint.get("args_changes", []))
    if values:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        args_changes.append({"after_epoch": epoch, "time": now, "values": values})
    return merged, Resumed(path, checkpoint, record, args_changes)


def _batch_changes(parser: argparse.ArgumentParser, merged: argparse.Namespace, stored: Dict, stored_processes: int,
                   path: str) -> Dict[str, List]:
    """--batch_size is per process: it may change with the number of processes, so that the global
    batch of every optimiser step stays the one the run was trained with."""
    processes = _processes()
    global_batch = stored["batch_size"] * stored_processes
    if merged.batch_size * processes != global_batch:
        fix = (f"give --batch_size {global_batch // processes} for {processes} process(es)"
               if global_batch % processes == 0 else f"resume it with {stored_processes} process(es)")
        parser.error(f"--batch_size: {path} was trained with a global batch of {global_batch} (--batch_size "
                     f"{stored['batch_size']} in each of {stored_processes} process(es)); {fix}")
    changes = {}
    if merged.batch_size != stored["batch_size"]:
        changes["batch_size"] = [stored["batch_size"], merged.batch_size]
    if processes != stored_processes:
        changes["processes"] = [stored_processes, processes]
    return changes


def _processes() -> int:
    # Known before the process group is joined: torchrun's environment, or a single process.
    environment = distributed.torchrun_environment()
    return environment["world_size"] if environment else 1


def evaluation_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        given: Set[str]) -> Tuple[argparse.Namespace, Optional[Tuple[str, Dict]]]:
    """--test_only: the checkpoint to evaluate (None for --checkpoint none) and the settings to build its
    model and test split with, the checkpoint's own: a model or dataset flag given with another value is
    refused. test_results.txt goes to --output_dir, else beside the --checkpoint."""
    path = evaluated_checkpoint_path(parser, args)
    if path is None:
        return args, None
    checkpoint = _load_checkpoint(parser, "--checkpoint", path)
    if args.checkpoint and "output_dir" not in given:
        args = argparse.Namespace(**{**vars(args), "output_dir": os.path.dirname(args.checkpoint) or "."})
    stored = checkpoint.get("args")
    if stored is None:  # a bare state dict: the command line describes its model
        return args, (path, checkpoint)
    _refuse_other_values(parser, args, given, stored, EVALUATED_FLAGS, path,
                         lambda flag: f"leave {flag} out to evaluate it as trained")
    return _with_stored_values(args, given, stored), (path, checkpoint)


def evaluated_checkpoint_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """--checkpoint, else <output_dir>/best.pt; never, unasked, the random weights of a fresh model."""
    if args.checkpoint == FRESH_MODEL:
        return None
    if args.checkpoint:
        return args.checkpoint
    best, last = (os.path.join(args.output_dir, name) for name in ("best.pt", "last.pt"))
    if os.path.isfile(best):
        return best
    if os.path.isfile(last):
        parser.error(f"--checkpoint: {args.output_dir} has a last.pt but no best.pt; evaluate the last epoch "
                     f"with --checkpoint {last}")
    parser.error(f"--checkpoint: no {best} to evaluate; give the weights with --checkpoint PATH (or evaluate a "
                 f"freshly initialised model with --checkpoint {FRESH_MODEL})")


def _settings(args: argparse.Namespace) -> List[str]:
    """The names of the flags that are settings of a run, in the parser's order."""
    return [name for name in vars(args) if name not in INVOCATION_FLAGS]


def _with_stored_values(args: argparse.Namespace, given: Set[str], stored: Dict) -> argparse.Namespace:
    taken = {name: stored[name] for name in _settings(args) if name in stored and name not in given}
    return argparse.Namespace(**{**vars(args), **taken})


def _refuse_other_values(parser: argparse.ArgumentParser, args: argparse.Namespace, given: Set[str],
                         stored: Dict, checked: Iterable[str], path: str, advice) -> None:
    """One line naming the first checked flag given with a value other than the stored one (and the others)."""
    checked = set(checked)
    different = [name for name in _settings(args) if name in checked and name in given and name in stored
                 and getattr(args, name) != stored[name]]
    if not different:
        return
    first, *others = different
    also = f" (and with {', '.join(f'--{name} {stored[name]}' for name in others)})" if others else ""
    parser.error(f"--{first}: {path} was trained with --{first} {stored[first]}, not {getattr(args, first)}{also}; "
                 f"{advice('--' + first)}")


def _warn_unstored(path: str, args: argparse.Namespace, stored: Dict) -> None:
    unstored = [name for name in _settings(args) if name not in stored]
    if unstored:
        print(f"warning: {path} stores no {', '.join('--' + name for name in unstored)} (an older version wrote "
              "it); using the command line's", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Plain configuration handed to the constructors
# ---------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, img_size: int, num_classes: int) -> Dict:
    return dict(img_size=img_size, num_classes=num_classes, **{name: getattr(args, name) for name in MODEL_FLAGS})


def trainer_config(args: argparse.Namespace) -> Dict:
    return dict(
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        scheduler=args.scheduler, lr_step=args.lr_step, lr_gamma=args.lr_gamma, num_epochs=args.num_epochs,
        criterion=args.criterion, clip_grad_norm=args.clip_grad_norm, use_amp=args.use_amp,
        use_compiled=args.use_compiled, compile_mode=args.compile_mode,
    )


def data_config(args: argparse.Namespace) -> Dict:
    return dict(dataset=args.dataset, data_path=args.data_path, resize=args.resize, augment=args.augment)


def loader_config(args: argparse.Namespace, device: torch.device) -> Dict:
    on_device = None
    if args.data_loader == "device":
        on_device = dict(dataset=args.dataset, resize=args.resize, augment=args.augment)
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, on_device=on_device)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode_problems = _mode_problems(args)  # first: the settings below come from the files these name
    if mode_problems:
        parser.error(mode_problems[0])
    resumed, evaluated = None, None
    if args.test_only:
        args, evaluated = evaluation_settings(parser, args, given_flags(argv))
    elif resume_path(args):
        args, resumed = resume_settings(parser, args, given_flags(argv), resume_path(args))
    problems = argument_problems(args)
    if problems:
        parser.error(problems[0])
    directory_problem = run_files.directory_problem(args.output_dir)
    if directory_problem and args.test_only:
        parser.error(f"--output_dir: {directory_problem}; --test_only writes test_results.txt there: give a writable "
                     f"--output_dir (and the weights with --checkpoint {evaluated[0] if evaluated else FRESH_MODEL})")
    if directory_problem:
        parser.error(f"--output_dir: {directory_problem}")
    if not args.use_compiled and args.compile_mode != "default":
        print("warning: --compile_mode has no effect without --use_compiled", file=sys.stderr)

    # Seeding comes before the model is built, so that the initial weights follow --seed.
    utils.seed_everything(args.seed)
    device = _process_device(parser, args.device)
    try:
        dataset.check_data_path(args.dataset, args.data_path)
        img_size = dataset.image_size(args.dataset, args.resize)
        num_classes = dataset.num_classes(args.dataset, args.data_path, need_train=not args.test_only)
        model = ViT(**model_config(args, img_size, num_classes))
    except (ValueError, dataset.DatasetUnavailableError) as error:
        parser.error(str(error))
    if resumed:
        _check_weights_fit(parser, "--resume", resumed.path, resumed.checkpoint, model)
    if evaluated:
        _check_weights_fit(parser, "--checkpoint", *evaluated, model)
    run_problem = earlier_run_problem(args)  # after the model flags: those errors say more
    if run_problem:
        parser.error(run_problem)
    outputs = run_files.RunOutputs(args.output_dir)
    if resumed and _is_finished(args, resumed, outputs):
        print(f"nothing to do: {args.output_dir} finished all {args.num_epochs} epochs; raise --num_epochs to "
              "train it further")
        return
    try:  # after the cheap checks: it may read the whole test split
        dataset.check_data(args.dataset, args.data_path, need_train=not args.test_only)
    except dataset.DatasetUnavailableError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        _exit(f"{parser.prog}: interrupted while checking the data; nothing was written", 130)
    trainer = train_eval.Trainer(model=model, device=device, num_classes=num_classes,
                                 show_progress=train_eval.show_progress_bars() and distributed.is_main_process(),
                                 distributed_replica=distributed.is_distributed(), **trainer_config(args))
    with faults_explained(parser, outputs):
        if args.test_only:
            test_only(parser, args, trainer, outputs, evaluated)  # reads a checkpoint only: allowed beside a live run
        else:
            # Signals are caught from here on, not only in the epoch loop: a SIGTERM during the set-up
            # still ends with the message and exit code (at the first step), a second one at once.
            # Under torchrun rank 0 writes every file, so it alone holds the directory's lock.
            claim = output_directory_claimed(parser, args.output_dir) if distributed.is_main_process() else (
                contextlib.nullcontext())
            with claim, train_eval.StopSignals() as stop_signals:
                trainer.stop_signals = stop_signals
                train(parser, args, trainer, outputs, img_size, resumed)


def _is_finished(args: argparse.Namespace, resumed: Resumed, outputs: run_files.RunOutputs) -> bool:
    """Whether resuming would change nothing: the run holds every epoch and its results say so."""
    return (resumed.checkpoint["epoch"] == args.num_epochs and continues_in_place(args)
            and outputs.hold_finished_run(resumed.checkpoint["history"]))


@contextlib.contextmanager
def output_directory_claimed(parser: argparse.ArgumentParser, output_dir: str):
    """Holds <output_dir>/.lock while training, so that a second run cannot write into the same files."""
    lock = run_files.OutputLock(output_dir)
    try:
        lock.acquire()
    except run_files.LockFileError as error:
        parser.error(f"--output_dir: {error}")
    try:
        run_files.remove_stale_temporaries(output_dir)
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def faults_explained(parser: argparse.ArgumentParser, outputs: run_files.RunOutputs):
    """Faults met while running end the program with one line and a non-zero exit code, never a traceback.
    None of them costs more than the epoch in progress: outputs are only written at epoch ends."""
    try:
        yield
    except train_eval.TrainingStopped as stop:
        _exit(f"{parser.prog}: {stop}; {_resume_hint(outputs)}", stop.exit_code)
    except KeyboardInterrupt:
        _exit(f"{parser.prog}: interrupted; {_resume_hint(outputs)}", 130)
    except train_eval.NonFiniteLoss as fault:
        _exit(f"{parser.prog}: error: {fault}; best.pt and last.pt keep the last good epoch (try a lower --lr, "
              "--clip_grad_norm or no --use_amp)", RUNTIME_FAULT)
    except run_files.OutputWriteError as fault:
        _exit(f"{parser.prog}: error: --output_dir: {fault.strerror}; earlier versions of the files are intact, "
              "free some space and continue with --resume auto", RUNTIME_FAULT)
    except dataset.DatasetUnavailableError as error:  # an unreadable image met while training
        parser.error(_last_line(error))


def _resume_hint(outputs: run_files.RunOutputs) -> str:
    if os.path.isfile(outputs.path("last.pt")):
        return "last.pt and the results hold the completed epochs: continue with --resume auto"
    return "no epoch was completed, so there is nothing to resume"


def _last_line(error: Exception) -> str:
    # A DataLoader worker's error comes back with the worker's traceback in its message; the cause is its
    # last line, after the exception's qualified name.
    line = str(error).strip().splitlines()[-1]
    return line.split(": ", 1)[1] if "Original Traceback" in str(error) and ": " in line else line


def _exit(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _load_checkpoint(parser: argparse.ArgumentParser, flag: str, path: str) -> Dict:
    try:
        return checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as error:
        parser.error(f"{flag}: {error}; give an intact copy (best.pt and last.pt are separate copies)")


def _check_weights_fit(parser: argparse.ArgumentParser, flag: str, path: str, checkpoint: Dict,
                       model: torch.nn.Module) -> None:
    mismatch = checkpoints.state_dict_mismatch(model.state_dict(), checkpoints.model_weights(checkpoint))
    if mismatch:
        parser.error(f"{flag}: {path} is of another model: {mismatch}; pass the model flags it was trained "
                     "with (see its args.txt)")


def _process_device(parser: argparse.ArgumentParser, device_type: str) -> torch.device:
    """This process's device. Under torchrun it also joins the process group, and ranks other than 0
    print nothing on stdout: rank 0 reports for all (warnings and errors still reach stderr)."""
    try:
        device = distributed.setup(device_type)
    except ValueError as error:
        parser.error(str(error))
    if not distributed.is_main_process():
        sys.stdout = open(os.devnull, "w")
    return device


def _load_data(parser: argparse.ArgumentParser, args: argparse.Namespace, need_train: bool):
    try:
        return dataset.load_datasets(**data_config(args), need_train=need_train)
    except dataset.DatasetUnavailableError as error:
        parser.error(str(error))


def test_only(parser: argparse.ArgumentParser, args: argparse.Namespace, trainer: train_eval.Trainer,
              outputs: run_files.RunOutputs, evaluated: Optional[Tuple[str, Dict]]) -> None:
    """Evaluates the test split with the weights of ``evaluated`` (path and checkpoint), or with freshly
    initialised ones when it is None (--checkpoint none). Writes only test_results.txt: the args.txt and
    model.txt of the training run stay as they were."""
    if evaluated:
        checkpoint, weights = evaluated[0], checkpoints.model_weights(evaluated[1])
        try:
            trainer.model.load_state_dict(weights)
        except CHECKPOINT_ERRORS as error:
            parser.error(f"--checkpoint: {checkpoint} does not fit this model (pass the model flags it was "
                         f"trained with, see its args.txt): {run_files.first_line(error)}")
    else:
        checkpoint = "none (freshly initialised model)"
    _, test_data, _, _ = _load_data(parser, args, need_train=False)
    _, test_loader = dataset.make_loaders(None, test_data, **loader_config(args, trainer.device))
    result = trainer.evaluate(test_loader)
    print(f"Checkpoint: {checkpoint}")
    print(run_files.test_line(result.loss, result.top1, result.top5), flush=True)
    if distributed.is_main_process():
        outputs.write_test_results(checkpoint, result.loss, result.top1, result.top5)


def train(parser: argparse.ArgumentParser, args: argparse.Namespace, trainer: train_eval.Trainer,
          outputs: run_files.RunOutputs, img_size: int, resumed: Optional[Resumed]) -> None:
    start_epoch, history, rng_state = 0, [], None
    record, args_changes = vars(args), []
    if resumed:
        try:
            trainer.load_state_dict(resumed.checkpoint)
        except CHECKPOINT_ERRORS as error:
            parser.error(f"--resume: {resumed.path} does not fit this model and optimiser: "
                         f"{run_files.first_line(error)}")
        checkpoint = resumed.checkpoint
        start_epoch, history, rng_state = checkpoint["epoch"], checkpoint["history"], checkpoint["rng"]
        trainer.fit_schedule_to(args.num_epochs, start_epoch)
        record, args_changes = resumed.record, resumed.args_changes
        print(f"Resuming from {resumed.path} after epoch {start_epoch}")

    # The data first: when it cannot be had, the output directory is left as it was.
    train_data, test_data, _, _ = _load_data(parser, args, need_train=True)
    if distributed.is_main_process():
        if args.overwrite:
            run_files.remove_earlier_run(args.output_dir)
        outputs.write_args(record)
        outputs.write_args_changes(args_changes)
        if not resumed or not os.path.isfile(outputs.path("model.txt")):
            outputs.write_model_summary(trainer.model, img_size, trainer.device)
    train_loader, test_loader = dataset.make_loaders(train_data, test_data, **loader_config(args, trainer.device))
    print(f"{args.layer} ViT, {run_files.count_parameters(trainer.model):,} parameters, on {args.device}; "
          f"{args.dataset}: {len(train_data)} training and {len(test_data)} test images of {img_size}x{img_size}",
          flush=True)
    if rng_state is not None:
        # Restored last: the run continues with exactly the generator states it had after start_epoch.
        utils.restore_rng_state(rng_state)
    distributed.decorrelate_ranks(args.seed, start_epoch)
    train_eval.fit(trainer, train_loader, test_loader, outputs=outputs, num_epochs=args.num_epochs,
                   seed=args.seed, run_arguments=record, start_epoch=start_epoch, history=history,
                   args_changes=args_changes)

if __name__ == "__main__":
    main()
