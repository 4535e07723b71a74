"""The options of the token-mixing layers, each declared once: name, type, default, help text and choices.

A layer names the options it takes (its ``options`` attribute); the command line turns this table into
flags (``--K``, ...) and a layer's constructor takes its defaults from here. Most ranges depend on the
sequence a layer mixes and are checked by the layer alone; the bounds declared here are refused on the
command line whatever ``--layer`` is, and by the layers that take the option.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

SAMPLING_TYPES = ("all", "random", "spatial")
MAGNITUDE_TYPES = ("cosine", "euclidean", "matmul")
CONVOLUTION_TYPES = ("standard", "depthwise", "depthwise-separable")
SIMILARITY_TYPES = ("Col", "Loc", "Loc_Col")
AGGREGATION_TYPES = ("Col", "Loc_Col")
SPARSE_MODES = ("all", "local", "strided")


@dataclass(frozen=True)
class LayerOption:
    name: str
    type: type
    default: object
    help: str
    choices: Optional[Tuple] = None
    minimum: Optional[float] = None  # bounds: a minimum alone, or both
    maximum: Optional[float] = None

    def problem(self, value) -> Optional[str]:
        """The one-line message for a value outside the bounds, else None."""
        inside = (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
        if inside:
            return None
        if self.maximum is None:
            return f"--{self.name}: must be >= {self.minimum}, got {value}"
        return f"--{self.name}: must be in [{self.minimum}, {self.maximum}], got {value}"


# In the order of the command line's --help.
LAYER_OPTIONS = {option.name: option for option in (
    LayerOption("convolution_type", str, "depthwise", "aggregation convolution", CONVOLUTION_TYPES),
    LayerOption("softmax_topk_val", bool, True, "softmax over the K neighbour similarities"),
    LayerOption("K", int, 9, "neighbours per token (kernel of the aggregation)"),
    LayerOption("sampling_type", str, "all", "which tokens are neighbour candidates", SAMPLING_TYPES),
    LayerOption("num_samples", int, -1, "random: number of candidates; spatial: side n of the n x n grid; -1 with all"),
    LayerOption("sample_padding", int, 0, "border skipped by the spatial grid", minimum=0),
    LayerOption("magnitude_type", str, "matmul", "similarity between a query and the candidates' keys",
                MAGNITUDE_TYPES),
    LayerOption("coordinate_encoding", bool, False, "append each token's position as an extra channel"),
    LayerOption("similarity_type", str, "Col", "neighbours by features (Col), position (Loc) or both",
                SIMILARITY_TYPES),
    LayerOption("aggregation_type", str, "Col", "Loc_Col appends the position channel to the aggregated values",
                AGGREGATION_TYPES),
    LayerOption("kernel_size", int, 9, "kernel of the Conv1d layer"),
    LayerOption("branch_ratio", float, 0.5, "share of channels in the ConvNN branch of BranchConv / BranchAttention",
                minimum=0, maximum=1),
    LayerOption("sparse_mode", str, "all", "SparseAttention mask", SPARSE_MODES),
    LayerOption("sparse_context_window", int, 128, "SparseAttention window c"),
    LayerOption("local_window", int, 128, "LocalAttention window"),
)}


def default(name: str):
    """The default of option ``name``: what a layer uses when it is not given."""
    return LAYER_OPTIONS[name].default


def check_bounds(name: str, value) -> None:
    """Raises ValueError with the one-line message when ``value`` is outside option ``name``'s bounds."""
    problem = LAYER_OPTIONS[name].problem(value)
    if problem:
        raise ValueError(problem)
