"""Draw the convolution-to-attention spectrum: the mean patch-grid distance per block of several runs on one figure.

For every run it measures what ``scripts/neighbour_maps.py RUN --summary`` measures (the distance from a patch
to the patches a layer selects, attends to, or reaches with its kernel, and the share on the class token) and
draws one line per run (per branch for branching layers), labelled by layer and ``K`` (or kernel, window).
All runs must share one patch grid: distances in patches compare only there.

    python scripts/spectrum.py ./Output/attention ./Output/convnn_k4 ./Output/convnn_k9 ./Output/conv1d \\
        --output spectrum.png --max_images 200
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
from scripts import neighbour_maps  # noqa: E402
from settings import CommandLineParser  # noqa: E402

DPI = 90
MARKERS = {neighbour_maps.ATTENTION: "o", neighbour_maps.CONVNN: "s", neighbour_maps.CONVOLUTION: "^"}


def run_series(label: str, rows: List[Dict]) -> List[Tuple[str, str, List[Dict]]]:
    """``(legend label, kind, rows per block)`` of one run: one series, or one per branch of a branching layer."""
    series: Dict[str, List[Dict]] = {}
    for row in neighbour_maps.block_rows(rows):
        series.setdefault(neighbour_maps.branch_name(row["layer"]) or "", []).append(row)
    return [(f"{label} ({branch} branch)" if branch else label, members[0]["kind"], members)
            for branch, members in series.items()]


def distinct_labels(labels: List[str], runs: List[str]) -> List[str]:
    """The labels, each that several runs share followed by its run's directory name."""
    return [f"{label} [{os.path.basename(os.path.normpath(run))}]" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs)]


def draw_spectrum(path: str, measured: List[Tuple[str, List[Dict]]], uniform_distance: float, title: str) -> None:
    """Distance and class-token share per block, a line per run (and branch), markers by kind of layer."""
    figure = Figure(figsize=(10.0, 4.2), dpi=DPI, layout="constrained")
    distance_axes, share_axes = figure.subplots(1, 2)
    number = 0
    for label, rows in measured:
        for name, kind, members in run_series(label, rows):
            blocks = [row["block"] for row in members]
            style = dict(marker=MARKERS[kind], color=f"C{number % 10}", label=name)
            distance_axes.plot(blocks, [row["mean_distance"] for row in members], **style)
            share_axes.plot(blocks, [row["class_token_fraction"] for row in members], **style)
            number += 1
    distance_axes.axhline(uniform_distance, color="grey", linestyle=":",
                          label=f"uniform patch: {uniform_distance:.2f}")
    distance_axes.set(ylabel="mean distance (patches)", ylim=(0, None))
    distance_axes.set_title("Distance from a patch to the patches it draws on", fontsize=9)
    share_axes.set(ylabel="fraction", ylim=(0, 1))
    share_axes.set_title("Share on the class token", fontsize=9)
    for axes in (distance_axes, share_axes):
        axes.set_xlabel("block", fontsize=8)
        axes.grid(True, alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = distance_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=7)
    figure.suptitle(title, fontsize=9)
    neighbour_maps.save_figure(figure, path, DPI)


def spectrum_table(measured: List[Tuple[str, List[Dict]]]) -> str:
    """A line per run (and branch): its mean distance per block, then its class-token share per block."""
    lines = []
    for label, rows in measured:
        for name, _, members in run_series(label, rows):
            distances = " ".join(f"{row['mean_distance']:.3f}" for row in members)
            shares = " ".join(f"{row['class_token_fraction']:.3f}" for row in members)
            lines.append(f"{name}: distance per block {distances}; class-token share {shares}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="runs' output directories (each uses best.pt, else last.pt) or "
                                                "checkpoint files")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N test images of each run")
    parser.add_argument("--batch_size", type=int, default=100, help="images per forward pass")
    parser.add_argument("--data_path", default=None, help="dataset directory (default: each run's --data_path)")
    return parser


def main(argv: Optional[List[str]] = None) -> str:
    """Measures the runs, draws the figure, prints the numbers and the figure's path, and returns the path."""
    parser = build_parser()
    options = parser.parse_args(argv)
    for flag in ("max_images", "batch_size"):
        if getattr(options, flag) is not None and getattr(options, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(options, flag)}")
    directory = os.path.dirname(os.path.abspath(options.output))
    if not os.path.isdir(directory):
        parser.error(f"--output: the directory {directory} does not exist")
    loaded = []
    for run in options.runs:
        try:
            model, args = neighbour_maps.load_model(run)
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as error:
            parser.error(str(error))
        if options.data_path is not None:
            args.data_path = options.data_path
        loaded.append((run, model, args))
    sides = [neighbour_maps.grid_side(args) for _, _, args in loaded]
    for (run, _, _), side in zip(loaded, sides):
        if side != sides[0]:
            parser.error(f"{run}: its patch grid is {side}x{side}, that of {options.runs[0]} {sides[0]}x{sides[0]}; "
                         "distances in patches compare only on one grid (same image size and --patch_size)")
    measured = []
    try:
        for _, model, args in loaded:
            measured.append(neighbour_maps.summarise(model, args, options.max_images, options.batch_size))
    except (ValueError, dataset.DatasetUnavailableError) as error:
        parser.error(str(error))
    labels = distinct_labels([neighbour_maps.describe_run(args) for _, _, args in loaded], options.runs)
    uniform = neighbour_maps.reference_distances(sides[0])["uniform patch"]
    title = f"Convolution-to-attention spectrum on the {sides[0]}x{sides[0]} patch grid ({loaded[0][2].dataset})"
    draw_spectrum(options.output, list(zip(labels, measured)), uniform, title)
    print(spectrum_table(list(zip(labels, measured))))
    print(f"uniform patch: {uniform:.3f}")
    print(options.output)
    return options.output


if __name__ == "__main__":
    main()
