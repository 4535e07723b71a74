"""Compares training runs: one table (markdown and CSV) and two plots from their output directories.

    python scripts/summarize.py Output/sweep [MORE_DIRS ...] [--out_dir DIR]

Each argument is a run's output directory (it holds ``args.txt``) or a directory with runs somewhere
below it. A run reads its settings from ``args.txt``, parameters and GFLOPs from ``model.txt`` and
its epochs from ``metrics.csv``. Unfinished runs (no "Max Accuracy" line yet) are kept and marked;
directories holding no run are named on stderr and skipped.

Writes ``summary.md``, ``summary.csv``, ``top1_vs_epoch.png`` (test top-1 against epoch, every run)
and ``best_top1_vs_K.png`` (best test top-1 against K, one line per layer and sampling) to
``--out_dir`` (default: the first directory given), and prints the markdown table.
"""

import argparse
import csv
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import best_record  # noqa: E402

# Layers whose behaviour depends on --K, and those that contain a ConvNN layer (which alone use
# the sampling and the convolution type). For the others these columns read "-".
LAYERS_USING_K = {"ConvNNAttention", "KvtAttention", "BranchConv", "BranchAttention"}
LAYERS_WITH_CONVNN = {"ConvNNAttention", "BranchConv", "BranchAttention"}
NOT_APPLICABLE = "-"

CSV_COLUMNS = ["run", "finished", "layer", "K", "sampling", "convolution_type", "parameters", "gflops",
               "epochs", "best_top1", "best_epoch", "final_top1", "average_epoch_seconds"]
MARKDOWN_HEADERS = ["run", "layer", "K", "sampling", "convolution", "parameters", "GFLOPs", "epochs",
                    "best top-1 (%)", "best epoch", "final top-1 (%)", "s / epoch"]
UNFINISHED_MARK = "*"


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


def read_args(run: str) -> Dict[str, str]:
    """args.txt: one ``name: value`` line per flag."""
    with open(os.path.join(run, "args.txt"), encoding="utf-8") as handle:
        return dict(line.rstrip("\n").split(": ", 1) for line in handle if ": " in line)


def read_model_summary(run: str) -> Dict[str, Optional[float]]:
    """Parameters and GFLOPs from model.txt (None when the file or the line is missing)."""
    path = os.path.join(run, "model.txt")
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    parameters = re.search(r"^Total parameters: ([\d,]+)$", text, re.MULTILINE)
    gflops = re.search(r"^GFLOPs per image \(\d+x\d+, forward\): (\S+)$", text, re.MULTILINE)
    return {
        "parameters": int(parameters.group(1).replace(",", "")) if parameters else None,
        "gflops": float(gflops.group(1)) if gflops else None,
    }


def read_metrics(run: str) -> List[Dict[str, float]]:
    path = os.path.join(run, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{name: float(value) for name, value in row.items()} for row in csv.DictReader(handle)]


def is_finished(run: str) -> bool:
    """A finished run's train_eval_results.txt ends with the "Max Accuracy" line."""
    path = os.path.join(run, "train_eval_results.txt")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return any(line.startswith("Max Accuracy: ") for line in handle)


def sampling_label(arguments: Dict[str, str]) -> str:
    if arguments.get("layer") not in LAYERS_WITH_CONVNN:
        return NOT_APPLICABLE
    sampling_type = arguments.get("sampling_type", "all")
    num_samples = arguments.get("num_samples", "-1")
    return sampling_type if sampling_type == "all" or num_samples == "-1" else f"{sampling_type}:{num_samples}"


def summarise_run(run: str, name: str) -> Dict:
    """One row of the table; the metric cells are None while a run has no finished epoch."""
    arguments = read_args(run)
    epochs = read_metrics(run)
    layer = arguments.get("layer", "?")
    row = {
        "run": name,
        "finished": is_finished(run),
        "layer": layer,
        "K": int(arguments["K"]) if layer in LAYERS_USING_K and "K" in arguments else NOT_APPLICABLE,
        "sampling": sampling_label(arguments),
        "convolution_type": arguments.get("convolution_type", "?") if layer in LAYERS_WITH_CONVNN else NOT_APPLICABLE,
        **read_model_summary(run),
        "epochs": f"{len(epochs)}/{arguments.get('num_epochs', '?')}",
        "best_top1": None, "best_epoch": None, "final_top1": None, "average_epoch_seconds": None,
        "history": epochs,
    }
    if epochs:
        best = best_record(epochs)  # the rule of the run's own "Max Accuracy" line
        row.update(best_top1=best["test_top1"], best_epoch=int(best["epoch"]), final_top1=epochs[-1]["test_top1"],
                   average_epoch_seconds=sum(record["epoch_seconds"] for record in epochs) / len(epochs))
    return row


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
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _save(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)  # the Agg canvas renders without any display
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)


def plot_top1_against_epoch(path: str, rows: List[Dict]) -> None:
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    for row in rows:
        if row["history"]:
            label = row["run"] if row["finished"] else row["run"] + UNFINISHED_MARK
            axes.plot([r["epoch"] for r in row["history"]], [r["test_top1"] for r in row["history"]],
                      marker="o", markersize=3, label=label, linestyle="-" if row["finished"] else "--")
    axes.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="Test top-1 accuracy per epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(figure, path)


def plot_best_against_k(path: str, rows: List[Dict]) -> None:
    """One line per layer and sampling over K; layers that ignore K are horizontal dashed lines."""
    figure = Figure(figsize=(7, 4.5))
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
        axes.plot([k for k, _ in points], [best for _, best in points], marker="o", label=label)
    for row in flat:
        axes.axhline(row["best_top1"], linestyle="--", color="grey", alpha=0.7)
        axes.annotate(row["run"], (0, row["best_top1"]), xycoords=("axes fraction", "data"),
                      textcoords="offset points", xytext=(4, 3), fontsize="small", color="grey")
    axes.set(xlabel="K (neighbours per token)", ylabel="best test top-1 accuracy (%)",
             title="Best test top-1 against K")
    axes.set_xticks(sorted({k for points in lines.values() for k, _ in points}))
    axes.grid(True, alpha=0.3)
    if lines:
        axes.legend(fontsize="small")
    _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Table and plots comparing training runs.")
    parser.add_argument("directories", nargs="+", help="run directories, or directories with runs below them")
    parser.add_argument("--out_dir", default=None, help="where the table and plots go (default: the first directory)")
    args = parser.parse_args(argv)

    rows, not_runs = [], []
    for argument in args.directories:
        rows += [summarise_run(run, run_name(run, argument)) for run in find_runs(argument, not_runs)]
    for path in not_runs:
        print(f"summarize.py: skipped {path}: not a run directory (no args.txt) and no run below it", file=sys.stderr)
    if not rows:
        print("summarize.py: no runs found", file=sys.stderr)
        return 1
    rows.sort(key=table_order)

    out_dir = args.out_dir or args.directories[0]
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    write_csv(os.path.join(out_dir, "summary.csv"), rows)
    plot_top1_against_epoch(os.path.join(out_dir, "top1_vs_epoch.png"), rows)
    plot_best_against_k(os.path.join(out_dir, "best_top1_vs_K.png"), rows)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
