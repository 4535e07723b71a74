"""Token-mixing layers of the ViT, one registry keyed by the ``--layer`` names.

Every layer maps ``(B, N, D) -> (B, N, D)``; token 0 is the class token and tokens ``1..P`` are
patches in raster order on an ``Hp x Wp`` grid. See docs/convnn_attention.md for what each computes.

Every constructor takes the same structural arguments, ``(d_hidden, num_heads, attention_dropout,
num_tokens, grid_size)`` (the width, the heads, the dropout inside the layer, ``N`` and ``(Hp, Wp)``;
a layer ignores those it does not need), then, by keyword only, the options that its ``options``
attribute names; ``models.layer_options`` declares each option and its default.
"""

import math
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layer_options import (
    AGGREGATION_TYPES,
    CONVOLUTION_TYPES,
    MAGNITUDE_TYPES,
    SAMPLING_TYPES,
    SIMILARITY_TYPES,
    SPARSE_MODES,
    check_bounds,
    default,
)
from models.neighbour_conv import neighbour_conv, takes_gpu_path
from models.neighbour_selection import top_scores


def _choice(flag: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{flag}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_heads(d_hidden: int, num_heads: int) -> None:
    if num_heads < 1 or d_hidden % num_heads:
        raise ValueError(
            f"--num_heads: {num_heads} does not divide the layer width {d_hidden}; "
            "choose --num_heads dividing --d_hidden"
        )


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    batch, seq_len, width = x.shape
    return x.view(batch, seq_len, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, seq_len, head_width = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, heads * head_width)


class RecordsAttention(nn.Module):
    """A layer that forms softmax attention probabilities ``(B, H, N, N)`` (query rows, key columns).

    Set ``record_attention`` to keep those of the latest forward pass, before dropout, in ``last_attention``,
    for inspecting where the layer attends; off, it costs nothing.
    """

    record_attention = False
    last_attention: Optional[Tensor] = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``scaled_dot_product_attention(q, k, v, mask)`` with the layer's dropout; while recording, the same
        computed step by step, because the fused kernel does not return the probabilities."""
        dropout = self.attention_dropout if self.training else 0.0
        if not self.record_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        self.last_attention = probabilities.detach()
        return F.dropout(probabilities, dropout) @ v


class MultiHeadAttention(RecordsAttention):
    """Standard multi-head self-attention through PyTorch's fused kernel."""

    options = ()

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        _check_heads(d_hidden, num_heads)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.W_q = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_k = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_v = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_o = nn.Linear(d_hidden, d_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(proj(x), self.num_heads) for proj in (self.W_q, self.W_k, self.W_v))
        return self.W_o(_merge_heads(self._attend(q, k, v)))


def _token_coordinates(seq_len: int, like: Tensor) -> Tensor:
    """``(N,)``: each token's coordinate, ``linspace(-1, 1, N)``."""
    return torch.linspace(-1.0, 1.0, seq_len, device=like.device, dtype=like.dtype)


def _coordinates(seq_len: int, like: Tensor) -> Tensor:
    """The coordinate channel broadcast to ``(B, N, 1)``."""
    return _token_coordinates(seq_len, like).view(1, seq_len, 1).expand(like.shape[0], seq_len, 1)


def _with_coordinates(x: Tensor) -> Tensor:
    return torch.cat([x, _coordinates(x.shape[1], x)], dim=-1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _euclidean(q: Tensor, k: Tensor) -> Tensor:
    """Pairwise ``||q_i - k_j||`` with the square clamped at 0 and a zero gradient at distance 0."""
    squared = (q * q).sum(-1, keepdim=True) + (k * k).sum(-1).unsqueeze(-2) - 2.0 * (q @ k.transpose(-1, -2))
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, torch.ones_like(squared))), 0.0)


def spatial_grid(grid_size: Tuple[int, int], num_samples: int, padding: int) -> Tensor:
    """Token indices of an ``n x n`` grid of patches, rows/columns ``round(linspace(p, H-1-p, n))``."""
    height, width = grid_size
    rows = torch.linspace(padding, height - 1 - padding, num_samples).round().long()
    cols = torch.linspace(padding, width - 1 - padding, num_samples).round().long()
    return (1 + rows.view(-1, 1) * width + cols.view(1, -1)).reshape(-1)


class MultiHeadConvNNAttention(nn.Module):
    """Convolutional Nearest Neighbour Attention (docs/convnn_attention.md): hard top-K selection, 1-D conv aggregation.

    One head over the full width: ``num_heads`` is accepted for a uniform interface and ignored.
    ``num_tokens`` (``N``) and ``grid_size`` (``(Hp, Wp)``) are needed only to validate sampled modes
    when the layer is built; ``spatial`` sampling requires ``grid_size``.
    """

    options = ("convolution_type", "softmax_topk_val", "K", "sampling_type", "num_samples", "sample_padding",
               "magnitude_type", "coordinate_encoding", "similarity_type", "aggregation_type")

    def __init__(
        self,
        d_hidden: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        num_tokens: Optional[int] = None,
        grid_size: Optional[Tuple[int, int]] = None,
        *,
        convolution_type: str = default("convolution_type"),
        softmax_topk_val: bool = default("softmax_topk_val"),
        K: int = default("K"),
        sampling_type: str = default("sampling_type"),
        num_samples: int = default("num_samples"),
        sample_padding: int = default("sample_padding"),
        magnitude_type: str = default("magnitude_type"),
        coordinate_encoding: bool = default("coordinate_encoding"),
        similarity_type: str = default("similarity_type"),
        aggregation_type: str = default("aggregation_type"),
    ):
        super().__init__()
        _choice("--sampling_type", sampling_type, SAMPLING_TYPES)
        _choice("--magnitude_type", magnitude_type, MAGNITUDE_TYPES)
        _choice("--convolution_type", convolution_type, CONVOLUTION_TYPES)
        _choice("--similarity_type", similarity_type, SIMILARITY_TYPES)
        _choice("--aggregation_type", aggregation_type, AGGREGATION_TYPES)
        self.d_hidden = d_hidden
        self.K = K
        self.sampling_type = sampling_type
        self.num_samples = num_samples
        self.magnitude_type = magnitude_type
        self.softmax_topk_val = softmax_topk_val
        self.attention_dropout = attention_dropout
        self.convolution_type = convolution_type
        self.positional_selection = similarity_type == "Loc"
        self.coordinates_in_similarity = coordinate_encoding or similarity_type == "Loc_Col"
        self.coordinates_in_values = (coordinate_encoding or aggregation_type == "Loc_Col") and (
            convolution_type != "depthwise"
        )
        if sampling_type == "spatial":
            if grid_size is None:
                raise ValueError("--sampling_type: spatial sampling needs the patch grid (grid_size)")
            self.register_buffer("grid_candidates", self._checked_grid(grid_size, num_samples, sample_padding),
                                 persistent=False)
        self._check_K(num_tokens)

        self.W_q = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_k = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_v = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_o = nn.Linear(d_hidden, d_hidden, bias=False)
        self.dropout = nn.Dropout(attention_dropout)
        # Set record_selection to keep the (neighbours, weights, candidates) of the latest forward pass in
        # last_selection, for inspecting what the layer chose; off, it costs nothing.
        self.record_selection = False
        self.last_selection = None
        self.conv = self._build_conv(d_hidden + int(self.coordinates_in_values), d_hidden)

    @staticmethod
    def _checked_grid(grid_size, num_samples: int, padding: int) -> Tensor:
        height, width = grid_size
        check_bounds("sample_padding", padding)
        if num_samples < 1:
            raise ValueError(
                f"--num_samples: spatial sampling needs a grid side >= 1 (e.g. 3 for 3x3), got {num_samples}"
            )
        if num_samples > min(height, width) - 2 * padding:
            raise ValueError(
                f"--num_samples: a {num_samples}x{num_samples} grid does not fit the {height}x{width} patch grid "
                f"with --sample_padding {padding}; use at most {min(height, width) - 2 * padding}"
            )
        return spatial_grid(grid_size, num_samples, padding)

    def _check_K(self, num_tokens: Optional[int]) -> None:
        if self.sampling_type == "random":
            if self.num_samples < 1:
                raise ValueError(f"--num_samples: random sampling needs >= 1 samples, got {self.num_samples}")
            if num_tokens is not None and self.num_samples > num_tokens:
                raise ValueError(
                    f"--num_samples: {self.num_samples} random samples exceed the {num_tokens} tokens; "
                    f"use at most {num_tokens}"
                )
            candidates = self.num_samples
        elif self.sampling_type == "spatial":
            candidates = self.grid_candidates.numel()
        else:
            candidates = num_tokens
        if self.K < 1 or (candidates is not None and self.K > candidates):
            limit = f"between 1 and {candidates}" if candidates is not None else ">= 1"
            raise ValueError(
                f"--K: {self.K} neighbours out of {candidates if candidates is not None else 'N'} "
                f"{self.sampling_type} candidates; K must be {limit}"
            )

    def _build_conv(self, channels_in: int, channels_out: int) -> nn.Module:
        if self.convolution_type == "standard":
            return nn.Conv1d(channels_in, channels_out, self.K, stride=self.K, bias=False)
        depthwise = nn.Conv1d(channels_in, channels_in, self.K, stride=self.K, groups=channels_in, bias=False)
        if self.convolution_type == "depthwise":
            nn.init.ones_(depthwise.weight)
            return depthwise
        return nn.Sequential(depthwise, nn.Conv1d(channels_in, channels_out, 1, bias=False))

    def sample_candidates(self, seq_len: int, device: torch.device) -> Tensor:
        """Candidate token indices ``(r,)`` for sampled modes.

        ``random`` draws a fresh subset per training step; in evaluation it uses evenly spaced
        tokens so that evaluation is deterministic.
        """
        if self.sampling_type == "spatial":
            return self.grid_candidates
        if self.training:
            return torch.randperm(seq_len, device=device)[: self.num_samples]
        return torch.linspace(0, seq_len - 1, self.num_samples, device=device).round().long()

    def _scaled_queries(self, x: Tensor) -> Tensor:
        # q k^T = x (Wq^T Wk) x^T: one projection instead of two, and autograd keeps x Wq^T Wk and
        # the input x (which the value path keeps anyway) rather than both q and k.
        return x @ (self.W_q.weight.t() @ self.W_k.weight * (1.0 / math.sqrt(self.d_hidden)))

    def _coordinate_scores(self, x: Tensor, candidates: Optional[Tensor]) -> Tensor:
        """``(N, r)``: what the coordinate channel adds to the ``matmul`` similarity."""
        coords = _token_coordinates(x.shape[1], x)
        key_coords = coords if candidates is None else coords[candidates]
        return (coords.view(-1, 1) * (1.0 / math.sqrt(self.d_hidden))) * key_coords.view(1, -1)

    def _similarity(self, x: Tensor, candidates: Optional[Tensor]) -> Tensor:
        """``(B, N, r)`` similarity of every token's query to every candidate's key (docs/convnn_attention.md step 3)."""
        if self.magnitude_type == "matmul":
            keys = x if candidates is None else x[:, candidates]
            scores = self._scaled_queries(x) @ keys.transpose(-1, -2)
            if self.coordinates_in_similarity:
                scores = scores + self._coordinate_scores(x, candidates)
            return scores
        q, k = self.W_q(x), self.W_k(x)
        if self.coordinates_in_similarity:
            q, k = _with_coordinates(q), _with_coordinates(k)
        if candidates is not None:
            k = k[:, candidates]
        if self.magnitude_type == "cosine":
            return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        return _euclidean(q, k)

    def _best_candidates(self, x: Tensor, candidates: Optional[Tensor], count: int) -> Tuple[Tensor, Tensor]:
        """Each token's ``count`` best similarity values and their candidate positions, the token itself
        excluded from sampled candidates."""
        largest = self.magnitude_type != "euclidean"
        excluded = None
        if candidates is not None:
            excluded = torch.arange(x.shape[1], device=x.device).view(-1, 1) == candidates.view(1, -1)
        if self.magnitude_type == "matmul" and not takes_gpu_path(x):
            # The CPU path: a backward over the K chosen pairs per token instead of all N x r.
            dtype = _compute_dtype(x)
            bias = self._coordinate_scores(x, candidates) if self.coordinates_in_similarity else None
            if excluded is not None:
                bias = x.new_zeros(excluded.shape, dtype=dtype) if bias is None else bias
                bias = bias.masked_fill(excluded, float("-inf"))
            keys = x if candidates is None else x[:, candidates]
            return top_scores(self._scaled_queries(x).to(dtype), keys.to(dtype), bias, count, largest)
        similarity = self._similarity(x, candidates)
        if excluded is not None:
            similarity = similarity.masked_fill(excluded, float("-inf") if largest else float("inf"))
        return torch.topk(similarity, count, dim=-1, largest=largest)

    def _select_by_features(self, x: Tensor, candidates: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Neighbour indices ``(B, N, K)`` and their similarity values, best first (docs/convnn_attention.md step 4)."""
        if candidates is None:
            values, neighbours = self._best_candidates(x, None, self.K)
            return neighbours, values
        batch, seq_len = x.shape[:2]
        values, picked = self._best_candidates(x, candidates, self.K - 1)
        self_index = torch.arange(seq_len, device=x.device).view(1, seq_len, 1).expand(batch, seq_len, 1)
        neighbours = torch.cat([self_index, candidates[picked]], dim=-1)
        values = torch.cat([values.new_ones(batch, seq_len, 1), values], dim=-1)  # values is empty when K = 1
        return neighbours, values

    def _select_by_position(self, seq_len: int, candidates: Optional[Tensor], device) -> Tensor:
        """The K nearest positions (ties to the lower index), slots in position order, ``(N, K)``."""
        tokens = torch.arange(seq_len, device=device)
        if candidates is None:
            start = (tokens - self.K // 2).clamp(0, seq_len - self.K)
            return start.view(-1, 1) + torch.arange(self.K, device=device)
        pool = torch.cat([tokens.view(-1, 1), candidates.view(1, -1).expand(seq_len, -1)], dim=1)
        distance = (pool - tokens.view(-1, 1)).abs()
        # Exclude sampled copies of the token itself: it already sits in column 0.
        distance[:, 1:] = distance[:, 1:].masked_fill(pool[:, 1:] == tokens.view(-1, 1), 2 * seq_len + 1)
        rank = distance * (2 * seq_len + 2) + pool
        nearest = torch.topk(rank, self.K, dim=-1, largest=False).indices
        return torch.sort(pool.gather(1, nearest), dim=-1).values

    def _weights(self, values: Tensor) -> Tensor:
        if self.magnitude_type == "euclidean":
            return torch.softmax(-values, dim=-1) if self.softmax_topk_val else 1.0 / (values + 1e-8)
        return torch.softmax(values, dim=-1) if self.softmax_topk_val else values

    def _aggregate(self, x: Tensor, neighbours: Tensor, weights: Tensor) -> Tensor:
        if self.convolution_type == "standard":
            kernel = self.conv.weight
        else:
            depthwise = self.conv if self.convolution_type == "depthwise" else self.conv[0]
            kernel = depthwise.weight.squeeze(1)
        if self.coordinates_in_values:
            source, value_weight = _with_coordinates(self.W_v(x)), None
        else:
            source, value_weight = x, self.W_v.weight
        # The aggregation runs in one dtype, autocast's where it is on, with autocast off inside,
        # so that its recomputation in backward (where autocast is off) sees the same dtypes as forward.
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out = neighbour_conv(source.to(dtype), neighbours, weights.to(dtype), kernel.to(dtype),
                                 None if value_weight is None else value_weight.to(dtype))
        if self.convolution_type == "depthwise-separable":
            out = out @ self.conv[1].weight.squeeze(-1).t().to(out.dtype)
        return out

    def neighbours_and_weights(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The selected neighbour indices ``(B, N, K)`` and their aggregation weights for input ``x``."""
        batch, seq_len, _ = x.shape
        candidates = None if self.sampling_type == "all" else self.sample_candidates(seq_len, x.device)
        if self.positional_selection:
            neighbours = self._select_by_position(seq_len, candidates, x.device)
            neighbours = neighbours.unsqueeze(0).expand(batch, -1, -1)
            weights = x.new_ones(neighbours.shape)
        else:
            neighbours, values = self._select_by_features(x, candidates)
            weights = self._weights(values)
        if self.record_selection:
            self.last_selection = (neighbours.detach(), weights.detach(), candidates)
        return neighbours, weights

    def forward(self, x: Tensor) -> Tensor:
        neighbours, weights = self.neighbours_and_weights(x)
        return self.W_o(self.dropout(self._aggregate(x, neighbours, weights)))


class MultiHeadKvtAttention(RecordsAttention):
    """k-NN attention (KVT): each query keeps exactly its ``K`` largest scores before the softmax."""

    options = ("K",)

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, *,
                 K: int = default("K")):
        super().__init__()
        _check_heads(d_hidden, num_heads)
        if K < 1 or (num_tokens is not None and K > num_tokens):
            raise ValueError(f"--K: KvtAttention keeps K of the {num_tokens} scores per query; "
                             f"K must be between 1 and {num_tokens}, got {K}")
        self.num_heads = num_heads
        self.K = K
        self.scale = (d_hidden // num_heads) ** -0.5
        self.qkv = nn.Linear(d_hidden, 3 * d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_hidden, bias=False)
        self.dropout = nn.Dropout(attention_dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        kept, index = torch.topk(scores, self.K, dim=-1)
        scores = torch.full_like(scores, float("-inf")).scatter(-1, index, kept)
        probabilities = torch.softmax(scores, dim=-1)
        if self.record_attention:
            self.last_attention = probabilities.detach()
        return self.proj(_merge_heads(self.dropout(probabilities) @ v))


def rotary_tables(seq_len: int, head_width: int, device, dtype, base: float = 10000.0) -> Tuple[Tensor, Tensor]:
    """Cosine and sine tables ``(N, head_width)`` of the rotary embedding at positions ``0..N-1``."""
    exact = torch.promote_types(dtype, torch.float32)  # half-precision angles would drift at long range
    inverse_frequency = 1.0 / base ** (torch.arange(0, head_width, 2, device=device, dtype=exact) / head_width)
    angles = torch.arange(seq_len, device=device, dtype=exact).view(-1, 1) * inverse_frequency
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class MultiHeadLocalAttention(RecordsAttention):
    """Windowed attention with heads of width 64 and rotary positions (docs/convnn_attention.md)."""

    head_width = 64
    options = ("local_window",)

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, *,
                 local_window: int = default("local_window")):
        super().__init__()
        if local_window < 0:
            raise ValueError(f"--local_window: must be >= 0, got {local_window}")
        self.num_heads = num_heads
        self.window = local_window
        self.attention_dropout = attention_dropout
        inner = self.head_width * num_heads
        self.to_qkv = nn.Linear(d_hidden, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, d_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        seq_len = x.shape[1]
        q, k, v = (_split_heads(part, self.num_heads) for part in self.to_qkv(x).chunk(3, dim=-1))
        cos, sin = rotary_tables(seq_len, self.head_width, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        positions = torch.arange(seq_len, device=x.device)
        within = (positions.view(-1, 1) - positions.view(1, -1)).abs() <= self.window
        return self.to_out(_merge_heads(self._attend(q, k, v, within)))


class MultiHeadSparseAttention(RecordsAttention):
    """Multi-head attention under a fixed bidirectional sparsity mask (docs/convnn_attention.md)."""

    options = ("sparse_mode", "sparse_context_window")

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, *,
                 sparse_mode: str = default("sparse_mode"),
                 sparse_context_window: int = default("sparse_context_window")):
        super().__init__()
        _check_heads(d_hidden, num_heads)
        _choice("--sparse_mode", sparse_mode, SPARSE_MODES)
        if sparse_context_window < 1:
            raise ValueError(f"--sparse_context_window: must be >= 1, got {sparse_context_window}")
        self.num_heads = num_heads
        self.mode = sparse_mode
        self.context = sparse_context_window
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(d_hidden, d_hidden, bias=False)
        self.k_proj = nn.Linear(d_hidden, d_hidden, bias=False)
        self.v_proj = nn.Linear(d_hidden, d_hidden, bias=False)
        self.out_proj = nn.Linear(d_hidden, d_hidden, bias=False)

    def mask(self, seq_len: int, device) -> Optional[Tensor]:
        if self.mode == "all":
            return None
        positions = torch.arange(seq_len, device=device)
        offset = (positions.view(-1, 1) - positions.view(1, -1)).abs()
        return offset <= self.context // 2 if self.mode == "local" else offset % self.context == 0

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(proj(x), self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_merge_heads(self._attend(q, k, v, self.mask(x.shape[1], x.device))))


class MultiHeadConv1dAttention(nn.Module):
    """A 1-D convolution along the token sequence, one kernel shared by all heads (docs/convnn_attention.md)."""

    options = ("kernel_size",)

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, *,
                 kernel_size: int = default("kernel_size")):
        super().__init__()
        _check_heads(d_hidden, num_heads)
        if kernel_size < 1:
            raise ValueError(f"--kernel_size: must be >= 1, got {kernel_size}")
        # With padding "same", the taps reach (kernel_size - 1) / 2 tokens to each side (one more to the
        # right for an even kernel). Beyond 2N - 1 a tap never meets a token: weights that never train,
        # and a function equal to the (2N - 1)-kernel's, so such sizes are refused.
        if num_tokens is not None and kernel_size > 2 * num_tokens - 1:
            raise ValueError(
                f"--kernel_size: {kernel_size} reaches beyond the {num_tokens} tokens (padding 'same'); use at most "
                f"{2 * num_tokens - 1}, where every token already sees the whole sequence"
            )
        self.num_heads = num_heads
        head_width = d_hidden // num_heads
        self.W_x = nn.Linear(d_hidden, d_hidden)
        self.conv = nn.Conv1d(head_width, head_width, kernel_size, padding="same")
        self.W_o = nn.Linear(d_hidden, d_hidden)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq_len, width = x.shape
        heads = _split_heads(self.W_x(x), self.num_heads)
        head_width = width // self.num_heads
        per_head = heads.reshape(batch * self.num_heads, seq_len, head_width).transpose(1, 2)
        mixed = self.conv(per_head).transpose(1, 2).reshape(batch, self.num_heads, seq_len, head_width)
        return self.W_o(_merge_heads(mixed))


class MultiHeadBranching(nn.Module):
    """ConvNN-Attention on the first ``int(branch_ratio * D)`` channels, another layer on the rest.

    A subclass names the other layer (``other_class``) and the attribute holding it (``other_name``, part
    of the checkpoint keys); it takes the options of both layers and ``branch_ratio``.
    """

    other_class: type
    other_name: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.options = (*MultiHeadConvNNAttention.options, *cls.other_class.options, "branch_ratio")

    def __init__(self, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                 num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, *,
                 branch_ratio: float = default("branch_ratio"), **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no option {', '.join(unknown)}")
        check_bounds("branch_ratio", branch_ratio)
        self.split = int(branch_ratio * d_hidden)
        if self.split == 0 and branch_ratio > 0:
            # Only 0 itself may mean "the other branch alone"; a small ratio rounding down to it would
            # silently drop the ConvNN branch the user asked for.
            raise ValueError(
                f"--branch_ratio: {branch_ratio} gives the ConvNN branch 0 of the {d_hidden} channels "
                f"(int(ratio x --d_hidden)); use at least {math.ceil(10_000 / d_hidden) / 10_000}, "
                f"or 0 for the {self.other_name} branch alone"
            )
        structure = dict(num_heads=num_heads, attention_dropout=attention_dropout, num_tokens=num_tokens,
                         grid_size=grid_size)
        if self.split > 0:
            self.convnn = MultiHeadConvNNAttention(self.split, **structure,
                                                   **_options_of(MultiHeadConvNNAttention, options))
        if self.split < d_hidden:
            width = d_hidden - self.split
            _branch_heads(width, num_heads)
            setattr(self, self.other_name, self.other_class(width, **structure,
                                                            **_options_of(self.other_class, options)))
        if 0 < self.split < d_hidden:
            self.pointwise_linear = nn.Linear(d_hidden, d_hidden)

    def forward(self, x: Tensor) -> Tensor:
        other = getattr(self, self.other_name, None)
        if other is None:
            return self.convnn(x)
        if self.split == 0:
            return other(x)
        mixed = torch.cat([self.convnn(x[..., : self.split]), other(x[..., self.split :])], dim=-1)
        return self.pointwise_linear(mixed)


def _options_of(layer_class, options: dict) -> dict:
    return {name: value for name, value in options.items() if name in layer_class.options}


def _branch_heads(width: int, num_heads: int) -> None:
    if width % num_heads:
        raise ValueError(
            f"--branch_ratio: the non-ConvNN branch gets {width} channels, which --num_heads {num_heads} "
            "does not divide; pick --branch_ratio so that (1 - ratio) * d_hidden is a multiple of --num_heads"
        )


class MultiHeadBranchingConv(MultiHeadBranching):
    """ConvNN-Attention beside a :class:`MultiHeadConv1dAttention` branch."""

    other_class, other_name = MultiHeadConv1dAttention, "conv1d"


class MultiHeadBranchingAttention(MultiHeadBranching):
    """ConvNN-Attention beside a :class:`MultiHeadAttention` branch."""

    other_class, other_name = MultiHeadAttention, "attention"


LAYER_REGISTRY = {
    "Attention": MultiHeadAttention,
    "ConvNNAttention": MultiHeadConvNNAttention,
    "KvtAttention": MultiHeadKvtAttention,
    "LocalAttention": MultiHeadLocalAttention,
    "SparseAttention": MultiHeadSparseAttention,
    "Conv1d": MultiHeadConv1dAttention,
    "BranchConv": MultiHeadBranchingConv,
    "BranchAttention": MultiHeadBranchingAttention,
}


def layer_class(layer: str) -> type:
    """The class of the ``--layer`` named ``layer``."""
    if layer not in LAYER_REGISTRY:
        raise ValueError(f"--layer: {layer!r} is not one of {', '.join(LAYER_REGISTRY)}")
    return LAYER_REGISTRY[layer]


def layers_taking(option: str) -> Tuple[str, ...]:
    """The ``--layer`` names whose layer takes ``option``, e.g. ``layers_taking("K")``."""
    return tuple(name for name, layer in LAYER_REGISTRY.items() if option in layer.options)


def options_from(layer: str, values: Mapping) -> dict:
    """The options of ``layer`` found in ``values`` (e.g. all the flags); those absent keep their defaults."""
    return {name: values[name] for name in layer_class(layer).options if name in values}
