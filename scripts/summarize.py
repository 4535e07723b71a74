"""Compares training runs: a table of runs, a table of groups of seeds (markdown and CSV) and plots from
their output directories.

    python scripts/summarize.py Output/sweep [MORE_DIRS ...] [--out_dir DIR] [--baseline LAYER]

Each argument is a run's output directory (it holds ``args.txt``) or a directory with runs somewhere
below it. A run reads its settings from ``args.txt``, parameters and GFLOPs from ``model.txt`` and
its epochs from ``metrics.csv``. Unfinished runs (no "Max Accuracy" line yet) are kept and marked;
directories holding no run are named on stderr and skipped, and so is a run whose files are damaged
(one line each, naming the run and the reason). A last ``metrics.csv`` line without its line end is an
epoch still being written: it is left out, with a note.

Runs are named by their path below the directory given; where names collide over several directories (two
sweeps of the same layers), the runs of those directories are named from one level higher
(``lr1e-3/Attention_s0``).

Each run's result is the test top-1 of its selected epoch, chosen by the training's own rule
(run_files.selected_record): the epoch of the best validation top-1 when metrics.csv has validation columns
(--val_split), else the epoch of the best test top-1, marked "test (optimistic)": picked on the test set
itself, it overstates what a new sample would give.

Finished runs whose args.txt differ only in --seed (and in what does not change the result: the flags whose
role says where and how fast a run ran, see settings.py) form a group; the recorded global batch and data
fingerprint separate groups like flags do. Each group gives the number of seeds, mean (with its 95 % interval)
and sample standard deviation of the selected top-1, parameters, GFLOPs and mean seconds per epoch.
``--baseline LAYER`` adds to each group of another layer the mean difference from the LAYER group with the same
other settings, with its 95 % confidence interval (paired by seed when both have the same seeds, else Welch's).

Writes ``summary.md`` (both tables in full), ``summary.csv`` (runs), ``groups.csv``, ``top1_vs_epoch.png``
(each run's selecting top-1 against epoch: a colour per setting, a line style per seed), ``best_top1_vs_K.png``
(mean selected test top-1 against K with the standard deviation over seeds as error bars) and, with
--baseline, ``differences_from_baseline.png`` (each group's difference with its 95 % interval) to ``--out_dir``
(default: ``summary`` in the current directory), and prints a compact table that fits 100 columns.
"""

import csv
import io
import math
import os
import re
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.layer_options import LAYER_OPTIONS  # noqa: E402
from models.vit_layers import LAYER_REGISTRY, layers_taking  # noqa: E402
import run_files  # noqa: E402
from run_files import OutputWriteError, atomic_write, atomic_write_text, first_best  # noqa: E402
from settings import CommandLineParser, result_settings  # noqa: E402

# The layers that take --K, --sampling_type and --convolution_type; for the others these columns read "-".
LAYERS_USING_K = layers_taking("K")
LAYERS_USING_SAMPLING = layers_taking("sampling_type")
LAYERS_USING_CONVOLUTION = layers_taking("convolution_type")
NOT_APPLICABLE = "-"

# New columns are appended, so that a reader of the older file finds its columns where they were.
CSV_COLUMNS = ["run", "finished", "layer", "K", "sampling", "convolution_type", "parameters", "gflops",
               "epochs", "best_top1", "best_epoch", "final_top1", "average_epoch_seconds",
               "seed", "selected_by", "selected_epoch", "selected_top1"]
MARKDOWN_HEADERS = ["run", "layer", "K", "sampling", "convolution", "parameters", "GFLOPs", "epochs",
                    "best top-1 (%)", "best epoch", "final top-1 (%)", "s / epoch", "seed", "selected by",
                    "selected epoch", "selected top-1 (%)"]
GROUP_COLUMNS = ["group", "runs", "layer", "K", "sampling", "convolution_type", "num_epochs", "n_seeds", "seeds",
                 "selected_by", "top1_mean", "top1_std", "parameters", "gflops", "average_epoch_seconds",
                 "baseline", "comparison", "difference", "ci95_low", "ci95_high", "df",
                 "top1_ci95_low", "top1_ci95_high"]
GROUP_HEADERS = ["group", "layer", "K", "sampling", "convolution", "epochs", "seeds", "selected by",
                 "mean top-1 (%)", "sd", "parameters", "GFLOPs", "s / epoch"]
BASELINE_HEADERS = ["baseline", "comparison", "difference (points)", "95% CI"]
UNFINISHED_MARK = "*"
DEFAULT_OUT_DIR = "summary"
DIFFERENCES_PLOT = "differences_from_baseline.png"
SAVE_DPI = 90

# The metrics.csv columns the summary reads; an accuracy is a percentage.
METRICS_READ = ["epoch", "test_top1", "epoch_seconds"]
VALIDATION_TOP1 = "val_top1"  # present when the run held out a validation split (--val_split)
PERCENTAGES = {"train_top1", "train_top5", "test_top1", "test_top5", "val_top1", "val_top5"}

SELECTED_BY_VALIDATION = "val"
SELECTED_BY_TEST = "test (optimistic)"
SELECTION_LABELS = {VALIDATION_TOP1: SELECTED_BY_VALIDATION, "test_top1": SELECTED_BY_TEST}
# The settings that may differ between a group and the baseline group it is compared with.
BASELINE_MAY_DIFFER = frozenset({"layer", *LAYER_OPTIONS})
CONFIDENCE = 0.95
# Not left at the end of a group name made of its runs' common beginning.
NAME_SEPARATORS = "_-./ "


# ---------------------------------------------------------------------------------------------
# Finding runs
# ---------------------------------------------------------------------------------------------


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "args.txt"))


def subdirectories(path: str) -> List[str]:
    # Hidden directories (e.g. .git) are never runs.
    return sorted(entry.path for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def holds_a_run(path: str) -> bool:
    return is_run(path) or any(holds_a_run(child) for child in subdirectories(path))


def find_runs(path: str, not_runs: List[str]) -> List[str]:
    """Run directories at or below ``path``. Directories with no run anywhere below them are added
    to ``not_runs`` (the highest such directory only, not each of its subdirectories)."""
    if is_run(path):
        return [path]
    if not os.path.isdir(path) or not holds_a_run(path):
        not_runs.append(path)
        return []
    return [run for child in subdirectories(path) for run in find_runs(child, not_runs)]


# ---------------------------------------------------------------------------------------------
# Reading one run
# ---------------------------------------------------------------------------------------------


class SkippedRun(Exception):
    """A run whose files are not as vit_main writes them; the message says which and how, in one line.
    Such a run is left out rather than risk a wrong number in the table."""


def read_text(run: str, name: str) -> str:
    try:
        with open(os.path.join(run, name), encoding="utf-8", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise SkippedRun(f"{name} is not UTF-8 text (byte {error.start})") from error
    except OSError as error:
        raise SkippedRun(f"{name} cannot be read ({error.strerror or error})") from error


def read_args(run: str) -> Dict[str, str]:
    """args.txt: one ``name: value`` line per flag, each with its line end (the file is replaced whole)."""
    text = read_text(run, "args.txt")
    if not text:
        raise SkippedRun("args.txt is empty")
    if not text.endswith("\n"):
        raise SkippedRun("args.txt: its last line is cut short (no line end)")
    arguments = {}
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        if ": " not in line:
            raise SkippedRun(f"args.txt line {number} is not 'name: value': {line[:40]!r}")
        name, value = line.split(": ", 1)
        if name in arguments:
            raise SkippedRun(f"args.txt line {number} repeats {name}")
        arguments[name] = value
    return arguments


def integer_argument(arguments: Dict[str, str], name: str) -> Optional[int]:
    """The integer value of flag ``name`` (None when args.txt lacks it)."""
    if name not in arguments:
        return None
    try:
        return int(arguments[name])
    except ValueError:
        raise SkippedRun(f"args.txt: {name} is {arguments[name]!r}, not an integer") from None


def read_model_summary(run: str) -> Dict[str, Optional[float]]:
    """Parameters and GFLOPs from model.txt (None when the file or the line is missing)."""
    text = read_text(run, "model.txt") if os.path.isfile(os.path.join(run, "model.txt")) else ""
    parameters = re.search(r"^Total parameters: ([\d,]+)$", text, re.MULTILINE)
    gflops = re.search(r"^GFLOPs per image \(\d+x\d+, forward\): (\S+)$", text, re.MULTILINE)
    return {
        "parameters": int(parameters.group(1).replace(",", "")) if parameters else None,
        "gflops": _number(gflops.group(1), "model.txt: GFLOPs") if gflops else None,
    }


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SkippedRun(f"{where} is {text!r}, not a number") from None


def read_metrics(run: str) -> Tuple[List[Dict[str, float]], Optional[str]]:
    """The epochs of metrics.csv, and a note when its last line was left out.

    vit_main writes the header and the rows of a (re)start at once, then appends one whole row per
    epoch, each with its line end. So a last line without one is an epoch still being written, or a
    write that was killed: its last value may be cut short (87.5 read as 8), and it is left out. Any
    other row that does not fit the header means a damaged file, and the run is skipped."""
    if not os.path.isfile(os.path.join(run, "metrics.csv")):
        return [], None
    text = read_text(run, "metrics.csv")
    if not text:
        raise SkippedRun("metrics.csv is empty (not even its header line)")
    lines = text.split("\n")
    cut_short = lines.pop()  # "" when the file ends with a line end
    note = None
    if cut_short:
        if not lines:
            raise SkippedRun("metrics.csv: its header line is cut short (no line end)")
        note = ("ignored the last line of metrics.csv, cut short (no line end): an epoch being written, "
                "or a write that was killed")
    header, *rows = csv.reader(io.StringIO("\n".join(lines) + "\n"))
    missing = [column for column in METRICS_READ if column not in header]
    if missing:
        raise SkippedRun(f"metrics.csv: its header lacks {', '.join(missing)}")
    epochs = [_metrics_row(header, cells, line) for line, cells in enumerate(rows, start=2)]
    for line, record in enumerate(epochs, start=2):
        if record["epoch"] != line - 1:
            raise SkippedRun(f"metrics.csv: epoch {record['epoch']:g} on line {line}, expected {line - 1}")
    return epochs, note


def _metrics_row(header: List[str], cells: List[str], line: int) -> Dict[str, float]:
    if len(cells) != len(header):
        raise SkippedRun(f"metrics.csv line {line}: {len(cells)} values for {len(header)} columns")
    record = {column: _number(value, f"metrics.csv line {line}: {column}") for column, value in zip(header, cells)}
    # A NaN validation top-1 would make the choice of the selected epoch meaningless.
    checked = METRICS_READ + ([VALIDATION_TOP1] if VALIDATION_TOP1 in header else [])
    for column in checked:
        if not math.isfinite(record[column]):
            raise SkippedRun(f"metrics.csv line {line}: {column} is {record[column]}")
    for column in PERCENTAGES.intersection(header):
        if not 0 <= record[column] <= 100:
            raise SkippedRun(f"metrics.csv line {line}: {column} is {record[column]}, not a percentage")
    return record


def is_finished(run: str) -> bool:
    """A finished run's train_eval_results.txt ends with the "Max Accuracy" line."""
    if not os.path.isfile(os.path.join(run, "train_eval_results.txt")):
        return False
    return any(line.startswith("Max Accuracy: ") for line in read_text(run, "train_eval_results.txt").split("\n"))


def sampling_label(arguments: Dict[str, str]) -> str:
    if arguments.get("layer") not in LAYERS_USING_SAMPLING:
        return NOT_APPLICABLE
    sampling_type = arguments.get("sampling_type", "all")
    num_samples = integer_argument(arguments, "num_samples")
    return sampling_type if sampling_type == "all" or num_samples in (None, -1) else f"{sampling_type}:{num_samples}"


def summarise_run(run: str, name: str) -> Tuple[Dict, Optional[str]]:
    """One row of the table, and a note on what was left out of it. The metric cells are None while a
    run has no finished epoch. Raises SkippedRun for a run whose files are damaged."""
    arguments = read_args(run)
    epochs, note = read_metrics(run)
    layer = arguments.get("layer", "?")
    k = integer_argument(arguments, "K") if layer in LAYERS_USING_K else None
    num_epochs = integer_argument(arguments, "num_epochs")
    row = {
        "run": name,
        "finished": is_finished(run),
        "layer": layer,
        "K": k if k is not None else NOT_APPLICABLE,
        "sampling": sampling_label(arguments),
        "convolution_type": arguments.get("convolution_type", "?") if layer in LAYERS_USING_CONVOLUTION
        else NOT_APPLICABLE,
        **read_model_summary(run),
        "epochs": f"{len(epochs)}/{num_epochs if num_epochs is not None else '?'}",
        "best_top1": None, "best_epoch": None, "final_top1": None, "average_epoch_seconds": None,
        "seed": integer_argument(arguments, "seed"), "selected_by": None, "selected_epoch": None,
        "selected_top1": None, "history": epochs, "arguments": arguments,
    }
    if epochs:
        best = first_best(epochs, "test_top1")
        # The training's own rule, so that the table reports the epoch whose weights best.pt holds.
        selected = run_files.selected_record(epochs)
        selected_by = SELECTION_LABELS[run_files.selection_column(epochs)]
        row.update(best_top1=best["test_top1"], best_epoch=int(best["epoch"]), final_top1=epochs[-1]["test_top1"],
                   average_epoch_seconds=sum(record["epoch_seconds"] for record in epochs) / len(epochs),
                   selected_by=selected_by, selected_epoch=int(selected["epoch"]), selected_top1=selected["test_top1"])
    return row, note


def table_order(row: Dict) -> tuple:
    """Runs (or groups) of one layer and sampling together, by increasing K (layers without K first)."""
    k = row["K"] if row["K"] != NOT_APPLICABLE else 0
    return row["layer"], row["sampling"], k, row["run"] if "run" in row else row["group"]


def _base_directory(run: str, argument: str) -> str:
    """The directory a run is named from: the one given on the command line, or its parent when the run itself
    was given."""
    if os.path.samefile(run, argument):
        return os.path.dirname(os.path.abspath(argument))
    return os.path.abspath(argument)


def _prefixed(name: str, base: str, depth: int) -> str:
    """``name`` below the last ``depth`` directories of ``base``'s path."""
    return os.path.join(*Path(base).parts[len(Path(base).parts) - depth:], name) if depth else name


def run_names(runs: List[Tuple[str, str]]) -> List[str]:
    """A name for each ``(run, argument)``, unique over all of them: the run's path below the directory given on
    the command line (its own name when it was given). Where names collide, as when two sweeps of the same
    layers are compared, every run of the directories involved is named from one level higher
    (``lr1e-3/Attention_s0``), and higher again while names still collide."""
    bases = [_base_directory(run, argument) for run, argument in runs]
    names = [os.path.relpath(run, base) for (run, _), base in zip(runs, bases)]
    depths = dict.fromkeys(bases, 0)
    while True:
        shown = [_prefixed(name, base, depths[base]) for name, base in zip(names, bases)]
        counts = Counter(shown)
        colliding = {base for base, name in zip(bases, shown) if counts[name] > 1}
        deeper = [base for base in colliding if depths[base] < len(Path(base).parts)]
        if not deeper:
            return shown
        for base in deeper:
            depths[base] += 1


# ---------------------------------------------------------------------------------------------
# Statistics over seeds (numpy only)
# ---------------------------------------------------------------------------------------------

# Simpson's rule over this many intervals integrates the t density to about 1e-10 for every df >= 1.
T_INTEGRATION_INTERVALS = 4096


def mean_and_sd(values: List[float]) -> Tuple[float, Optional[float]]:
    """The mean and the sample standard deviation (ddof=1), which one value does not define (None)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def _t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_scale - (df + 1) / 2 * np.log1p(x * x / df))


def _t_probability_below(x: float, df: float) -> float:
    """P(T <= x) for x >= 0: one half plus the integral of the density from 0 to x (Simpson's rule)."""
    points = np.linspace(0.0, x, T_INTEGRATION_INTERVALS + 1)
    density = _t_density(points, df)
    step = x / T_INTEGRATION_INTERVALS
    integral = step / 3 * (density[0] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum() + density[-1])
    return 0.5 + integral


def t_quantile(probability: float, df: float) -> float:
    """The quantile of Student's t distribution with ``df`` (not necessarily whole) degrees of freedom, for
    a probability above one half: its CDF, integrated numerically, inverted by bisection."""
    low, high = 0.0, 1.0
    while _t_probability_below(high, df) < probability:
        low, high = high, 2 * high
    while high - low > 1e-10 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if _t_probability_below(middle, df) < probability else (low, middle)
    return (low + high) / 2


def _interval(difference: float, standard_error: float, df: Optional[float]) -> Tuple[float, float]:
    if standard_error == 0:  # no spread at all: no t quantile is needed (nor defined, for Welch's df)
        return difference, difference
    half_width = t_quantile(1 - (1 - CONFIDENCE) / 2, df) * standard_error
    return difference - half_width, difference + half_width


def mean_interval(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    """The 95 % confidence interval of the mean of ``values``: mean +- t(0.975, n-1) * sd / sqrt(n); none for
    one value."""
    mean, sd = mean_and_sd(values)
    if sd is None:
        return None, None
    return _interval(mean, sd / math.sqrt(len(values)), len(values) - 1)


def paired_comparison(differences: List[float]) -> Dict:
    """Mean of the per-seed differences, and mean +- t(0.975, n-1) * sd / sqrt(n) (none for one pair)."""
    mean, sd = mean_and_sd(differences)
    result = {"comparison": "paired", "difference": mean, "ci95_low": None, "ci95_high": None, "df": None}
    if sd is not None:
        df = len(differences) - 1
        result.update(zip(("ci95_low", "ci95_high"), _interval(mean, sd / math.sqrt(len(differences)), df)), df=df)
    return result


def welch_comparison(values: List[float], baseline: List[float]) -> Dict:
    """Difference of the means, and Welch's interval: difference +- t(0.975, df) * se, with
    se^2 = s1^2/n1 + s2^2/n2 and the Welch-Satterthwaite df = se^4 / ((s1^2/n1)^2/(n1-1) + (s2^2/n2)^2/(n2-1)).
    No interval when either side has a single run (its variance is unknown)."""
    (mean, sd), (baseline_mean, baseline_sd) = mean_and_sd(values), mean_and_sd(baseline)
    result = {"comparison": "unpaired (Welch)", "difference": mean - baseline_mean, "ci95_low": None,
              "ci95_high": None, "df": None}
    if sd is None or baseline_sd is None:
        return result
    shares = [sd ** 2 / len(values), baseline_sd ** 2 / len(baseline)]
    variance = sum(shares)
    df = None  # no spread on either side: the interval is the difference itself, and df is 0 / 0
    if variance:
        df = variance ** 2 / (shares[0] ** 2 / (len(values) - 1) + shares[1] ** 2 / (len(baseline) - 1))
    result.update(zip(("ci95_low", "ci95_high"), _interval(result["difference"], math.sqrt(variance), df)), df=df)
    return result


def compare_with_baseline(group: Dict, baseline: Dict) -> Dict:
    """Paired by seed when both groups ran the same seeds, else unpaired."""
    if group["top1_by_seed"].keys() == baseline["top1_by_seed"].keys():
        seeds = sorted(group["top1_by_seed"])
        return paired_comparison([group["top1_by_seed"][seed] - baseline["top1_by_seed"][seed] for seed in seeds])
    return welch_comparison(list(group["top1_by_seed"].values()), list(baseline["top1_by_seed"].values()))


# ---------------------------------------------------------------------------------------------
# Groups: runs that differ only in --seed
# ---------------------------------------------------------------------------------------------


def group_name(runs: List[Tuple[int, Dict]]) -> str:
    """The runs' name without the sweep's ``_s<seed>`` ending when that leaves one name for all of them, else
    the names' common beginning, else the first run's name and ``+`` the number of the others."""
    names = sorted({re.sub(rf"_s{seed}$", "", row["run"]) for seed, row in runs})
    if len(names) == 1:
        return names[0]
    return os.path.commonprefix(names).rstrip(NAME_SEPARATORS) or _counted_name(runs)


def _counted_name(runs: List[Tuple[int, Dict]]) -> str:
    # Unique among groups, as run names are and no run is in two groups.
    return runs[0][1]["run"] + (f"+{len(runs) - 1}" if len(runs) > 1 else "")


def _name_groups(groups: List[Dict], members: List[List[Tuple[int, Dict]]]) -> None:
    """Names each group by ``group_name``, or by its first run when another group has the same name (runs with
    different settings but one name, or names with the same beginning)."""
    names = [group_name(runs) for runs in members]
    counts = Counter(names)
    for group, runs, name in zip(groups, members, names):
        group["group"] = name if counts[name] == 1 else _counted_name(runs)


def setting_and_seed(row: Dict) -> Tuple[tuple, Optional[int]]:
    """What a group's runs share (the settings that change the result, but the seed, and how the epoch was
    selected), and the run's seed."""
    settings = result_settings(row["arguments"])
    seed = integer_argument(settings, "seed")  # an args.txt without one ran the default seed
    del settings["seed"]
    return (tuple(sorted(settings.items())), row["selected_by"]), seed


def group_runs(rows: List[Dict]) -> List[Dict]:
    """The groups of finished runs with the same settings but their seed (and the flags that do not change the
    result), split by how their epoch was selected. A group holding two runs of one seed is left out, with a
    line on stderr: such copies are not independent samples."""
    members = defaultdict(list)
    for row in rows:
        if row["finished"] and row["selected_top1"] is not None:
            setting, seed = setting_and_seed(row)
            members[setting].append((seed, row))
    groups, grouped = [], []
    for (settings, selected_by), runs in members.items():
        runs.sort(key=lambda run: (run[0], run[1]["run"]))
        seeds = [seed for seed, _ in runs]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            names = ", ".join(row["run"] for seed, row in runs if seed in repeated)
            print(f"summarize.py: left out the group of {names}: same settings and same seed {repeated[0]} "
                  "(copies of a run are not independent seeds)", file=sys.stderr)
            continue
        groups.append(_group_row(runs, dict(settings), selected_by))
        grouped.append(runs)
    _name_groups(groups, grouped)
    return groups


def _common(rows: List[Dict], column: str):
    """The value all ``rows`` share (None when they differ: no single number stands for them)."""
    values = {row[column] for row in rows}
    return values.pop() if len(values) == 1 else None


def _group_row(runs: List[Tuple[int, Dict]], settings: Dict[str, str], selected_by: str) -> Dict:
    rows = [row for _, row in runs]
    mean, sd = mean_and_sd([row["selected_top1"] for row in rows])
    low, high = mean_interval([row["selected_top1"] for row in rows])
    first = rows[0]
    return {
        "group": None, "runs": " ".join(row["run"] for row in rows), "layer": first["layer"],  # see _name_groups
        "K": first["K"], "sampling": first["sampling"], "convolution_type": first["convolution_type"],
        "num_epochs": settings.get("num_epochs", "?"), "n_seeds": len(runs),
        "seeds": " ".join(str(seed) for seed, _ in runs), "selected_by": selected_by,
        "top1_mean": mean, "top1_std": sd, "parameters": _common(rows, "parameters"),
        "gflops": _common(rows, "gflops"),
        "average_epoch_seconds": float(np.mean([row["average_epoch_seconds"] for row in rows])),
        "baseline": None, "comparison": None, "difference": None, "ci95_low": None, "ci95_high": None, "df": None,
        "top1_ci95_low": low, "top1_ci95_high": high,
        "settings": settings, "top1_by_seed": {seed: row["selected_top1"] for seed, row in runs},
        "run_names": [row["run"] for row in rows],
    }


def _baseline_key(group: Dict) -> tuple:
    others = {name: value for name, value in group["settings"].items() if name not in BASELINE_MAY_DIFFER}
    return tuple(sorted(others.items())), group["selected_by"]


def add_baseline_comparisons(groups: List[Dict], layer: str) -> None:
    """Fills the baseline columns of every group of another layer that has one matching ``layer`` group: the same
    settings but the layer and its options, selected the same way. The others are named on stderr."""
    baselines = defaultdict(list)
    for group in groups:
        if group["layer"] == layer:
            baselines[_baseline_key(group)].append(group)
    for group in groups:
        if group["layer"] == layer:
            continue
        matches = baselines.get(_baseline_key(group), [])
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)} ({', '.join(match['group'] for match in matches)})"
            print(f"summarize.py: {group['group']}: {found} {layer} group with the same other settings and selection; "
                  "not compared", file=sys.stderr)
            continue
        group.update(baseline=matches[0]["group"], **compare_with_baseline(group, matches[0]))


# ---------------------------------------------------------------------------------------------
# Table and plots
# ---------------------------------------------------------------------------------------------


def _cell(value, number_format: str = ".2f") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, number_format)
    return str(value)


def _parameters_cell(value: Optional[int]) -> str:
    return f"{value:,}" if value is not None else ""


def _markdown_cell(value) -> str:
    # A bare "|" would end the cell early and shift every cell after it into the wrong column.
    return str(value).replace("|", "\\|")


def _markdown_lines(headers: List[str], rows: List[List]) -> List[str]:
    return ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers),
            *("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |" for cells in rows)]


def markdown_table(rows: List[Dict]) -> str:
    cells = []
    for row in rows:
        name = row["run"] if row["finished"] else row["run"] + UNFINISHED_MARK
        cells.append([name, row["layer"], row["K"], row["sampling"], row["convolution_type"],
                      _parameters_cell(row["parameters"]), _cell(row["gflops"], ".4g"), row["epochs"],
                      _cell(row["best_top1"]), _cell(row["best_epoch"]), _cell(row["final_top1"]),
                      _cell(row["average_epoch_seconds"]), _cell(row["seed"]), _cell(row["selected_by"]),
                      _cell(row["selected_epoch"]), _cell(row["selected_top1"])])
    lines = _markdown_lines(MARKDOWN_HEADERS, cells)
    if not all(row["finished"] for row in rows):
        lines.append("")
        lines.append(f"{UNFINISHED_MARK} unfinished run (no final \"Max Accuracy\" line yet), left out of the groups")
    return "\n".join(lines) + "\n"


def _undefined(value, number_format: str = ".2f") -> str:
    # A statistic that the runs do not define (a deviation of one seed, an interval of one pair).
    return "-" if value is None else _cell(value, number_format)


def _interval_cell(group: Dict) -> str:
    if group["ci95_low"] is None:
        return "- (needs 2 seeds a side)" if group["comparison"] != "paired" else "- (needs 2 paired seeds)"
    return f"[{group['ci95_low']:+.2f}, {group['ci95_high']:+.2f}]"


def groups_markdown(groups: List[Dict], baseline: Optional[str]) -> str:
    """The table of groups, with the baseline columns when a baseline was asked for, and what its numbers mean."""
    headers = GROUP_HEADERS + (BASELINE_HEADERS if baseline else [])
    cells = []
    for group in groups:
        row = [group["group"], group["layer"], group["K"], group["sampling"], group["convolution_type"],
               group["num_epochs"], f"{group['n_seeds']} ({group['seeds'].replace(' ', ', ')})", group["selected_by"],
               _cell(group["top1_mean"]), _undefined(group["top1_std"]), _parameters_cell(group["parameters"]),
               _cell(group["gflops"], ".4g"), _cell(group["average_epoch_seconds"])]
        if baseline:
            compared = group["baseline"] is not None
            row += [group["baseline"] or "-", group["comparison"] or "-",
                    f"{group['difference']:+.2f}" if compared else "-", _interval_cell(group) if compared else "-"]
        cells.append(row)
    notes = ["",
             "Groups: finished runs that differ only in --seed. mean top-1: test top-1 at each run's selected epoch, "
             "averaged over the seeds; sd: their sample standard deviation (n-1), '-' for one seed.",
             f"selected by {SELECTED_BY_VALIDATION}: the epoch of the best validation top-1; {SELECTED_BY_TEST}: "
             "the epoch of the best test top-1, picked on the test set itself, which overstates the result."]
    if baseline:
        notes.append(f"difference: mean top-1 minus that of the {baseline} group with the same other settings, in "
                     "points; 95% CI over the seeds (paired by seed when both ran the same seeds, else Welch's). "
                     "It measures seed noise only, not the choice of data or hyper-parameters.")
    return "\n".join(_markdown_lines(headers, cells) + notes) + "\n"


TERMINAL_WIDTH = 100
SHORT_SELECTION = {SELECTED_BY_VALIDATION: "val", SELECTED_BY_TEST: "test"}


def _with_interval(value: float, low: Optional[float], high: Optional[float], sign: str = "") -> str:
    number = format(value, f"{sign}.2f")
    return number if low is None else f"{number} [{low:{sign}.2f}, {high:{sign}.2f}]"


def _aligned(headers: List[str], rows: List[List[str]], squeezed: int) -> List[str]:
    """Columns two spaces apart, every line within TERMINAL_WIDTH: a cell of column ``squeezed`` (the names) too
    long for the room left gets a line of its own above its row, so that no name is cut."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    others = sum(widths) - widths[squeezed] + 2 * (len(widths) - 1)
    widths[squeezed] = max(min(widths[squeezed], TERMINAL_WIDTH - others), len(headers[squeezed]))
    lines = []
    for cells in [headers, *rows]:
        if len(cells[squeezed]) > widths[squeezed]:
            lines += textwrap.wrap(cells[squeezed], TERMINAL_WIDTH, break_on_hyphens=False)
            cells = cells[:squeezed] + [""] + cells[squeezed + 1:]
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    return lines


def terminal_table(rows: List[Dict], groups: List[Dict], baseline: Optional[str]) -> str:
    """The compact table printed to the terminal, each line within TERMINAL_WIDTH characters: one line per group,
    then one per run that is in no group (unfinished, or without a finished epoch), with the selected top-1 and
    its 95% interval over seeds, and the difference from the baseline with its interval. How the epochs were
    selected gets a column only when it differs between lines."""
    grouped = {name for group in groups for name in group["run_names"]}
    alone = [row for row in rows if row["run"] not in grouped]
    # None: a run without a finished epoch, which has no selection.
    selections = ({group["selected_by"] for group in groups} | {row["selected_by"] for row in alone}) - {None}
    mixed = len(selections) > 1
    headers = ["group / run", "layer", "K", "seeds"] + (["by"] if mixed else []) + ["top-1 [95% CI]"]
    if baseline:
        headers.append(f"minus {baseline} [95% CI]")
    cells = []
    for group in groups:
        line = [group["group"], group["layer"], str(group["K"]), str(group["n_seeds"])]
        line += [SHORT_SELECTION[group["selected_by"]]] if mixed else []
        line.append(_with_interval(group["top1_mean"], group["top1_ci95_low"], group["top1_ci95_high"]))
        if baseline:
            if group["layer"] == baseline:
                line.append("baseline")
            elif group["baseline"] is None:
                line.append("-")
            else:
                line.append(_with_interval(group["difference"], group["ci95_low"], group["ci95_high"], "+"))
        cells.append(line)
    for row in alone:
        line = [row["run"] if row["finished"] else row["run"] + UNFINISHED_MARK, row["layer"], str(row["K"]), "-"]
        line += [SHORT_SELECTION.get(row["selected_by"], "-")] if mixed else []
        cells.append(line + [_cell(row["selected_top1"]) or "-"] + (["-"] if baseline else []))
    if mixed:
        selection = ("by val: the best validation epoch; by test: the best test epoch, which overstates the "
                     "result")
    elif selections == {SELECTED_BY_TEST}:
        selection = "the best test epoch, which overstates the result: hold out a validation split (--val_split)"
    elif selections == {SELECTED_BY_VALIDATION}:
        selection = "the best validation epoch"
    else:
        selection = "the best validation epoch, or the best test epoch without a validation split"
    notes = [f"top-1: test top-1 (%) at each run's selected epoch ({selection}), averaged over seeds; 95% CI of "
             "that mean (t, n-1)."]
    if baseline:
        notes.append(f"minus {baseline}: difference in points from the {baseline} group with the same other "
                     "settings, paired by seed or else unpaired (Welch); it measures seed noise only.")
    if alone:
        notes.append(f"Runs in no group: unfinished ({UNFINISHED_MARK}), without a finished epoch, or two runs "
                     "of one seed.")
    wrapped = [line for note in notes for line in textwrap.wrap(note, TERMINAL_WIDTH)]
    return "\n".join(_aligned(headers, cells, squeezed=0) + [""] + wrapped) + "\n"


def csv_text(columns: List[str], rows: List[Dict]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def _limit_to_percentages(axes) -> None:
    # Autoscaling adds a margin around the data, which would put 101 % on the axis.
    bottom, top = axes.get_ylim()
    axes.set_ylim(max(bottom, 0), min(top, 100))


def _new_figure(width: float, height: float) -> Figure:
    # Laid out at the dpi it is saved at: text does not scale exactly with the dpi, so a layout made at
    # another one can leave a legend cut off by the edge.
    figure = Figure(figsize=(width, height), dpi=SAVE_DPI)
    FigureCanvasAgg(figure)  # the Agg canvas renders without any display
    return figure


def _widen_for_legend_beside(figure: Figure, legend, plot_width: float) -> None:
    """Makes the figure wide enough for ``plot_width`` inches of plot and the legend to its right."""
    legend_width = legend.get_window_extent(figure.canvas.get_renderer()).width / figure.dpi
    figure.set_figwidth(max(figure.get_figwidth(), plot_width + legend_width))


def _save(figure: Figure, path: str) -> None:
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=SAVE_DPI))


SEED_LINE_STYLES = ["-", "--", ":", "-."]
# The curve each run's epoch was selected on.
SELECTION_CURVES = {SELECTED_BY_VALIDATION: (VALIDATION_TOP1, "validation"), SELECTED_BY_TEST: ("test_top1", "test")}


def _setting_colours(count: int) -> List:
    colours = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    return [colours[index % len(colours)] for index in range(count)]


def _selection_label(selected_by: set) -> str:
    """What the plotted top-1 is: the curve the epochs were selected on."""
    if selected_by == {SELECTED_BY_VALIDATION}:
        return "validation top-1 (%), which selects the epoch"
    if selected_by == {SELECTED_BY_TEST}:
        return "test top-1 (%), which selects the epoch"
    return "top-1 (%) that selects the epoch:\nvalidation where held out, else test"


def _selected_top1_label(selected_by: set) -> str:
    """What a group's number is: test top-1 at the epoch chosen on validation, or on test itself."""
    if selected_by == {SELECTED_BY_VALIDATION}:
        return "test top-1 (%) at the best-validation epoch"
    if selected_by == {SELECTED_BY_TEST}:
        return "test top-1 (%) at the best-test epoch (optimistic)"
    return "test top-1 (%) at the selected epoch"


def plot_top1_against_epoch(path: str, rows: List[Dict], groups: List[Dict]) -> None:
    """Each run's top-1 per epoch on the curve its epoch was selected on (validation top-1 when it held out a
    validation split, else test top-1), with the selected epoch starred: one colour per setting (a group, or
    the runs outside any group that share settings), one line style per seed; unfinished runs faded."""
    figure = _new_figure(8, 4.5)
    axes = figure.subplots()
    shown = [row for row in rows if row["history"]]
    group_of_run = {name: group["group"] for group in groups for name in group["run_names"]}
    setting_of_row, settings, seeds = {}, {}, set()
    for row in shown:
        setting, seed = setting_and_seed(row)
        setting_of_row[row["run"]] = setting, seed
        seeds.add(seed)
        label = group_of_run.get(row["run"]) or re.sub(rf"_s{seed}$", "", row["run"])
        settings.setdefault(setting, label)
    colours = dict(zip(settings, _setting_colours(len(settings))))
    seed_order = sorted(seeds, key=lambda seed: (seed is None, seed or 0))
    styles = {seed: SEED_LINE_STYLES[index % len(SEED_LINE_STYLES)] for index, seed in enumerate(seed_order)}
    for row in shown:
        setting, seed = setting_of_row[row["run"]]
        column, _ = SELECTION_CURVES[row["selected_by"]]
        style = {"color": colours[setting], "alpha": 1.0 if row["finished"] else 0.4}
        # Not clipped: a marker at 100 % sits on the top edge.
        axes.plot([r["epoch"] for r in row["history"]], [r[column] for r in row["history"]], clip_on=False,
                  marker="o", markersize=2.5, linestyle=styles[seed], linewidth=1.2, **style)
        axes.plot([row["selected_epoch"]], [row["history"][row["selected_epoch"] - 1][column]], clip_on=False,
                  marker="*", markersize=10, markeredgecolor="black", markeredgewidth=0.5, linestyle="", **style)
    axes.set(xlabel="epoch", ylabel=_selection_label({row["selected_by"] for row in shown}),
             title="Top-1 per epoch (★ selected epoch)")
    # One tick is enough: by default two are wanted, and after one epoch they would fall between whole epochs.
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    _limit_to_percentages(axes)
    axes.grid(True, alpha=0.3)
    if shown:
        handles = [Line2D([], [], color=colours[setting], label=label) for setting, label in settings.items()]
        handles += [Line2D([], [], color="grey", linestyle=styles[seed], label=f"seed {seed}") for seed in seed_order]
        if not all(row["finished"] for row in shown):
            handles.append(Line2D([], [], color="grey", alpha=0.4, label="faded: unfinished"))
        legend = axes.legend(handles=handles, fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        _widen_for_legend_beside(figure, legend, plot_width=5.8)
    _save(figure, path)


def _line_labels(keys: List[tuple]) -> Dict[tuple, str]:
    """``layer, sampling`` for each line (a group's settings but K, and its selection), with the settings that
    tell apart lines of the same layer and sampling, and ``[test-picked]`` when the plot mixes both selections."""
    labels = {}
    mixed = len({selected_by for _, _, _, selected_by in keys}) > 1
    for key in keys:
        layer, sampling, settings, selected_by = key
        label = layer if sampling == NOT_APPLICABLE else f"{layer}, {sampling}"
        own = dict(settings)
        namesakes = [dict(other[2]) for other in keys if other[:2] == key[:2] and other != key]
        differing = sorted({name for other in namesakes for name in own if other.get(name) != own[name]})
        label += "".join(f", {name} {own[name]}" for name in differing)
        labels[key] = label + (" [test-picked]" if mixed and selected_by == SELECTED_BY_TEST else "")
    return labels


def plot_best_against_k(path: str, groups: List[Dict]) -> None:
    """Mean selected test top-1 against K, one line per layer and sampling (and other settings), with the
    standard deviation over seeds as error bars (none for one seed); layers that ignore K are horizontal dashed
    lines with the band of one standard deviation around them."""
    figure = _new_figure(7, 4.5)
    axes = figure.subplots()
    lines = defaultdict(list)
    flat = []
    for group in groups:
        if group["K"] == NOT_APPLICABLE:
            flat.append(group)
            continue
        others = tuple(sorted((name, value) for name, value in group["settings"].items() if name != "K"))
        lines[(group["layer"], group["sampling"], others, group["selected_by"])].append(group)
    labels = _line_labels(list(lines) + [(group["layer"], NOT_APPLICABLE, tuple(sorted(group["settings"].items())),
                                         group["selected_by"]) for group in flat])
    for key, points in sorted(lines.items(), key=lambda item: labels[item[0]]):
        points.sort(key=lambda group: group["K"])
        # NaN draws no bar: one seed has no deviation to show.
        deviations = [group["top1_std"] if group["top1_std"] is not None else math.nan for group in points]
        axes.errorbar([group["K"] for group in points], [group["top1_mean"] for group in points], yerr=deviations,
                      marker="o", capsize=3, label=labels[key], clip_on=False)
    for index, group in enumerate(flat, start=len(lines)):
        # Named in the legend: a name written beside the line would run into the top edge at 100 %.
        # axhline does not take the next colour of the cycle by itself.
        colour = f"C{index % 10}"
        key = (group["layer"], NOT_APPLICABLE, tuple(sorted(group["settings"].items())), group["selected_by"])
        axes.axhline(group["top1_mean"], linestyle="--", label=labels[key], color=colour, clip_on=False)
        if group["top1_std"] is not None:
            axes.axhspan(group["top1_mean"] - group["top1_std"], group["top1_mean"] + group["top1_std"], color=colour,
                         alpha=0.15, linewidth=0)
    axes.set(xlabel="K (neighbours per token)",
             ylabel=_selected_top1_label({group["selected_by"] for group in groups}) + "\nmean ± sd over seeds",
             title="Test top-1 at the selected epoch against K")
    axes.set_xticks(sorted({group["K"] for points in lines.values() for group in points}))
    _limit_to_percentages(axes)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    _save(figure, path)


def plot_differences_from_baseline(path: str, groups: List[Dict], baseline: str) -> None:
    """Each compared group's mean difference from its baseline group, in points of selected test top-1, with its
    95 % confidence interval over seeds as error bars (none where the seeds do not define one); zero is marked,
    so that an interval across it reads at once as no difference shown."""
    compared = [group for group in groups if group["baseline"] is not None]
    labels = [f"{group['group']} ({group['comparison']}, n={group['n_seeds']})" for group in compared]
    # Wide enough for the longest group name beside 4.5 inches of plot (about 0.075 inch a character at "small").
    figure = _new_figure(4.5 + 0.075 * max(map(len, labels), default=0), 1.6 + 0.35 * max(len(compared), 1))
    axes = figure.subplots()
    positions = list(range(len(compared)))[::-1]  # the table's first group on top
    for position, group in zip(positions, compared):
        low, high = group["ci95_low"], group["ci95_high"]
        error = [[group["difference"] - low], [high - group["difference"]]] if low is not None else None
        axes.errorbar([group["difference"]], [position], xerr=error, marker="o", capsize=3, color="C0")
    axes.axvline(0, color="grey", linewidth=1)
    axes.set_yticks(positions, labels, fontsize="small")
    if not compared:
        axes.text(0.5, 0.5, f"no group has a {baseline} group with the same other settings", ha="center",
                  va="center", transform=axes.transAxes)
    axes.set_ylim(-0.6, max(len(compared), 1) - 0.4)
    axes.set(xlabel=f"{_selected_top1_label({group['selected_by'] for group in compared})}\nminus {baseline}'s "
                    "(points), 95% CI over seeds", title=f"Difference from {baseline}")
    axes.grid(True, axis="x", alpha=0.3)
    _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def summarise_runs(directories: List[str]) -> List[Dict]:
    """The rows of every run found; what is skipped or left out is named on stderr, one line each."""
    rows = []
    runs, not_runs = unique_runs(directories)
    for (run, _), name in zip(runs, run_names(runs)):
        try:
            row, note = summarise_run(run, name)
        except SkippedRun as reason:
            print(f"summarize.py: skipped {run}: {reason}", file=sys.stderr)
            continue
        if note:
            print(f"summarize.py: {run}: {note}", file=sys.stderr)
        rows.append(row)
    for path in not_runs:
        print(f"summarize.py: skipped {path}: not a run directory (no args.txt) and no run below it", file=sys.stderr)
    return rows


def unique_runs(directories: List[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Each run found once, however many of the arguments lead to it: a run given twice is no second seed."""
    runs, seen, not_runs = [], set(), []
    for argument in directories:
        for run in find_runs(argument, not_runs):
            if os.path.realpath(run) not in seen:
                seen.add(os.path.realpath(run))
                runs.append((run, argument))
    return runs, not_runs


def write_summary(out_dir: str, rows: List[Dict], groups: List[Dict], table: str, baseline: Optional[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), table)
    atomic_write_text(os.path.join(out_dir, "summary.csv"), csv_text(CSV_COLUMNS, rows))
    atomic_write_text(os.path.join(out_dir, "groups.csv"), csv_text(GROUP_COLUMNS, groups))
    plot_top1_against_epoch(os.path.join(out_dir, "top1_vs_epoch.png"), rows, groups)
    plot_best_against_k(os.path.join(out_dir, "best_top1_vs_K.png"), groups)
    if baseline:
        plot_differences_from_baseline(os.path.join(out_dir, DIFFERENCES_PLOT), groups, baseline)


def main(argv: Optional[List[str]] = None) -> int:
    parser = CommandLineParser(description="Table and plots comparing training runs.")
    parser.add_argument("directories", nargs="+", help="run directories, or directories with runs below them")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR,
                        help="where the table and plots go (default: %(default)s in the current directory)")
    parser.add_argument("--baseline", metavar="LAYER", choices=list(LAYER_REGISTRY),
                        help="compare every group of another layer with the group of this layer that has the same "
                             "other settings: mean difference and its 95%% confidence interval over seeds")
    args = parser.parse_args(argv)

    rows = summarise_runs(args.directories)
    if not rows:
        print("summarize.py: no runs found to summarise", file=sys.stderr)
        return 1
    rows.sort(key=table_order)
    groups = group_runs(rows)
    groups.sort(key=table_order)
    if args.baseline:
        if not any(group["layer"] == args.baseline for group in groups):
            parser.error(f"--baseline: no finished run of layer {args.baseline} among the runs; choose one of "
                         f"{', '.join(sorted({group['layer'] for group in groups})) or 'none (no finished run)'}")
        add_baseline_comparisons(groups, args.baseline)
    table = markdown_table(rows) + "\n" + groups_markdown(groups, args.baseline)
    try:
        write_summary(args.out_dir, rows, groups, table, args.baseline)
    except OSError as error:  # OutputWriteError names the file; makedirs names the directory
        reason = str(error) if isinstance(error, OutputWriteError) else f"cannot create {args.out_dir}: {error.strerror}"
        print(f"summarize.py: {reason}; choose another --out_dir", file=sys.stderr)
        return 1
    print(terminal_table(rows, groups, args.baseline), end="")
    print(textwrap.fill(f"Full tables in {os.path.join(args.out_dir, 'summary.md')}, summary.csv and groups.csv; "
                        "plots beside them.", TERMINAL_WIDTH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
