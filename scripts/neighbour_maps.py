"""Draw which patches each ConvNN-Attention layer of a trained ViT selects as neighbours.

For a few test images, one PNG per image: a row per query token and a column per ConvNN-Attention
layer (the ConvNN part of ``BranchConv`` / ``BranchAttention`` layers). Each panel shows the image
with the query patch outlined in cyan and its ``K`` selected patches outlined in orange, numbered by
slot (0 = best). With ``random`` or ``spatial`` sampling the candidate patches are shaded white.
The class token has no patch: as a query its row is labelled ``query CLS``, and a panel whose query
selected the class token says so in a corner badge.

With ``--summary`` it also measures, over the test split, the mean distance on the patch grid
between a patch and the patches it selects, per layer, and the share of the patches' selections that
are the class token, and writes ``summary.png`` and ``summary.csv``.

The neighbours are those the layers' own forward pass used (``record_selection``), not recomputed.

    python scripts/neighbour_maps.py ./Output/run --images 0 1 2 --queries 0 10 36 --summary
"""

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import vit_main  # noqa: E402
from models.vit import ViT  # noqa: E402
from models.vit_layers import MultiHeadConvNNAttention  # noqa: E402
from settings import CommandLineParser  # noqa: E402

CLASS_TOKEN = 0
QUERY_COLOUR = "cyan"
SELECTED_COLOUR = "orange"
SUMMARY_DPI = 90


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


def checkpoint_path(run: str) -> str:
    """The checkpoint of ``run``: the path itself when it is a file, else the run's best.pt, else last.pt."""
    if os.path.isfile(run):
        return run
    for name in ("best.pt", "last.pt"):
        candidate = os.path.join(run, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{run}: neither a checkpoint file nor a run directory holding best.pt or last.pt")


def read_args_file(path: str) -> argparse.Namespace:
    """The flags of a run from its ``args.txt`` (``name: value`` lines), typed as the training parser types them."""
    parser = vit_main.build_parser()
    args = parser.parse_args([])
    actions = {action.dest: action for action in parser._actions}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            name, _, text = line.rstrip("\n").partition(": ")
            action = actions.get(name)
            if action is None:
                continue
            if text == "None":
                value = None
            elif isinstance(action.const, bool) and action.type is None:  # store_true switches
                value = text == "True"
            else:
                value = action.type(text) if action.type else text
            setattr(args, name, value)
    return args


def run_arguments(checkpoint: Dict, checkpoint_file: str) -> argparse.Namespace:
    """The run's flags: those stored in the checkpoint, else the args.txt beside it (bare state dicts)."""
    if "args" in checkpoint:
        args = vit_main.build_parser().parse_args([])
        vars(args).update(checkpoint["args"])
        return args
    args_file = os.path.join(os.path.dirname(os.path.abspath(checkpoint_file)), "args.txt")
    if not os.path.isfile(args_file):
        raise FileNotFoundError(f"{checkpoint_file} stores no run arguments and there is no {args_file}")
    return read_args_file(args_file)


def load_model(run: str) -> Tuple[ViT, argparse.Namespace]:
    """The run's ViT with its checkpoint weights, in evaluation mode (sampling is then deterministic)."""
    path = checkpoint_path(run)
    checkpoint = checkpoints.load_checkpoint(path)
    args = run_arguments(checkpoint, path)
    img_size = dataset.image_size(args.dataset, args.resize)
    num_classes = dataset.num_classes(args.dataset, args.data_path)
    model = ViT(**vit_main.model_config(args, img_size, num_classes))
    model.load_state_dict(checkpoints.model_weights(checkpoint))
    return model.eval(), args


def load_test_split(args: argparse.Namespace):
    _, test_split, _, _ = dataset.load_datasets(args.dataset, args.data_path, args.resize, augment=False,
                                                need_train=False)
    return test_split


# ---------------------------------------------------------------------------------------------
# What the layers selected
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What one ConvNN-Attention layer chose in its latest forward pass."""

    name: str
    neighbours: Tensor  # (B, N, K) token indices, slot 0 first
    weights: Tensor  # (B, N, K) aggregation weights
    candidates: Optional[Tensor]  # (r,) candidate tokens of sampled modes, None for "all"


def convnn_layers(model: nn.Module) -> List[Tuple[str, MultiHeadConvNNAttention]]:
    """Every ConvNN-Attention layer of ``model`` in forward order, the ConvNN part of branching layers included."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MultiHeadConvNNAttention)]


@torch.no_grad()
def collect_selections(model: nn.Module, inputs: Tensor) -> List[Selection]:
    """Runs ``model(inputs)`` once with every ConvNN-Attention layer recording its selection and
    returns those selections, one per layer in forward order. Recording is switched off again after."""
    layers = convnn_layers(model)
    for _, layer in layers:
        layer.record_selection = True
    try:
        model(inputs)
        selections = []
        for name, layer in layers:
            neighbours, weights, candidates = layer.last_selection
            selections.append(Selection(name, neighbours.cpu(), weights.cpu(),
                                        None if candidates is None else candidates.cpu()))
    finally:
        for _, layer in layers:
            layer.record_selection = False
            layer.last_selection = None  # free the recorded tensors
    return selections


def layer_label(name: str) -> str:
    """``transformer_encoder.3.attention.convnn`` -> ``block 3 (ConvNN branch)``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "transformer_encoder":
        return f"block {parts[1]}" + (" (ConvNN branch)" if parts[-1] == "convnn" else "")
    return name or "layer"


# ---------------------------------------------------------------------------------------------
# Geometry of the patch grid
# ---------------------------------------------------------------------------------------------


def grid_side(args: argparse.Namespace) -> int:
    return dataset.image_size(args.dataset, args.resize) // args.patch_size


def patch_position(token: int, side: int) -> Tuple[int, int]:
    """(row, column) of patch token ``token`` (1-based: token 0 is the class token)."""
    return divmod(token - 1, side)


def default_queries(side: int) -> List[int]:
    """The class token and four patches spread over the grid: near the top-left, the centre, near the
    bottom-right, and the top-right corner (to see how a border patch chooses)."""
    spots = [(side // 4, side // 4), (side // 2, side // 2), (3 * side // 4, 3 * side // 4), (0, side - 1)]
    patches = [1 + row * side + col for row, col in spots]
    return [CLASS_TOKEN] + list(dict.fromkeys(patches))


# ---------------------------------------------------------------------------------------------
# Neighbour maps
# ---------------------------------------------------------------------------------------------


def displayable(image: Tensor, dataset_name: str) -> Tensor:
    """A normalised ``(3, H, W)`` image back in [0, 1], as ``(H, W, 3)`` for ``imshow``."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in dataset.NORMALISATION[dataset_name])
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)


def _outline(axes, token: int, side: int, colour: str, width: float) -> None:
    row, col = patch_position(token, side)
    axes.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor=colour, linewidth=width))


def _shade_candidates(axes, candidates: Optional[Tensor], side: int) -> None:
    if candidates is None:
        return
    for token in candidates.tolist():
        if token != CLASS_TOKEN:
            row, col = patch_position(token, side)
            axes.add_patch(Rectangle((col, row), 1, 1, facecolor="white", alpha=0.6, edgecolor="none"))


def _badge(axes, text: str) -> None:
    axes.text(0.02, 0.98, text, transform=axes.transAxes, va="top", ha="left", fontsize=7,
              bbox=dict(boxstyle="round,pad=0.2", facecolor="yellow", alpha=0.9))


def draw_panel(axes, picture: Tensor, side: int, query: int, slots: Sequence[int],
               candidates: Optional[Tensor]) -> None:
    """One layer's choice for one query: candidates shaded, query outlined, selected patches numbered."""
    # Faded towards grey so that the outlines and slot numbers stay readable on busy images.
    faded = 0.5 + 0.5 * (picture - 0.5)
    axes.imshow(faded.numpy(), extent=(0, side, side, 0), interpolation="nearest")
    _shade_candidates(axes, candidates, side)
    slots_of_token: Dict[int, List[int]] = {}
    for slot, token in enumerate(slots):
        slots_of_token.setdefault(token, []).append(slot)
    for token, token_slots in slots_of_token.items():
        label = ",".join(map(str, token_slots))
        if token == CLASS_TOKEN:
            _badge(axes, f"CLS: slot {label}")
            continue
        row, col = patch_position(token, side)
        axes.add_patch(Rectangle((col, row), 1, 1, facecolor=SELECTED_COLOUR, alpha=0.55, edgecolor="none"))
        _outline(axes, token, side, SELECTED_COLOUR, 1.5)
        axes.text(col + 0.5, row + 0.5, label, ha="center", va="center", fontsize=7, color="black",
                  fontweight="bold")
    if query != CLASS_TOKEN:
        _outline(axes, query, side, QUERY_COLOUR, 2.5)
    if candidates is not None and CLASS_TOKEN in candidates.tolist():
        axes.text(0.98, 0.02, "CLS is a candidate", transform=axes.transAxes, ha="right", va="bottom", fontsize=6,
                  color="white")
    axes.set_xticks([])
    axes.set_yticks([])


def query_label(query: int, side: int) -> str:
    if query == CLASS_TOKEN:
        return "query CLS"
    row, col = patch_position(query, side)
    return f"query {query}\n(row {row}, col {col})"


def draw_image_maps(path: str, picture: Tensor, selections: List[Selection], sample: int, queries: Sequence[int],
                    side: int, title: str) -> None:
    """A figure with a row per query and a column per layer for image ``sample`` of the batch."""
    rows, cols = len(queries), len(selections)
    figure = Figure(figsize=(1.9 * cols + 0.6, 1.9 * rows + 0.6))
    axes_grid = figure.subplots(rows, cols, squeeze=False)
    for row, query in enumerate(queries):
        for col, selection in enumerate(selections):
            axes = axes_grid[row][col]
            draw_panel(axes, picture, side, query, selection.neighbours[sample, query].tolist(), selection.candidates)
            if row == 0:
                axes.set_title(layer_label(selection.name), fontsize=8)
            if col == 0:
                axes.set_ylabel(query_label(query, side), fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def draw_maps(model: ViT, args: argparse.Namespace, images: Sequence[int], queries: Sequence[int],
              out: str) -> List[str]:
    """Draws the neighbour maps of the test images ``images``; returns the PNG paths."""
    side = grid_side(args)
    tokens = side * side + 1
    bad = [query for query in queries if not 0 <= query < tokens]
    if bad:
        raise ValueError(f"--queries: {bad} outside 0..{tokens - 1} (0 is the class token, 1..{tokens - 1} "
                         f"the patches in raster order on the {side}x{side} grid)")
    split = load_test_split(args)
    missing = [index for index in images if not 0 <= index < len(split)]
    if missing:
        raise ValueError(f"--images: {missing} outside the {len(split)} test images 0..{len(split) - 1}")
    batch = torch.stack([split[index][0] for index in images])
    selections = collect_selections(model, batch)
    paths = []
    for sample, index in enumerate(images):
        path = os.path.join(out, f"image_{index}.png")
        title = (f"test image {index}\n{args.layer}, {args.sampling_type} sampling, K={args.K},\n"
                 f"{args.similarity_type} similarity ({args.magnitude_type})")
        draw_image_maps(path, displayable(batch[sample], args.dataset), selections, sample, queries, side, title)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Summary over the test split
# ---------------------------------------------------------------------------------------------


def patch_coordinates(side: int) -> Tensor:
    """``(N, 2)`` float (row, column) of every token; the class token's row is unused."""
    tokens = torch.arange(side * side + 1)
    rows, cols = (tokens - 1).div(side, rounding_mode="floor"), (tokens - 1) % side
    return torch.stack([rows, cols], dim=-1).float()


@dataclass
class LayerTally:
    """Running sums of one layer's selections made by patch queries."""

    distance_sum: float = 0.0
    patch_picks: int = 0
    class_token_picks: int = 0

    def add(self, neighbours: Tensor, coordinates: Tensor) -> None:
        picks = neighbours[:, 1:, :]  # queries that are patches; the class token has no position
        is_patch = picks != CLASS_TOKEN
        query_xy = coordinates[1:].view(1, -1, 1, 2)
        distances = (coordinates[picks] - query_xy).norm(dim=-1)
        self.distance_sum += distances[is_patch].sum().item()
        self.patch_picks += int(is_patch.sum())
        self.class_token_picks += int((~is_patch).sum())

    def row(self) -> Dict:
        total = self.patch_picks + self.class_token_picks
        return {
            "mean_distance": self.distance_sum / self.patch_picks if self.patch_picks else float("nan"),
            "class_token_fraction": self.class_token_picks / total if total else float("nan"),
            "patch_selections": self.patch_picks,
            "class_token_selections": self.class_token_picks,
        }


def summarise(model: ViT, args: argparse.Namespace, max_images: Optional[int], batch_size: int) -> List[Dict]:
    """Per layer: the mean grid distance between a patch and the patches it selects (the patch itself,
    at distance 0, counts when selected) and the share of patch selections that are the class token."""
    split = load_test_split(args)
    if max_images is not None:
        split = Subset(split, range(min(max_images, len(split))))
    coordinates = patch_coordinates(grid_side(args))
    tallies: Optional[List[LayerTally]] = None
    names: List[str] = []
    for images, _ in DataLoader(split, batch_size=batch_size, shuffle=False):
        selections = collect_selections(model, images)
        if tallies is None:
            tallies, names = [LayerTally() for _ in selections], [s.name for s in selections]
        for tally, selection in zip(tallies, selections):
            tally.add(selection.neighbours, coordinates)
    return [{"layer": name, "label": layer_label(name), **tally.row()} for name, tally in zip(names, tallies)]


def reference_distances(side: int, K: int) -> Dict[str, float]:
    """Two yardsticks on the patch grid: the mean distance to the K nearest patches (itself included),
    which a convolution would pick, and to a uniformly drawn patch, which spread-out attention tends to."""
    coordinates = patch_coordinates(side)[1:]
    distances = torch.cdist(coordinates, coordinates)
    nearest = distances.sort(dim=-1).values[:, : min(K, distances.shape[1])]
    return {"K nearest patches": nearest.mean().item(), "uniform patch": distances.mean().item()}


def write_summary_csv(path: str, rows: List[Dict]) -> None:
    columns = ["layer", "mean_distance", "class_token_fraction", "patch_selections", "class_token_selections"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(rows: List[Dict]) -> str:
    lines = [f"{'layer':<28} {'mean distance':>13} {'CLS fraction':>12}"]
    lines += [f"{row['label']:<28} {row['mean_distance']:>13.3f} {row['class_token_fraction']:>12.3f}" for row in rows]
    return "\n".join(lines)


def draw_summary(path: str, rows: List[Dict], references: Dict[str, float], title: str) -> None:
    labels = [row["label"].replace(" (ConvNN branch)", "\n(ConvNN)") for row in rows]
    positions = range(len(rows))
    # Laid out at the dpi it is saved at: text does not scale exactly with the dpi.
    figure = Figure(figsize=(max(7.0, 1.1 * len(rows) + 2.5), 3.8), dpi=SUMMARY_DPI)
    distance_axes, share_axes = figure.subplots(1, 2)
    distance_axes.plot(positions, [row["mean_distance"] for row in rows], marker="o", color="tab:blue")
    for (name, value), style in zip(references.items(), ("--", ":")):
        distance_axes.axhline(value, color="grey", linestyle=style, label=f"{name}: {value:.2f}")
    distance_axes.set(ylabel="mean distance (patches)", ylim=(0, None))
    distance_axes.set_title("Distance from a patch\nto its selected patches", fontsize=10)
    distance_axes.legend(fontsize=7)
    share_axes.bar(positions, [row["class_token_fraction"] for row in rows], color="tab:orange")
    share_axes.set(ylabel="fraction", ylim=(0, 1))
    share_axes.set_title("Share of the patches' selections\nthat pick the class token", fontsize=10)
    for axes in (distance_axes, share_axes):
        axes.set_xticks(list(positions), labels, fontsize=7)
        axes.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=SUMMARY_DPI)


def write_summary(model: ViT, args: argparse.Namespace, out: str, max_images: Optional[int],
                  batch_size: int) -> Tuple[List[str], List[Dict]]:
    rows = summarise(model, args, max_images, batch_size)
    references = reference_distances(grid_side(args), args.K)
    print(summary_table(rows))
    print("references: " + ", ".join(f"{name} {value:.3f}" for name, value in references.items()))
    csv_path, png_path = os.path.join(out, "summary.csv"), os.path.join(out, "summary.png")
    write_summary_csv(csv_path, rows)
    title = f"{args.layer}, {args.sampling_type} sampling, K={args.K}, {args.similarity_type} similarity"
    draw_summary(png_path, rows, references, title)
    return [png_path, csv_path], rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a run's output directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--images", type=int, nargs="*", default=[0],
                        help="indices of test images to draw; give none to draw no maps")
    parser.add_argument("--queries", type=int, nargs="+", default=None,
                        help="query tokens: 0 is the class token, 1.. the patches in raster order "
                             "(default: the class token and four patches spread over the grid)")
    parser.add_argument("--out", default=None, help="output directory (default: <run directory>/neighbour_maps)")
    parser.add_argument("--summary", action="store_true", help="also summarise the selections over the test split")
    parser.add_argument("--max_images", type=int, default=None, help="summary: use only the first N test images")
    parser.add_argument("--batch_size", type=int, default=100, help="summary: images per forward pass")
    parser.add_argument("--data_path", default=None, help="dataset directory (default: the run's --data_path)")
    return parser


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Draws the maps (and the summary); prints and returns the paths of the files written."""
    parser = build_parser()
    options = parser.parse_args(argv)
    for flag in ("max_images", "batch_size"):
        if getattr(options, flag) is not None and getattr(options, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(options, flag)}")
    try:
        model, args = load_model(options.run)
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as error:
        parser.error(str(error))
    if options.data_path is not None:
        args.data_path = options.data_path
    if not convnn_layers(model):
        parser.error(f"{options.run}: the {args.layer} model has no ConvNN-Attention layer to show")
    run_directory = options.run if os.path.isdir(options.run) else os.path.dirname(os.path.abspath(options.run))
    out = options.out or os.path.join(run_directory, "neighbour_maps")
    os.makedirs(out, exist_ok=True)
    queries = options.queries if options.queries is not None else default_queries(grid_side(args))
    try:
        paths = draw_maps(model, args, options.images, queries, out) if options.images else []
        if options.summary:
            paths += write_summary(model, args, out, options.max_images, options.batch_size)[0]
    except (ValueError, dataset.DatasetUnavailableError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
