"""Compares training runs: one table (markdown and CSV) and two plots from their output directories.

    python scripts/summarize.py Output/sweep [MORE_DIRS ...] [--out_dir DIR]

Each argument is a run's output directory (it holds ``args.txt``) or a directory with runs somewhere
below it. A run reads its settings from ``args.txt``, parameters and GFLOPs from ``model.txt`` and
its epochs from ``metrics.csv``. Unfinished runs (no "Max Accuracy" line yet) are kept and marked;
directories holding no run are named on stderr and skipped, and so is a run whose files are damaged
(one line each, naming the run and the reason). A last ``metrics.csv`` line without its line end is an
epoch still being written: it is left out, with a note.

Writes ``summary.md``, ``summary.csv``, ``top1_vs_epoch.png`` (test top-1 against epoch, every run)
and ``best_top1_vs_K.png`` (best test top-1 against K, one line per layer and sampling) to
``--out_dir`` (default: ``summary`` in the current directory), and prints the markdown table.
"""

import argparse
import csv
import io
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vit_layers import layers_taking  # noqa: E402
from run_files import OutputWriteError, atomic_write, atomic_write_text, best_record  # noqa: E402

# The layers that take --K, --sampling_type and --convolution_type; for the others these columns read "-".
LAYERS_USING_K = layers_taking("K")
LAYERS_USING_SAMPLING = layers_taking("sampling_type")
LAYERS_USING_CONVOLUTION = layers_taking("convolution_type")
NOT_APPLICABLE = "-"

CSV_COLUMNS = ["run", "finished", "layer", "K", "sampling", "convolution_type", "parameters", "gflops",
               "epochs", "best_top1", "best_epoch", "final_top1", "average_epoch_seconds"]
MARKDOWN_HEADERS = ["run", "layer", "K", "sampling", "convolution", "parameters", "GFLOPs", "epochs",
                    "best top-1 (%)", "best epoch", "final top-1 (%)", "s / epoch"]
UNFINISHED_MARK = "*"
DEFAULT_OUT_DIR = "summary"
SAVE_DPI = 90

# The metrics.csv columns the summary reads; an accuracy is a percentage.
METRICS_READ = ["epoch", "test_top1", "epoch_seconds"]
PERCENTAGES = {"train_top1", "train_top5", "test_top1", "test_top5"}


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
    for column in METRICS_READ:
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
        "history": epochs,
    }
    if epochs:
        best = best_record(epochs)  # the rule of the run's own "Max Accuracy" line
        row.update(best_top1=best["test_top1"], best_epoch=int(best["epoch"]), final_top1=epochs[-1]["test_top1"],
                   average_epoch_seconds=sum(record["epoch_seconds"] for record in epochs) / len(epochs))
    return row, note


def table_order(row: Dict) -> tuple:
    """Runs of one layer and sampling together, by increasing K (layers without K first)."""
    k = row["K"] if row["K"] != NOT_APPLICABLE else 0
    return row["layer"], row["sampling"], k, row["run"]


def run_name(run: str, argument: str) -> str:
    """The run's path below the directory given on the command line (its own name when it was given)."""
    if os.path.samefile(run, argument):
        return os.path.basename(os.path.abspath(argument))
    return os.path.relpath(run, argument)


# ---------------------------------------------------------------------------------------------
# Table and plots
# ---------------------------------------------------------------------------------------------


def _cell(value, number_format: str = ".2f") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, number_format)
    return str(value)


def markdown_table(rows: List[Dict]) -> str:
    lines = ["| " + " | ".join(MARKDOWN_HEADERS) + " |", "|" + " --- |" * len(MARKDOWN_HEADERS)]
    for row in rows:
        name = row["run"] if row["finished"] else row["run"] + UNFINISHED_MARK
        parameters = f"{row['parameters']:,}" if row["parameters"] is not None else ""
        cells = [name, row["layer"], row["K"], row["sampling"], row["convolution_type"], parameters,
                 _cell(row["gflops"], ".4g"), row["epochs"], _cell(row["best_top1"]), _cell(row["best_epoch"]),
                 _cell(row["final_top1"]), _cell(row["average_epoch_seconds"])]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if not all(row["finished"] for row in rows):
        lines.append("")
        lines.append(f"{UNFINISHED_MARK} unfinished run (no final \"Max Accuracy\" line yet)")
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: List[Dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, table.getvalue())


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


def plot_top1_against_epoch(path: str, rows: List[Dict]) -> None:
    figure = _new_figure(8, 4.5)
    axes = figure.subplots()
    for row in rows:
        if row["history"]:
            label = row["run"] if row["finished"] else row["run"] + UNFINISHED_MARK
            # Not clipped: a marker at 100 % sits on the top edge.
            axes.plot([r["epoch"] for r in row["history"]], [r["test_top1"] for r in row["history"]], clip_on=False,
                      marker="o", markersize=3, label=label, linestyle="-" if row["finished"] else "--")
    axes.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="Test top-1 accuracy per epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _limit_to_percentages(axes)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        legend = axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        _widen_for_legend_beside(figure, legend, plot_width=5.8)
    _save(figure, path)


def plot_best_against_k(path: str, rows: List[Dict]) -> None:
    """One line per layer and sampling over K; layers that ignore K are horizontal dashed lines."""
    figure = _new_figure(7, 4.5)
    axes = figure.subplots()
    lines = defaultdict(list)
    flat = []
    for row in rows:
        if row["best_top1"] is None:
            continue
        if row["K"] == NOT_APPLICABLE:
            flat.append(row)
        else:
            lines[(row["layer"], row["sampling"])].append((row["K"], row["best_top1"]))
    for (layer, sampling), points in sorted(lines.items()):
        points.sort()
        label = layer if sampling == NOT_APPLICABLE else f"{layer}, {sampling}"
        axes.plot([k for k, _ in points], [best for _, best in points], marker="o", label=label, clip_on=False)
    for index, row in enumerate(flat, start=len(lines)):
        # Named in the legend: a name written beside the line would run into the top edge at 100 %.
        # axhline does not take the next colour of the cycle by itself.
        axes.axhline(row["best_top1"], linestyle="--", label=row["run"], color=f"C{index % 10}", clip_on=False)
    axes.set(xlabel="K (neighbours per token)", ylabel="best test top-1 accuracy (%)",
             title="Best test top-1 against K")
    axes.set_xticks(sorted({k for points in lines.values() for k, _ in points}))
    _limit_to_percentages(axes)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def summarise_runs(directories: List[str]) -> List[Dict]:
    """The rows of every run found; what is skipped or left out is named on stderr, one line each."""
    rows, not_runs = [], []
    for argument in directories:
        for run in find_runs(argument, not_runs):
            try:
                row, note = summarise_run(run, run_name(run, argument))
            except SkippedRun as reason:
                print(f"summarize.py: skipped {run}: {reason}", file=sys.stderr)
                continue
            if note:
                print(f"summarize.py: {run}: {note}", file=sys.stderr)
            rows.append(row)
    for path in not_runs:
        print(f"summarize.py: skipped {path}: not a run directory (no args.txt) and no run below it", file=sys.stderr)
    return rows


def write_summary(out_dir: str, rows: List[Dict], table: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), table)
    write_csv(os.path.join(out_dir, "summary.csv"), rows)
    plot_top1_against_epoch(os.path.join(out_dir, "top1_vs_epoch.png"), rows)
    plot_best_against_k(os.path.join(out_dir, "best_top1_vs_K.png"), rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Table and plots comparing training runs.")
    parser.add_argument("directories", nargs="+", help="run directories, or directories with runs below them")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR,
                        help="where the table and plots go (default: %(default)s in the current directory)")
    args = parser.parse_args(argv)

    rows = summarise_runs(args.directories)
    if not rows:
        print("summarize.py: no runs found to summarise", file=sys.stderr)
        return 1
    rows.sort(key=table_order)
    table = markdown_table(rows)
    try:
        write_summary(args.out_dir, rows, table)
    except OSError as error:  # OutputWriteError names the file; makedirs names the directory
        reason = str(error) if isinstance(error, OutputWriteError) else f"cannot create {args.out_dir}: {error.strerror}"
        print(f"summarize.py: {reason}; choose another --out_dir", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
