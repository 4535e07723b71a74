"""The other token mixers against plain attention, branching extremes, batch behaviour and constraints."""

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models.layer_options import (
    CONVOLUTION_TYPES,
    LAYER_OPTIONS,
    MAGNITUDE_TYPES,
    SAMPLING_TYPES,
    SIMILARITY_TYPES,
)
from models.vit_layers import (
    LAYER_REGISTRY,
    MultiHeadAttention,
    MultiHeadBranching,
    MultiHeadBranchingAttention,
    MultiHeadBranchingConv,
    MultiHeadConv1dAttention,
    MultiHeadConvNNAttention,
    MultiHeadKvtAttention,
    MultiHeadLocalAttention,
    MultiHeadSparseAttention,
    layers_taking,
    options_from,
)
from models.vit import build_layer

WIDTH, HEADS = 12, 3


def plain_attention(q, k, v, mask=None):
    """Softmax attention over ``(B, H, N, d)`` written out by hand."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def heads(x, num_heads):
    batch, seq_len, width = x.shape
    return x.view(batch, seq_len, num_heads, width // num_heads).transpose(1, 2)


def merge(x):
    return x.transpose(1, 2).flatten(2)


def inputs(batch=2, seq_len=11, width=WIDTH):
    torch.manual_seed(3)
    return torch.randn(batch, seq_len, width, dtype=torch.float64)


def test_attention_is_softmax_attention_per_head():
    layer = MultiHeadAttention(WIDTH, HEADS, attention_dropout=0.0).double().eval()
    x = inputs()
    q, k, v = (heads(x @ w.weight.t(), HEADS) for w in (layer.W_q, layer.W_k, layer.W_v))
    expected = merge(plain_attention(q, k, v)) @ layer.W_o.weight.t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_kvt_with_K_equal_to_N_is_full_attention():
    x = inputs()
    layer = MultiHeadKvtAttention(WIDTH, HEADS, attention_dropout=0.0, K=x.shape[1]).double().eval()
    q, k, v = (heads(part, HEADS) for part in (x @ layer.qkv.weight.t()).chunk(3, dim=-1))
    expected = merge(plain_attention(q, k, v)) @ layer.proj.weight.t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_kvt_keeps_exactly_K_scores_even_under_ties():
    layer = MultiHeadKvtAttention(WIDTH, 1, attention_dropout=0.0, K=3).double().eval()
    x = torch.ones(1, 7, WIDTH, dtype=torch.float64)  # every score ties
    captured = {}
    layer.dropout.register_forward_hook(lambda module, args, out: captured.setdefault("probabilities", out))
    layer(x)
    assert torch.equal((captured["probabilities"] > 0).sum(-1), torch.full((1, 1, 7), 3))


def test_kvt_with_small_K_differs_from_full_attention():
    x = inputs()
    small = MultiHeadKvtAttention(WIDTH, HEADS, attention_dropout=0.0, K=2).double().eval()
    full = MultiHeadKvtAttention(WIDTH, HEADS, attention_dropout=0.0, K=x.shape[1]).double().eval()
    full.load_state_dict(small.state_dict())
    assert not torch.allclose(small(x), full(x))


def test_sparse_all_is_full_attention_and_masks_follow_their_rule():
    x = inputs(seq_len=13)
    layer = MultiHeadSparseAttention(WIDTH, HEADS, attention_dropout=0.0, sparse_mode="all").double().eval()
    projections = (layer.q_proj, layer.k_proj, layer.v_proj)
    q, k, v = (heads(x @ w.weight.t(), HEADS) for w in projections)
    torch.testing.assert_close(layer(x), merge(plain_attention(q, k, v)) @ layer.out_proj.weight.t(), rtol=0,
                               atol=1e-12)
    offset = (torch.arange(13).view(-1, 1) - torch.arange(13).view(1, -1)).abs()
    for mode, expected_mask in (("local", offset <= 2), ("strided", offset % 5 == 0)):
        masked = MultiHeadSparseAttention(WIDTH, HEADS, 0.0, sparse_mode=mode, sparse_context_window=5).double()
        masked.load_state_dict(layer.state_dict())
        masked.eval()
        assert torch.equal(masked.mask(13, x.device), expected_mask)
        expected = merge(plain_attention(q, k, v, expected_mask)) @ layer.out_proj.weight.t()
        torch.testing.assert_close(masked(x), expected, rtol=0, atol=1e-12)


def test_sparse_dropout_only_in_training():
    layer = MultiHeadSparseAttention(WIDTH, HEADS, attention_dropout=0.5).double()
    x = inputs()
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def rotate_by_complex_numbers(x, positions, base=10000.0):
    """Rotary embedding as complex rotation of channel pairs ``(j, j + d/2)`` by ``pos * base^(-2j/d)``."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                           positions.double().view(-1, 1) * frequencies)
    rotated = torch.complex(x[..., :half], x[..., half:]) * rotation
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@pytest.mark.parametrize("window", [9, 2], ids=["wide-window-is-full-attention", "narrow-window"])
def test_local_attention_is_rotary_attention_within_its_window(window):
    x = inputs(seq_len=9)
    layer = MultiHeadLocalAttention(WIDTH, 2, attention_dropout=0.0, local_window=window).double().eval()
    q, k, v = (heads(part, 2) for part in (x @ layer.to_qkv.weight.t()).chunk(3, dim=-1))
    positions = torch.arange(9)
    q, k = rotate_by_complex_numbers(q, positions), rotate_by_complex_numbers(k, positions)
    near = (positions.view(-1, 1) - positions.view(1, -1)).abs() <= window  # all True for the wide window
    expected = merge(plain_attention(q, k, v, near)) @ layer.to_out.weight.t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_conv1d_is_one_shared_convolution_per_head():
    x = inputs(seq_len=10)
    layer = MultiHeadConv1dAttention(WIDTH, HEADS, kernel_size=4).double().eval()
    mixed = heads(layer.W_x(x), HEADS)
    per_head = [
        F.conv1d(F.pad(mixed[:, h].transpose(1, 2), (1, 2)), layer.conv.weight, layer.conv.bias).transpose(1, 2)
        for h in range(HEADS)
    ]
    expected = layer.W_o(torch.cat(per_head, dim=-1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seq_len", [5, 6])
def test_conv1d_kernel_up_to_2n_minus_1_has_no_dead_tap_and_beyond_is_refused(seq_len):
    """With padding "same", a kernel of 2N - 1 lets every token see the whole sequence and every tap meets
    some token; a longer one only adds taps that never meet a token."""
    longest = 2 * seq_len - 1
    for kernel_size in (longest - 1, longest):
        layer = MultiHeadConv1dAttention(WIDTH, HEADS, kernel_size=kernel_size, num_tokens=seq_len).double()
        layer(inputs(seq_len=seq_len)).sum().backward()
        assert (layer.conv.weight.grad.abs().sum(dim=(0, 1)) > 0).all(), kernel_size
    with pytest.raises(ValueError, match=f"^--kernel_size: {longest + 1} .* use at most {longest},"):
        MultiHeadConv1dAttention(WIDTH, HEADS, kernel_size=longest + 1, num_tokens=seq_len)
    unchecked = MultiHeadConv1dAttention(WIDTH, HEADS, kernel_size=longest + 1).double()
    unchecked(inputs(seq_len=seq_len)).sum().backward()
    assert (unchecked.conv.weight.grad.abs().sum(dim=(0, 1)) == 0).any()  # the refused size has a dead tap


def convnn_options():
    return dict(attention_dropout=0.0, K=3, sampling_type="all", num_samples=-1, sample_padding=0,
                magnitude_type="matmul", coordinate_encoding=False, convolution_type="standard",
                softmax_topk_val=True, similarity_type="Col", aggregation_type="Col", num_tokens=11, grid_size=None)


@pytest.mark.parametrize("branching,other_class,other_name", [
    (MultiHeadBranchingConv, MultiHeadConv1dAttention, "conv1d"),
    (MultiHeadBranchingAttention, MultiHeadAttention, "attention"),
])
def test_branch_ratio_extremes_are_the_single_branches(branching, other_class, other_name):
    x = inputs()
    options = convnn_options()
    all_convnn = branching(WIDTH, HEADS, branch_ratio=1.0, **options).double().eval()
    alone = MultiHeadConvNNAttention(WIDTH, HEADS, **options).double().eval()
    alone.load_state_dict({k.removeprefix("convnn."): v for k, v in all_convnn.state_dict().items()})
    assert not hasattr(all_convnn, "pointwise_linear")
    torch.testing.assert_close(all_convnn(x), alone(x), rtol=0, atol=0)

    no_convnn = branching(WIDTH, HEADS, branch_ratio=0.0, **options).double().eval()
    other = other_class(WIDTH, HEADS).double().eval()
    other.load_state_dict({k.removeprefix(other_name + "."): v for k, v in no_convnn.state_dict().items()})
    assert not hasattr(no_convnn, "convnn") and not hasattr(no_convnn, "pointwise_linear")
    torch.testing.assert_close(no_convnn(x), other(x), rtol=0, atol=0)


def test_branching_splits_channels_and_mixes_them():
    x = inputs()
    layer = MultiHeadBranchingAttention(WIDTH, HEADS, branch_ratio=0.75, **convnn_options()).double().eval()
    assert layer.split == 9 and layer.convnn.d_hidden == 9
    expected = layer.pointwise_linear(torch.cat([layer.convnn(x[..., :9]), layer.attention(x[..., 9:])], dim=-1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def every_layer(seq_len, width=WIDTH):
    grid_side = math.isqrt(seq_len - 1)
    structure = dict(d_hidden=width, num_heads=HEADS, attention_dropout=0.1, num_tokens=seq_len,
                     grid_size=(grid_side, grid_side))
    options = dict(K=3, kernel_size=3, branch_ratio=0.5, local_window=2, sparse_mode="local", sparse_context_window=4)
    for name in LAYER_REGISTRY:
        yield name, build_layer(name, **structure, **options_from(name, options)).double()
    yield "ConvNNAttention-random", build_layer("ConvNNAttention", **structure, K=3, sampling_type="random",
                                                num_samples=5).double()
    yield "ConvNNAttention-spatial", build_layer("ConvNNAttention", **structure, K=3, sampling_type="spatial",
                                                 num_samples=2).double()


@pytest.mark.parametrize("seq_len", [10, 17])
def test_every_layer_is_deterministic_in_evaluation_and_independent_of_batch(seq_len):
    x = inputs(batch=5, seq_len=seq_len, width=WIDTH)
    for name, layer in every_layer(seq_len):
        layer.eval()
        full = layer(x)
        assert full.shape == x.shape, name
        torch.testing.assert_close(full, layer(x), rtol=0, atol=0, msg=name)
        singles = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        odd = torch.cat([layer(x[:3]), layer(x[3:])])
        torch.testing.assert_close(singles, full, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(odd, full, rtol=0, atol=1e-12, msg=name)


def convnn_modes(seq_len, width=WIDTH):
    """ConvNN-Attention in every similarity, sampling, selection and convolution mode."""
    grid_side = math.isqrt(seq_len - 1)
    for magnitude, sampling, similarity, convolution in itertools.product(
            MAGNITUDE_TYPES, SAMPLING_TYPES, SIMILARITY_TYPES, CONVOLUTION_TYPES):
        name = f"ConvNNAttention-{magnitude}-{sampling}-{similarity}-{convolution}"
        yield name, build_layer("ConvNNAttention", d_hidden=width, num_heads=HEADS, num_tokens=seq_len,
                                grid_size=(grid_side, grid_side), K=3, magnitude_type=magnitude,
                                sampling_type=sampling, num_samples=2 if sampling == "spatial" else 5,
                                similarity_type=similarity, convolution_type=convolution).double()


def test_every_layer_passes_an_empty_batch_through_forward_and_backward():
    seq_len = 17
    for name, layer in itertools.chain(every_layer(seq_len), convnn_modes(seq_len)):
        x = inputs(batch=0, seq_len=seq_len).requires_grad_()
        out = layer.train()(x)
        out.sum().backward()
        assert out.shape == x.shape and x.grad.shape == x.shape, name


@pytest.mark.parametrize("build,flag", [
    (lambda: MultiHeadConvNNAttention(12, K=0, num_tokens=10), "--K"),
    (lambda: MultiHeadConvNNAttention(12, K=11, num_tokens=10), "--K"),
    (lambda: MultiHeadConvNNAttention(12, K=5, sampling_type="random", num_samples=4, num_tokens=10), "--K"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="random", num_samples=-1, num_tokens=10),
     "--num_samples"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="random", num_samples=11, num_tokens=10),
     "--num_samples"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="spatial", num_samples=0, grid_size=(4, 4)),
     "--num_samples"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="spatial", num_samples=3, sample_padding=1,
                                      grid_size=(4, 4)), "--num_samples"),
    (lambda: MultiHeadConvNNAttention(12, K=5, sampling_type="spatial", num_samples=2, grid_size=(4, 4)), "--K"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="spatial", num_samples=2, sample_padding=-1,
                                      grid_size=(4, 4)), "--sample_padding"),
    (lambda: MultiHeadConvNNAttention(12, K=2, sampling_type="spatial", num_samples=2), "--sampling_type"),
    (lambda: MultiHeadConvNNAttention(12, magnitude_type="dot"), "--magnitude_type"),
    (lambda: MultiHeadConvNNAttention(12, convolution_type="grouped"), "--convolution_type"),
    (lambda: MultiHeadAttention(12, 5), "--num_heads"),
    (lambda: MultiHeadKvtAttention(12, 3, K=11, num_tokens=10), "--K"),
    (lambda: MultiHeadSparseAttention(12, 3, sparse_mode="diagonal"), "--sparse_mode"),
    (lambda: MultiHeadBranchingAttention(12, 4, branch_ratio=0.5, num_tokens=10, K=3), "--branch_ratio"),
    (lambda: MultiHeadBranchingConv(12, 3, branch_ratio=1.5, num_tokens=10, K=3), "--branch_ratio"),
    (lambda: MultiHeadBranchingConv(12, 3, branch_ratio=0.05, num_tokens=10, K=3), "--branch_ratio"),
    (lambda: MultiHeadBranchingConv(12, 3, branch_ratio=0.5, kernel_size=20, num_tokens=10, K=3), "--kernel_size"),
    (lambda: MultiHeadConv1dAttention(12, 3, kernel_size=20, num_tokens=10), "--kernel_size"),
])
def test_constraints_raise_value_error_naming_the_flag(build, flag):
    with pytest.raises(ValueError, match="^" + flag + ":"):
        build()


def test_all_sampling_ignores_num_samples():
    layer = MultiHeadConvNNAttention(12, K=3, sampling_type="all", num_samples=-7, num_tokens=10)
    assert layer(torch.randn(2, 10, 12)).shape == (2, 10, 12)


STRUCTURE = ("d_hidden", "num_heads", "attention_dropout", "num_tokens", "grid_size")


@pytest.mark.parametrize("name", list(LAYER_REGISTRY))
def test_every_layer_takes_the_structural_arguments_then_the_options_it_names(name):
    layer_class = LAYER_REGISTRY[name]
    parameters = list(inspect.signature(layer_class).parameters.values())
    assert tuple(p.name for p in parameters[: len(STRUCTURE)]) == STRUCTURE
    assert set(layer_class.options) <= set(LAYER_OPTIONS)
    if issubclass(layer_class, MultiHeadBranching):
        return
    by_keyword = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert tuple(p.name for p in by_keyword) == layer_class.options
    assert all(p.default == LAYER_OPTIONS[p.name].default for p in by_keyword)


def test_a_branching_layer_takes_the_options_of_both_branches_and_the_ratio():
    assert MultiHeadBranchingConv.options == (*MultiHeadConvNNAttention.options, "kernel_size", "branch_ratio")
    assert MultiHeadBranchingAttention.options == (*MultiHeadConvNNAttention.options, "branch_ratio")
    layer = MultiHeadBranchingConv(WIDTH, HEADS, num_tokens=11, K=4, kernel_size=5, convolution_type="standard")
    assert (layer.convnn.K, layer.conv1d.conv.kernel_size, layer.convnn.convolution_type) == (4, (5,), "standard")


def test_the_registry_names_the_layers_taking_an_option():
    assert layers_taking("K") == ("ConvNNAttention", "KvtAttention", "BranchConv", "BranchAttention")
    assert layers_taking("sampling_type") == ("ConvNNAttention", "BranchConv", "BranchAttention")
    assert layers_taking("kernel_size") == ("Conv1d", "BranchConv")
    assert options_from("KvtAttention", {"K": 4, "local_window": 2, "lr": 0.1}) == {"K": 4}


@pytest.mark.parametrize("build", [
    lambda: build_layer("Attention", d_hidden=WIDTH, num_heads=HEADS, K=3),
    lambda: build_layer("BranchAttention", d_hidden=WIDTH, num_heads=HEADS, num_tokens=11, K=3, kernel_size=3),
    lambda: MultiHeadBranchingConv(WIDTH, HEADS, num_tokens=11, local_window=3),
])
def test_an_option_the_layer_does_not_take_is_refused(build):
    with pytest.raises(TypeError):
        build()
