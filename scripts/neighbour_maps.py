"""Draw which patches each ConvNN-Attention layer of a trained ViT selects, and where each attention layer attends.

For a few test images, one PNG per image: a row per query token and a column per layer. A ConvNN-Attention
panel (also the ConvNN part of ``BranchConv`` / ``BranchAttention`` layers) shows the image with the query
patch outlined in cyan and its ``K`` selected patches outlined in orange, numbered by slot (0 = best); with
``random`` or ``spatial`` sampling the candidate patches are shaded white. An attention panel shades the
patches by the query's attention probabilities, averaged over the heads. The class token has no patch: as a
query its row is labelled ``query CLS``; a ConvNN panel whose query selected the class token says so in a
corner badge, and an attention panel gives the probability on the class token there.

With ``--summary`` it also measures, over the test split, for every layer (every head of attention
layers) the mean distance on the patch grid between a patch and the patches it selects or attends to, and
the share of the patches' selections or attention that is on the class token; for a convolution, the reach
of its kernel. It writes ``summary.png`` and ``summary.csv``.

The neighbours and probabilities are those the layers' own forward pass used (``record_selection``,
``record_attention``), not recomputed.

    python scripts/neighbour_maps.py ./Output/run --images 0 1 2 --queries 0 10 36 --summary
"""

import argparse
import csv
import io
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
from models.vit_layers import MultiHeadConv1dAttention, MultiHeadConvNNAttention, RecordsAttention  # noqa: E402
from run_files import atomic_write, atomic_write_text  # noqa: E402
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
# What the layers selected and where they attended
# ---------------------------------------------------------------------------------------------

ATTENTION, CONVNN, CONVOLUTION = "attention", "ConvNN", "convolution"
BRANCH_NAMES = {"convnn": "ConvNN", "attention": "attention", "conv1d": "Conv1d"}


@dataclass
class Selection:
    """What one ConvNN-Attention layer chose in its latest forward pass."""

    name: str
    neighbours: Tensor  # (B, N, K) token indices, slot 0 first
    weights: Tensor  # (B, N, K) aggregation weights
    candidates: Optional[Tensor]  # (r,) candidate tokens of sampled modes, None for "all"


@dataclass
class AttentionMap:
    """The softmax attention probabilities of one attention layer's latest forward pass."""

    name: str
    probabilities: Tensor  # (B, H, N, N): query rows, key columns


def layer_kind(module: nn.Module) -> Optional[str]:
    """How a token-mixing layer is measured: by its selections, its attention probabilities or its kernel's
    reach; None for modules that mix no tokens themselves (the branching wrappers, linear maps)."""
    if isinstance(module, MultiHeadConvNNAttention):
        return CONVNN
    if isinstance(module, RecordsAttention):
        return ATTENTION
    if isinstance(module, MultiHeadConv1dAttention):
        return CONVOLUTION
    return None


def measured_layers(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(name, layer, kind)`` of every token-mixing layer of ``model`` in forward order; a branching layer
    gives its two branches."""
    return [(name, module, layer_kind(module)) for name, module in model.named_modules() if layer_kind(module)]


def convnn_layers(model: nn.Module) -> List[Tuple[str, MultiHeadConvNNAttention]]:
    """Every ConvNN-Attention layer of ``model`` in forward order, the ConvNN part of branching layers included."""
    return [(name, module) for name, module, kind in measured_layers(model) if kind == CONVNN]


def attention_layers(model: nn.Module) -> List[Tuple[str, RecordsAttention]]:
    """Every layer of ``model`` that forms softmax attention probabilities, in forward order."""
    return [(name, module) for name, module, kind in measured_layers(model) if kind == ATTENTION]


@contextmanager
def recording(model: nn.Module):
    """Within the block every ConvNN-Attention layer records its selection and every attention layer its
    probabilities; recording is switched off and the recorded tensors are freed after."""
    convnn, attention = [layer for _, layer in convnn_layers(model)], [layer for _, layer in attention_layers(model)]
    for layer in convnn:
        layer.record_selection = True
    for layer in attention:
        layer.record_attention = True
    try:
        yield
    finally:
        for layer in convnn:
            layer.record_selection = False
            layer.last_selection = None
        for layer in attention:
            layer.record_attention = False
            layer.last_attention = None


@torch.no_grad()
def collect_records(model: nn.Module, inputs: Tensor) -> List[Union[Selection, AttentionMap]]:
    """Runs ``model(inputs)`` once and returns what each ConvNN-Attention layer selected and each attention
    layer's probabilities, one record per layer in forward order (Conv1d layers record nothing)."""
    records: List[Union[Selection, AttentionMap]] = []
    with recording(model):
        model(inputs)
        for name, layer, kind in measured_layers(model):
            if kind == CONVNN:
                neighbours, weights, candidates = layer.last_selection
                records.append(Selection(name, neighbours.cpu(), weights.cpu(),
                                         None if candidates is None else candidates.cpu()))
            elif kind == ATTENTION:
                records.append(AttentionMap(name, layer.last_attention.cpu()))
    return records


def collect_selections(model: nn.Module, inputs: Tensor) -> List[Selection]:
    """Runs ``model(inputs)`` once with every ConvNN-Attention layer recording its selection and
    returns those selections, one per layer in forward order."""
    return [record for record in collect_records(model, inputs) if isinstance(record, Selection)]


def block_index(name: str) -> Optional[int]:
    """``transformer_encoder.3.attention.convnn`` -> 3; None for a layer outside the encoder blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "transformer_encoder" else None


def branch_name(name: str) -> Optional[str]:
    """``transformer_encoder.3.attention.convnn`` -> ``ConvNN``; None for a layer that is no branch."""
    parts = name.split(".")
    return BRANCH_NAMES.get(parts[-1]) if len(parts) > 3 else None


def layer_label(name: str) -> str:
    """``transformer_encoder.3.attention.convnn`` -> ``block 3 (ConvNN branch)``."""
    block, branch = block_index(name), branch_name(name)
    if block is None:
        return name or "layer"
    return f"block {block}" + (f" ({branch} branch)" if branch else "")


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


def draw_attention_panel(axes, picture: Tensor, side: int, query: int, probabilities: Tensor) -> None:
    """One attention layer's probabilities ``(N,)`` for one query, averaged over its heads: shaded over the
    patches, with the class token's share in a corner badge."""
    faded = 0.5 + 0.5 * (picture - 0.5)
    axes.imshow(faded.numpy(), extent=(0, side, side, 0), interpolation="nearest")
    heat = probabilities[1:].view(side, side)
    axes.imshow(heat.numpy(), extent=(0, side, side, 0), interpolation="nearest", cmap="Oranges", alpha=0.6,
                vmin=0.0, vmax=max(heat.max().item(), 1e-12))
    _badge(axes, f"CLS: {probabilities[CLASS_TOKEN].item():.2f}")
    if query != CLASS_TOKEN:
        _outline(axes, query, side, QUERY_COLOUR, 2.5)
    axes.set_xticks([])
    axes.set_yticks([])


def draw_image_maps(path: str, picture: Tensor, records: List[Union[Selection, AttentionMap]], sample: int,
                    queries: Sequence[int], side: int, title: str) -> None:
    """A figure with a row per query and a column per layer for image ``sample`` of the batch."""
    rows, cols = len(queries), len(records)
    figure = Figure(figsize=(1.9 * cols + 0.6, 1.9 * rows + 0.6))
    axes_grid = figure.subplots(rows, cols, squeeze=False)
    for row, query in enumerate(queries):
        for col, record in enumerate(records):
            axes = axes_grid[row][col]
            if isinstance(record, Selection):
                draw_panel(axes, picture, side, query, record.neighbours[sample, query].tolist(), record.candidates)
            else:
                draw_attention_panel(axes, picture, side, query, record.probabilities[sample, :, query].mean(0))
            if row == 0:
                kind = "" if branch_name(record.name) or isinstance(record, Selection) else " (attention)"
                axes.set_title(layer_label(record.name) + kind, fontsize=8)
            if col == 0:
                axes.set_ylabel(query_label(query, side), fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)


def save_figure(figure: Figure, path: str, dpi: float) -> None:
    """Saves ``figure`` as a PNG that replaces ``path`` whole or not at all."""
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))


def draw_maps(model: ViT, args: argparse.Namespace, images: Sequence[int], queries: Sequence[int],
              out: str) -> List[str]:
    """Draws the neighbour and attention maps of the test images ``images``; returns the PNG paths."""
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
    records = collect_records(model, batch)
    paths = []
    for sample, index in enumerate(images):
        path = os.path.join(out, f"image_{index}.png")
        title = f"test image {index}\n{describe_run(args)}"
        if convnn_layers(model):
            title += f",\n{args.sampling_type} sampling, {args.similarity_type} similarity ({args.magnitude_type})"
        draw_image_maps(path, displayable(batch[sample], args.dataset), records, sample, queries, side, title)
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


def patch_distances(side: int) -> Tensor:
    """``(P, P)`` float64 Euclidean distance, in patches, between the (row, column) positions of every two patches."""
    coordinates = patch_coordinates(side)[1:].double()
    return torch.cdist(coordinates, coordinates)


@dataclass
class DistanceTally:
    """Running sums over the patch queries of one layer (or one head of it).

    A query spreads mass over the tokens: its attention probabilities, its count of selections of each token
    (ConvNN-Attention), or its count of kernel taps on each token (a convolution). The tally keeps the mass on
    patches, that mass times the patch's grid distance from the query, and the mass on the class token. The
    class token has no position: it is left out as a query and as a key, and its mass is reported apart.
    """

    distance_sum: float = 0.0
    patch_mass: float = 0.0
    class_token_mass: float = 0.0

    def add(self, mass: Tensor, distances: Tensor) -> None:
        """``mass``: ``(..., N, N)``, query rows and key columns in token order, summed over the leading
        dimensions; ``distances``: :func:`patch_distances` of the grid."""
        patch_queries = mass[..., 1:, :].double()
        self.distance_sum += (patch_queries[..., 1:] * distances).sum().item()
        self.patch_mass += patch_queries[..., 1:].sum().item()
        self.class_token_mass += patch_queries[..., 0].sum().item()

    def __add__(self, other: "DistanceTally") -> "DistanceTally":
        return DistanceTally(self.distance_sum + other.distance_sum, self.patch_mass + other.patch_mass,
                             self.class_token_mass + other.class_token_mass)

    @property
    def mean_distance(self) -> float:
        """The distance per unit of mass on patches: ``sum p * d / sum p`` over patch queries and patch keys."""
        return self.distance_sum / self.patch_mass if self.patch_mass else float("nan")

    @property
    def class_token_fraction(self) -> float:
        """The share of the patch queries' mass that is on the class token."""
        total = self.patch_mass + self.class_token_mass
        return self.class_token_mass / total if total else float("nan")


def selection_counts(neighbours: Tensor, seq_len: int) -> Tensor:
    """``(B, N, N)``: how many of each query's ``K`` slots hold each token."""
    counts = torch.zeros(*neighbours.shape[:-1], seq_len, dtype=torch.float64, device=neighbours.device)
    return counts.scatter_add_(-1, neighbours, torch.ones_like(neighbours, dtype=torch.float64))


def kernel_coverage(kernel_size: int, seq_len: int) -> Tensor:
    """``(N, N)``: 1 where the output at sequence position ``i`` of a 1-D convolution with padding ``same``
    reads position ``j``, i.e. ``i - (k - 1) // 2 <= j <= i + k // 2`` (PyTorch puts an even kernel's extra tap
    on the right); padding outside ``0..N-1`` is no token."""
    offsets = torch.arange(seq_len).view(1, -1) - torch.arange(seq_len).view(-1, 1)
    return ((offsets >= -((kernel_size - 1) // 2)) & (offsets <= kernel_size // 2)).double()


def _tally_recorded(tallies: List[DistanceTally], distances: Tensor, layer: nn.Module, _inputs, _output) -> None:
    """Forward hook: adds what ``layer`` recorded in this forward pass to its tallies (one per head) and frees it."""
    if isinstance(layer, MultiHeadConvNNAttention):
        neighbours = layer.last_selection[0]
        per_head = [selection_counts(neighbours, neighbours.shape[1])]
        layer.last_selection = None
    else:
        per_head = list(layer.last_attention.unbind(1))
        layer.last_attention = None
    if not tallies:
        tallies.extend(DistanceTally() for _ in per_head)
    for tally, mass in zip(tallies, per_head):
        tally.add(mass, distances.to(mass.device))


def layer_rows(name: str, kind: str, tallies: List[DistanceTally]) -> List[Dict]:
    """The summary rows of one layer: ``head`` ``all`` (its heads pooled), then one per head when it has several."""
    label = layer_label(name)

    def row(head, tally: DistanceTally, row_label: str) -> Dict:
        values = {"layer": name, "label": row_label, "kind": kind, "block": block_index(name), "head": head,
                  "mean_distance": tally.mean_distance, "class_token_fraction": tally.class_token_fraction}
        if kind == CONVNN:
            values.update(patch_selections=round(tally.patch_mass),
                          class_token_selections=round(tally.class_token_mass))
        return values

    pooled = row("all", sum(tallies, DistanceTally()), label)
    if len(tallies) == 1:
        return [{**pooled, "head_distances": []}]
    pooled["head_distances"] = [tally.mean_distance for tally in tallies]
    return [pooled] + [row(head, tally, f"{label} head {head}") for head, tally in enumerate(tallies)]


def summarise(model: ViT, args: argparse.Namespace, max_images: Optional[int], batch_size: int) -> List[Dict]:
    """Rows of the distance summary over the test split, for every token-mixing layer in forward order (see
    :class:`DistanceTally`): for a ConvNN-Attention layer the mass is its selections (the patch itself, at
    distance 0, counts when selected), for an attention layer its probabilities (per head), for a convolution
    its kernel's taps on the flattened token sequence (:func:`kernel_coverage`, the same for every image)."""
    side = grid_side(args)
    distances = patch_distances(side)
    layers = measured_layers(model)
    tallies: Dict[str, List[DistanceTally]] = {name: [] for name, _, _ in layers}
    recorded = [(name, layer) for name, layer, kind in layers if kind != CONVOLUTION]
    if recorded:
        split = load_test_split(args)
        if max_images is not None:
            split = Subset(split, range(min(max_images, len(split))))
        hooks = [layer.register_forward_hook(partial(_tally_recorded, tallies[name], distances))
                 for name, layer in recorded]
        try:
            with recording(model), torch.no_grad():
                for images, _ in DataLoader(split, batch_size=batch_size, shuffle=False):
                    model(images)
        finally:
            for hook in hooks:
                hook.remove()
    for name, layer, kind in layers:
        if kind == CONVOLUTION:
            tallies[name].append(DistanceTally())
            tallies[name][0].add(kernel_coverage(layer.conv.kernel_size[0], side * side + 1), distances)
    return [row for name, _, kind in layers for row in layer_rows(name, kind, tallies[name])]


def block_rows(rows: List[Dict]) -> List[Dict]:
    """The rows that pool a layer's heads: one per layer."""
    return [row for row in rows if row["head"] == "all"]


def reference_distances(side: int, K: Optional[int] = None) -> Dict[str, float]:
    """Yardsticks on the patch grid: the mean distance to a uniformly drawn patch, which spread-out attention
    tends to, and with ``K`` the mean distance to the K nearest patches (itself included), which a
    convolution would pick."""
    distances = patch_distances(side)
    references = {}
    if K is not None:
        nearest = distances.sort(dim=-1).values[:, : min(K, distances.shape[1])]
        references["K nearest patches"] = nearest.mean().item()
    references["uniform patch"] = distances.mean().item()
    return references


REFERENCE_STYLES = {"K nearest patches": "--", "uniform patch": ":"}
SUMMARY_COLUMNS = ["layer", "kind", "block", "head", "mean_distance", "class_token_fraction", "patch_selections",
                   "class_token_selections"]


def write_summary_csv(path: str, rows: List[Dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def summary_table(rows: List[Dict]) -> str:
    lines = [f"{'layer':<30} {'mean distance':>13} {'CLS fraction':>12}  per head"]
    for row in block_rows(rows):
        heads = " ".join(f"{value:.3f}" for value in row["head_distances"])
        lines.append(f"{row['label']:<30} {row['mean_distance']:>13.3f} {row['class_token_fraction']:>12.3f}  {heads}")
    return "\n".join(lines)


def series_name(row: Dict) -> str:
    """The line a summary row belongs to in the figures: the layer kind, or the branch of a branching layer."""
    branch = branch_name(row["layer"])
    if branch:
        return f"{branch} branch"
    return {ATTENTION: "attention", CONVNN: "ConvNN", CONVOLUTION: "Conv1d"}[row["kind"]]


def draw_summary(path: str, rows: List[Dict], references: Dict[str, float], title: str) -> None:
    """Distance and class-token share per block, a line per branch; the heads of attention layers as dots."""
    # Laid out at the dpi it is saved at: text does not scale exactly with the dpi.
    figure = Figure(figsize=(8.0, 3.8), dpi=SUMMARY_DPI)
    distance_axes, share_axes = figure.subplots(1, 2)
    series: Dict[str, List[Dict]] = {}
    for row in block_rows(rows):
        series.setdefault(series_name(row), []).append(row)
    width = 0.8 / len(series)
    for number, (name, members) in enumerate(series.items()):
        colour = f"C{number}"
        blocks = [row["block"] for row in members]
        distance_axes.plot(blocks, [row["mean_distance"] for row in members], marker="o", color=colour, label=name)
        for row in members:
            distance_axes.scatter([row["block"]] * len(row["head_distances"]), row["head_distances"], s=8,
                                  color=colour, alpha=0.5)
        share_axes.bar([block + (number - (len(series) - 1) / 2) * width for block in blocks],
                       [row["class_token_fraction"] for row in members], width=width, color=colour, label=name)
    for name, value in references.items():
        distance_axes.axhline(value, color="grey", linestyle=REFERENCE_STYLES[name], label=f"{name}: {value:.2f}")
    drawn = [row["mean_distance"] for row in rows if not math.isnan(row["mean_distance"])] + list(references.values())
    # Headroom above the highest line keeps the legend off it.
    distance_axes.set(ylabel="mean distance (patches)", ylim=(0, 1.3 * max(drawn)))
    distance_axes.set_title("Distance from a patch to the patches\nit selects or attends to (dots: heads)",
                            fontsize=9)
    distance_axes.legend(fontsize=7)
    share_axes.set(ylabel="fraction", ylim=(0, 1))
    share_axes.set_title("Share of the patches' selections\nor attention on the class token", fontsize=9)
    blocks = sorted({row["block"] for row in rows})
    for axes in (distance_axes, share_axes):
        axes.set_xticks(blocks, [str(block) for block in blocks], fontsize=7)
        axes.set_xlabel("block", fontsize=8)
        axes.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, SUMMARY_DPI)


def describe_run(args: argparse.Namespace) -> str:
    """The layer and the options that set its reach, e.g. ``ConvNNAttention K=9``, ``Conv1d kernel 9``."""
    layer = args.layer
    if layer in ("ConvNNAttention", "KvtAttention", "BranchConv", "BranchAttention"):
        return f"{layer} K={args.K}"
    if layer == "Conv1d":
        return f"{layer} kernel {args.kernel_size}"
    if layer == "LocalAttention":
        return f"{layer} window {args.local_window}"
    if layer == "SparseAttention":
        return f"{layer} {args.sparse_mode}" + ("" if args.sparse_mode == "all" else f" c={args.sparse_context_window}")
    return layer


def summary_title(args: argparse.Namespace) -> str:
    if args.layer in ("ConvNNAttention", "BranchConv", "BranchAttention"):
        return f"{describe_run(args)}, {args.sampling_type} sampling, {args.similarity_type} similarity"
    return describe_run(args)


def write_summary(model: ViT, args: argparse.Namespace, out: str, max_images: Optional[int],
                  batch_size: int) -> Tuple[List[str], List[Dict]]:
    rows = summarise(model, args, max_images, batch_size)
    references = reference_distances(grid_side(args), args.K if convnn_layers(model) else None)
    print(summary_table(rows))
    print("references: " + ", ".join(f"{name} {value:.3f}" for name, value in references.items()))
    csv_path, png_path = os.path.join(out, "summary.csv"), os.path.join(out, "summary.png")
    write_summary_csv(csv_path, rows)
    draw_summary(png_path, rows, references, summary_title(args))
    return [png_path, csv_path], rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a run's output directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--images", type=int, nargs="*", default=None,
                        help="indices of test images to draw; give none to draw no maps (default: image 0, or none "
                             "for a model without ConvNN-Attention or attention layers)")
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
    drawable = convnn_layers(model) or attention_layers(model)
    if options.images and not drawable:
        parser.error(f"--images: the {args.layer} model has no ConvNN-Attention or attention layer to draw; "
                     "give --images with no index (and --summary for its kernel's reach)")
    images = options.images if options.images is not None else ([0] if drawable else [])
    run_directory = options.run if os.path.isdir(options.run) else os.path.dirname(os.path.abspath(options.run))
    out = options.out or os.path.join(run_directory, "neighbour_maps")
    os.makedirs(out, exist_ok=True)
    queries = options.queries if options.queries is not None else default_queries(grid_side(args))
    try:
        paths = draw_maps(model, args, images, queries, out) if images else []
        if options.summary:
            paths += write_summary(model, args, out, options.max_images, options.batch_size)[0]
    except (ValueError, dataset.DatasetUnavailableError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
