"""Vision Transformer whose token mixer is chosen by name from ``LAYER_REGISTRY`` (docs/convnn_attention.md)."""

from typing import Dict, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from models.vit_layers import layer_class


class PatchEmbedding(nn.Module):
    def __init__(self, patch_size: int, d_hidden: int):
        super().__init__()
        self.linear_projection = nn.Conv2d(3, d_hidden, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(d_hidden)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.linear_projection(images).flatten(2).transpose(1, 2))


def sinusoidal_table(num_tokens: int, width: int) -> Tensor:
    """``pe[pos, 2i] = sin(pos / 10000^(2i/D))``, ``pe[pos, 2i+1] = cos(...)``, shape ``(N, D)``."""
    positions = torch.arange(num_tokens, dtype=torch.float64).view(-1, 1)
    even_channels = torch.arange(0, width, 2, dtype=torch.float64)
    angles = positions / 10000.0 ** (even_channels / width)
    table = torch.zeros(num_tokens, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : width // 2])
    return table.float()


class PositionalEncoding(nn.Module):
    """Prepends the learned class token and adds the fixed sinusoidal table."""

    def __init__(self, num_tokens: int, d_hidden: int):
        super().__init__()
        self.cls_tokens = nn.Parameter(torch.randn(1, 1, d_hidden))
        self.register_buffer("pe", sinusoidal_table(num_tokens, d_hidden).unsqueeze(0))

    def forward(self, patches: Tensor) -> Tensor:
        cls = self.cls_tokens.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pe


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + DropPath(Dropout(Layer(LN1(x))))`` then ``x + DropPath(Dropout(MLP(LN2(x))))``.

    DropPath (stochastic depth) drops a sample's whole branch with probability ``drop_path`` while training
    and scales kept branches by ``1 / (1 - drop_path)``; at 0 the block holds no such module, so that the
    model (and model.txt) stays the one without it."""

    def __init__(self, attention: nn.Module, d_hidden: int, d_mlp: int, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_hidden)
        self.attention = attention
        self.norm2 = nn.LayerNorm(d_hidden)
        self.mlp = nn.Sequential(nn.Linear(d_hidden, d_mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_mlp, d_hidden))
        self.dropout = nn.Dropout(dropout)
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else None

    def _branch(self, output: Tensor) -> Tensor:
        output = self.dropout(output)
        return output if self.drop_path is None else self.drop_path(output)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._branch(self.attention(self.norm1(x)))
        return x + self._branch(self.mlp(self.norm2(x)))


def build_layer(layer: str, *, d_hidden: int, num_heads: int, attention_dropout: float = 0.0,
                num_tokens: Optional[int] = None, grid_size: Optional[Tuple[int, int]] = None, **options) -> nn.Module:
    """Builds the ``--layer`` named ``layer`` from the structural arguments every layer takes and the
    options it names (``LAYER_REGISTRY[layer].options``); options not given keep their defaults."""
    return layer_class(layer)(d_hidden, num_heads, attention_dropout, num_tokens, grid_size, **options)


class ViT(nn.Module):
    """ViT whose every block mixes tokens with the ``layer`` built from ``layer_options``.

    ``layer_options`` maps option names (the layer's flags without ``--``) to values; it may hold only
    options the layer takes (``LAYER_REGISTRY[layer].options``), and those missing keep their defaults.
    The other keywords are named after their command-line flags.
    """

    def __init__(
        self,
        img_size: int,
        num_classes: int,
        layer: str = "Attention",
        layer_options: Optional[Mapping] = None,
        patch_size: int = 16,
        num_layers: int = 12,
        num_heads: int = 3,
        d_hidden: int = 192,
        d_mlp: int = 768,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        _check_geometry(img_size, patch_size, num_layers, num_heads, d_hidden, d_mlp, dropout, attention_dropout,
                        drop_path)
        grid_side = img_size // patch_size
        self.num_tokens = grid_side * grid_side + 1
        self.activation_checkpointing = False
        structure = dict(d_hidden=d_hidden, num_heads=num_heads, attention_dropout=attention_dropout,
                         num_tokens=self.num_tokens, grid_size=(grid_side, grid_side))
        options = dict(layer_options or {})
        self.patch_embedding = PatchEmbedding(patch_size, d_hidden)
        self.positional_encoding = PositionalEncoding(self.num_tokens, d_hidden)
        # Stochastic depth rises linearly over the blocks, from 0 at the first to ``drop_path`` at the last.
        drop_path_rates = torch.linspace(0.0, drop_path, num_layers, dtype=torch.float64).tolist()
        self.transformer_encoder = nn.ModuleList(
            EncoderBlock(build_layer(layer, **structure, **options), d_hidden, d_mlp, dropout, rate)
            for rate in drop_path_rates
        )
        self.classifier = nn.Linear(d_hidden, num_classes)

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters that weight decay should leave alone beyond biases and norm weights: the class
        token (the position table is a fixed buffer, not a parameter)."""
        return {"positional_encoding.cls_tokens"}

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def forward(self, images: Tensor) -> Tensor:
        x = self.positional_encoding(self.patch_embedding(images))
        for block in self.transformer_encoder:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.classifier(x[:, 0])


def _check_geometry(img_size, patch_size, num_layers, num_heads, d_hidden, d_mlp, dropout, attention_dropout,
                    drop_path):
    if patch_size < 1:
        raise ValueError(f"--patch_size: must be >= 1, got {patch_size}")
    if img_size % patch_size:
        raise ValueError(
            f"--patch_size: {patch_size} does not divide the image side {img_size}; "
            "choose a divisor or change --resize"
        )
    for flag, value in (("--num_layers", num_layers), ("--num_heads", num_heads), ("--d_hidden", d_hidden),
                        ("--d_mlp", d_mlp)):
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    for flag, value in (("--dropout", dropout), ("--attention_dropout", attention_dropout), ("--drop_path", drop_path)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag}: must be in [0, 1), got {value}")


def convert_reference_checkpoint(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Converts a state dict of the reference implementation to this project's layout.

    The reference ConvNN similarity compared each token's *key* with the candidates' *queries*;
    here a token's *query* meets the candidates' keys, so ``W_q`` and ``W_k`` swap roles in every
    ConvNN-Attention layer (recognised by holding both ``W_q`` and an aggregation ``conv``).
    """
    converted = dict(state_dict)
    convnn_prefixes = {
        key[: -len("W_q.weight")]
        for key in state_dict
        if key.endswith("W_q.weight")
        and any(other.startswith(key[: -len("W_q.weight")] + "conv.") for other in state_dict)
    }
    for prefix in convnn_prefixes:
        converted[prefix + "W_q.weight"] = state_dict[prefix + "W_k.weight"]
        converted[prefix + "W_k.weight"] = state_dict[prefix + "W_q.weight"]
    return converted
