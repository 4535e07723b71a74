"""Every command-line flag of vit_main.py, declared once, and the facts of a run that are not flags.

A flag's declaration holds what the parser needs (type, default, help, group, choices) and its bounds, and
its ``Role``: what it means for a run's result. Everything else follows from the role, in one place
(``Role`` below), and nowhere else is a list of flag names kept:

    role       resume may change it   --test_only refuses another value   decides the result   a config file
    model      no                      yes (taken from the checkpoint)    yes                  sets it
    data       no                      yes (taken from the checkpoint)    yes                  sets it
    training   no                      no (taken from the checkpoint)     yes                  sets it
    length     yes, recorded           no (taken from the checkpoint)     yes                  sets it
    runtime    yes, recorded           no (taken from the checkpoint)     no                   sets it
    output     never stored in a run   no                                 no                   sets it
    command    never stored in a run   no                                 no                   ignores it

"Decides the result" is what separates two runs in ``scripts/summarize.py``'s groups and what ``sweep.sh``
compares before it counts a directory as one of its runs. A flag newer than some runs has the value those
runs had (``older_runs_had``, by default the flag's default: new options are off by default).

Facts (``FACTS``) decide a result too but are no flag: the number of processes a run trained in, the global
batch that follows, and a fingerprint of its data. A run records them in args.txt after its flags.
"""

import argparse
import enum
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import dataset
import train_eval
import utils
from models.layer_options import LAYER_OPTIONS
from models.vit_layers import LAYER_REGISTRY


class Role(enum.Enum):
    MODEL = "builds the model"
    DATA = "selects the data"
    TRAINING = "shapes the training"
    LENGTH = "sets how long it trains"
    RUNTIME = "says where and how fast it runs"
    OUTPUT = "says where one invocation writes, or what it evaluates"
    COMMAND = "acts on one command"

    @property
    def stored(self) -> bool:
        """A setting of the run: kept in its args.txt and checkpoints, taken from them on resume and evaluation."""
        return self not in (Role.OUTPUT, Role.COMMAND)

    @property
    def resumable(self) -> bool:
        """A resumed run may change it (the change is recorded in args_changes.txt)."""
        return self in (Role.LENGTH, Role.RUNTIME)

    @property
    def evaluated(self) -> bool:
        """What a checkpoint's weights mean: --test_only refuses another value than the checkpoint's."""
        return self in (Role.MODEL, Role.DATA)

    @property
    def decides_result(self) -> bool:
        return self in (Role.MODEL, Role.DATA, Role.TRAINING, Role.LENGTH)

    @property
    def read_from_config(self) -> bool:
        """A config file (a run's args.txt) sets it; a command's own actions are never replayed from a file."""
        return self is not Role.COMMAND


_FROM_DEFAULT = object()


@dataclass(frozen=True)
class Flag:
    name: str
    role: Role
    group: str
    help: str
    default: object = None
    type: type = str
    choices: Optional[Sequence] = None
    switch: bool = False  # a bare --flag (store_true); other booleans read a word: --flag True / --flag False
    metavar: Optional[str] = None
    # Bounds: ``at_least``/``above`` below, ``at_most``/``below`` above; ``bounds_note`` says why, in the message.
    at_least: Optional[float] = None
    above: Optional[float] = None
    at_most: Optional[float] = None
    below: Optional[float] = None
    bounds_note: str = ""
    older_runs_had: object = _FROM_DEFAULT

    @property
    def value_of_older_runs(self):
        """The value of runs written before this flag existed."""
        return self.default if self.older_runs_had is _FROM_DEFAULT else self.older_runs_had

    def problem(self, value) -> Optional[str]:
        """The one-line message for a value outside the bounds, else None."""
        if value is None or isinstance(value, (bool, str)):
            return None
        inside = ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                  and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))
        if inside:
            return None
        note = f" {self.bounds_note}" if self.bounds_note else ""
        return f"--{self.name}: must be {self._bounds_text()}{note}, got {value}"

    def _bounds_text(self) -> str:
        low = self.at_least if self.at_least is not None else self.above
        high = self.at_most if self.at_most is not None else self.below
        if high is None:
            return f">= {low}" if self.at_least is not None else f"> {low}"
        if low is None:
            return f"<= {high}" if self.at_most is not None else f"< {high}"
        if self.at_least is not None and self.at_most is not None:
            return f"between {low} and {high}"
        return f"in {'[' if self.at_least is not None else '('}{low}, {high}{']' if self.at_most is not None else ')'}"


# The parser's argument groups, in the order of --help.
MODEL_GROUP, CONVNN_GROUP, OTHER_LAYERS_GROUP = "model and layer", "ConvNN-Attention", "other layers"
DATA_GROUP, TRAINING_GROUP, RECIPE_GROUP = "dataset", "training", "training recipe (all off by default)"
OPTIMISATION_GROUP, SYSTEM_GROUP, OUTPUT_GROUP = "optimisation", "system", "output"

COMPILE_MODES = ("default", "reduce-overhead", "reduce-memory", "max-autotune")
FRESH_MODEL = "none"  # --checkpoint none: evaluate a freshly initialised model, which is never done unasked


def _layer_option_flags() -> List[Flag]:
    convnn_options = LAYER_REGISTRY["ConvNNAttention"].options
    ordered = ([option for name, option in LAYER_OPTIONS.items() if name in convnn_options]
               + [option for name, option in LAYER_OPTIONS.items() if name not in convnn_options])
    return [Flag(option.name, Role.MODEL, CONVNN_GROUP if option.name in convnn_options else OTHER_LAYERS_GROUP,
                 option.help, option.default, option.type, option.choices, at_least=option.minimum,
                 at_most=option.maximum) for option in ordered]


FLAGS: Dict[str, Flag] = {flag.name: flag for flag in (
    Flag("layer", Role.MODEL, MODEL_GROUP, "token-mixing layer of every block", "Attention",
         choices=tuple(LAYER_REGISTRY)),
    Flag("patch_size", Role.MODEL, MODEL_GROUP, "side of the square patches", 16, int),
    Flag("num_layers", Role.MODEL, MODEL_GROUP, "number of encoder blocks", 12, int),
    Flag("num_heads", Role.MODEL, MODEL_GROUP, "attention heads (ConvNNAttention uses one)", 3, int),
    Flag("d_hidden", Role.MODEL, MODEL_GROUP, "token width", 192, int),
    Flag("d_mlp", Role.MODEL, MODEL_GROUP, "hidden width of the MLP", 768, int),
    Flag("dropout", Role.MODEL, MODEL_GROUP, "dropout of the residual branches and MLP", 0.1, float),
    Flag("attention_dropout", Role.MODEL, MODEL_GROUP, "dropout inside the token mixer", 0.1, float),
    Flag("drop_path", Role.MODEL, MODEL_GROUP, "stochastic depth of the residual branches, rising linearly over "
         "the blocks to this rate; 0 disables", 0.0, float),
    *_layer_option_flags(),

    Flag("dataset", Role.DATA, DATA_GROUP, "dataset", "cifar10", choices=tuple(dataset.DATASETS)),
    Flag("data_path", Role.RUNTIME, DATA_GROUP, "dataset directory", "./Data"),
    Flag("resize", Role.DATA, DATA_GROUP, "resize images to N x N; 0 keeps the native size", 224, int, at_least=0),
    Flag("augment", Role.TRAINING, DATA_GROUP, "random crop (padding 4) and horizontal flip; imagenet: random "
         "resized crop and flip", False, bool, switch=True),
    Flag("auto_augment", Role.TRAINING, DATA_GROUP, "automatic augmentation policy of the training images "
         "(autoaugment: the dataset's policy)", "none", choices=tuple(dataset.AUTO_AUGMENTS)),
    Flag("augment_magnitude", Role.TRAINING, DATA_GROUP, f"RandAugment's magnitude, 0 to "
         f"{dataset.RANDAUGMENT_BINS - 1}", dataset.DEFAULT_AUGMENT_MAGNITUDE, int, at_least=0,
         at_most=dataset.RANDAUGMENT_BINS - 1,
         bounds_note=f"(RandAugment's {dataset.RANDAUGMENT_BINS} magnitude bins)"),
    Flag("random_erasing", Role.TRAINING, DATA_GROUP, "probability of erasing a random rectangle of a normalised "
         "training image", 0.0, float, at_least=0, at_most=1, bounds_note="(a probability)"),
    Flag("num_workers", Role.RUNTIME, DATA_GROUP, "data-loading processes", 4, int, at_least=0),
    Flag("data_loader", Role.RUNTIME, DATA_GROUP, "workers: torchvision loader in worker processes; device: images "
         f"held on --device and transformed there per batch ({', '.join(dataset.IN_MEMORY_DATASETS)})", "workers",
         choices=("workers", "device")),
    Flag("val_split", Role.TRAINING, DATA_GROUP, "hold out this fraction of each class of the training split for "
         "validation, which then chooses best.pt and drives --scheduler plateau; 0 = no validation split", 0.0,
         float, metavar="F", at_least=0, below=1, bounds_note="(a fraction of each class)"),
    Flag("split_seed", Role.TRAINING, DATA_GROUP, "seed of the --val_split hold-out alone (not --seed), so runs of "
         "every --seed and --layer hold out the same images", 0, int, at_least=0),

    Flag("batch_size", Role.TRAINING, TRAINING_GROUP, "batch size of training and evaluation, per process under "
         "torchrun", 256, int, at_least=1),
    Flag("num_epochs", Role.LENGTH, TRAINING_GROUP, "number of epochs", 150, int, at_least=1),
    Flag("use_amp", Role.TRAINING, TRAINING_GROUP, "mixed precision", False, bool, switch=True),
    Flag("use_compiled", Role.RUNTIME, TRAINING_GROUP, "compile the model with torch.compile", False, bool,
         switch=True),
    Flag("compile_mode", Role.RUNTIME, TRAINING_GROUP, "torch.compile mode; reduce-memory = default mode + "
         "activation checkpointing", "default", choices=COMPILE_MODES),
    Flag("clip_grad_norm", Role.TRAINING, TRAINING_GROUP, "gradient-norm limit; 0 disables", 1.0, float,
         at_least=0),
    Flag("amp_dtype", Role.TRAINING, TRAINING_GROUP, "--use_amp on CUDA: float16 (with gradient scaling) or "
         "bfloat16 (without)", "float16", choices=tuple(train_eval.AMP_DTYPES)),
    Flag("accumulation_steps", Role.TRAINING, TRAINING_GROUP, "batches whose gradients are summed into one "
         "optimiser step (one large batch's)", 1, int, at_least=1),
    Flag("checkpoint_steps", Role.RUNTIME, TRAINING_GROUP, "also write last.pt every N optimiser steps, with the "
         "position in the epoch; 0 = once per epoch", 0, int, at_least=0),
    Flag("deterministic", Role.RUNTIME, TRAINING_GROUP, "deterministic algorithms only "
         "(torch.use_deterministic_algorithms), cuDNN benchmarking off", False, bool, switch=True),

    Flag("warmup_epochs", Role.TRAINING, RECIPE_GROUP, "linear warmup of the learning rate over this many epochs, "
         "moved every step", 0.0, float, at_least=0),
    Flag("label_smoothing", Role.TRAINING, RECIPE_GROUP, "label smoothing of the cross-entropy", 0.0, float,
         at_least=0, below=1),
    Flag("mixup", Role.TRAINING, RECIPE_GROUP, "MixUp alpha; 0 disables", 0.0, float, at_least=0),
    Flag("cutmix", Role.TRAINING, RECIPE_GROUP, "CutMix alpha; 0 disables (with --mixup, each batch uses one of "
         "them)", 0.0, float, at_least=0),
    Flag("ema_decay", Role.TRAINING, RECIPE_GROUP, "decay of an exponential moving average of the weights, also "
         "evaluated; 0 disables", 0.0, float, at_least=0, below=1),
    Flag("no_decay_norm_bias", Role.TRAINING, RECIPE_GROUP, "no weight decay on biases, normalisation weights and "
         "the class token", False, bool),

    Flag("criterion", Role.TRAINING, OPTIMISATION_GROUP, "loss", "CrossEntropy", choices=tuple(train_eval.LOSSES)),
    Flag("optimizer", Role.TRAINING, OPTIMISATION_GROUP, "optimiser", "adamw", choices=tuple(train_eval.OPTIMIZERS)),
    Flag("lr", Role.TRAINING, OPTIMISATION_GROUP, "initial learning rate", 1e-4, float, above=0),
    Flag("weight_decay", Role.TRAINING, OPTIMISATION_GROUP, "weight decay", 1e-6, float, at_least=0),
    Flag("momentum", Role.TRAINING, OPTIMISATION_GROUP, "SGD momentum", 0.9, float, at_least=0),
    Flag("scheduler", Role.TRAINING, OPTIMISATION_GROUP, "learning-rate schedule (plateau watches the validation "
         "loss with --val_split, else the test loss)", "none", choices=tuple(train_eval.SCHEDULERS)),
    Flag("lr_step", Role.TRAINING, OPTIMISATION_GROUP, "step scheduler: epochs between decays", 20, int),
    Flag("lr_gamma", Role.TRAINING, OPTIMISATION_GROUP, "step scheduler: decay factor", 0.1, float),

    Flag("device", Role.RUNTIME, SYSTEM_GROUP, "device", "cuda", choices=("cpu", "cuda", "mps")),
    Flag("seed", Role.TRAINING, SYSTEM_GROUP, "seed of every random generator", 0, int, at_least=0,
         at_most=utils.SEED_MAX, bounds_note="(the seeds numpy takes)"),

    Flag("output_dir", Role.OUTPUT, OUTPUT_GROUP, "directory of results and checkpoints", "./Output/VGG/ConvNN"),
    Flag("test_only", Role.COMMAND, OUTPUT_GROUP, "only evaluate the test split", False, bool, switch=True),
    Flag("checkpoint", Role.COMMAND, OUTPUT_GROUP, f"weights for --test_only (default: <output_dir>/best.pt); "
         f"{FRESH_MODEL} = a freshly initialised model", metavar=f"PATH|{FRESH_MODEL}"),
    Flag("test_weights", Role.OUTPUT, OUTPUT_GROUP, "--test_only: evaluate the trained weights or their moving "
         "average (--ema_decay)", "model", choices=("model", "ema")),
    Flag("resume", Role.COMMAND, OUTPUT_GROUP, "continue training from a last.pt; auto = <output_dir>/last.pt if "
         "present", metavar="PATH|auto"),
    Flag("overwrite", Role.COMMAND, OUTPUT_GROUP, "replace the run already in --output_dir (otherwise such a "
         "directory is refused)", False, bool, switch=True),
    Flag("tensorboard", Role.RUNTIME, OUTPUT_GROUP, "also write TensorBoard event files to "
         "<output_dir>/tensorboard (needs the tensorboard package: pip install tensorboard)", False, bool),
    Flag("config", Role.COMMAND, OUTPUT_GROUP, "read flags from FILE, 'name: value' lines as in a run's args.txt; "
         "flags on the command line win", metavar="FILE"),
)}

GROUPS = (MODEL_GROUP, CONVNN_GROUP, OTHER_LAYERS_GROUP, DATA_GROUP, TRAINING_GROUP, RECIPE_GROUP,
          OPTIMISATION_GROUP, SYSTEM_GROUP, OUTPUT_GROUP)


def names(where) -> List[str]:
    """The names of the flags whose role satisfies ``where`` (a function of Role), in declaration order."""
    return [name for name, flag in FLAGS.items() if where(flag.role)]


RESUMABLE = names(lambda role: role.resumable)
EVALUATED = names(lambda role: role.evaluated)
MODEL = names(lambda role: role is Role.MODEL)


# ---------------------------------------------------------------------------------------------
# Facts of a run that are not flags
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    name: str
    help: str
    decides_result: bool


FACTS: Dict[str, Fact] = {fact.name: fact for fact in (
    Fact("processes", "processes the run trained in (torchrun's world size; 1 without torchrun)", False),
    Fact("global_batch", "images per optimiser step over all processes, before --accumulation_steps: "
         "--batch_size x processes", True),
    Fact("data", "the data the run trained on: dataset, classes, images per split and a digest that a moved "
         "folder keeps", True),
)}
DECIDING_FACTS = [name for name, fact in FACTS.items() if fact.decides_result]


def run_facts(batch_size: int, processes: int, data: str) -> Dict[str, object]:
    """The facts of a run of ``batch_size`` per process in ``processes`` processes on ``data`` (its fingerprint)."""
    return {"processes": processes, "global_batch": batch_size * processes, "data": data}


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------

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


def _add(group, flag: Flag) -> None:
    option = f"--{flag.name}"
    if flag.switch:
        group.add_argument(option, action="store_true", help=flag.help)
    elif flag.type is bool:
        # nargs="?" with const=True: a bare ``--flag`` means True, ``--flag False`` is read as a word.
        group.add_argument(option, type=str2bool, nargs="?", const=True, default=flag.default,
                           metavar="{True,False}", help=flag.help)
    else:
        group.add_argument(option, type=flag.type, default=flag.default,
                           choices=flag.choices, metavar=flag.metavar, help=flag.help)


class CommandLineParser(argparse.ArgumentParser):
    """Refuses bad input with its one line and a short hint, instead of the usage block of every flag first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: see --help for every flag and its default\n")


def build_parser(parser_class=CommandLineParser, description: str = "") -> argparse.ArgumentParser:
    parser = parser_class(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for flag in FLAGS.values():
        _add(groups[flag.group], flag)
    return parser


def defaults() -> Dict[str, object]:
    return {name: flag.default for name, flag in FLAGS.items()}


# ---------------------------------------------------------------------------------------------
# Bounds every run is held to, whatever its other flags
# ---------------------------------------------------------------------------------------------

# Integer flags must fit the 64-bit sizes of torch and Python's slicing.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def bound_problems(values: Dict[str, object]) -> List[str]:
    """Numbers no flag can mean, then each flag's declared bounds, as one-line messages starting with the flag.
    NaN or infinity is refused everywhere (NaN passes every comparison, so a range check would let it through to
    the optimiser, or make --clip_grad_norm nan mean "off"), as are integers that overflow 64 bits."""
    problems = []
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{name}: must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            bound = f"at most {INT64_MAX}" if value > 0 else f"at least {INT64_MIN}"
            problems.append(f"--{name}: {value} does not fit a 64-bit integer; must be {bound}")
    if problems:
        return problems
    return [problem for problem in (FLAGS[name].problem(value) for name, value in values.items() if name in FLAGS)
            if problem]


# ---------------------------------------------------------------------------------------------
# The values of a run's record (args.txt) that decide its result
# ---------------------------------------------------------------------------------------------

def recorded_defaults() -> Dict[str, str]:
    """Every flag's value as args.txt writes it (``str``) for a run of flags older than it."""
    return {name: str(flag.value_of_older_runs) for name, flag in FLAGS.items()}


def result_settings(recorded: Dict[str, str]) -> Dict[str, str]:
    """The values of ``recorded`` (an args.txt, as strings) that decide the result: the flags whose role decides
    it, a flag that the record lacks counting as the value runs older than the flag had, then the deciding facts
    the record holds. A name no flag or fact has (an args.txt of another version) is kept, so that it differs."""
    values = {**recorded_defaults(), **recorded}
    return {name: value for name, value in values.items()
            if (name in FLAGS and FLAGS[name].role.decides_result) or name in DECIDING_FACTS
            or (name not in FLAGS and name not in FACTS)}
