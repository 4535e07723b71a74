"""ConvNN-Attention against the plain reference, its aggregation operator on each path, and the paper's special
cases."""

import importlib.util
import itertools
import math
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import models.neighbour_conv as neighbour_conv_module
import models.neighbour_selection as neighbour_selection_module
from models.layer_options import CONVOLUTION_TYPES
from models.neighbour_conv import neighbour_conv
from models.neighbour_selection import top_scores
import models.vit_layers as vit_layers_module
from models.vit_layers import MultiHeadConvNNAttention, spatial_grid
from scripts.convnn_reference import reference_convnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark  # noqa: E402

GRID = (4, 4)
SEQ_LEN = GRID[0] * GRID[1] + 1
WIDTH = 6


def make_layer(**options):
    torch.manual_seed(0)
    defaults = dict(d_hidden=WIDTH, num_heads=3, attention_dropout=0.0, K=4, num_tokens=SEQ_LEN, grid_size=GRID)
    if options.get("sampling_type") == "random":
        defaults["num_samples"] = 7
    if options.get("sampling_type") == "spatial":
        defaults["num_samples"] = 3
    layer = MultiHeadConvNNAttention(**{**defaults, **options}).double()
    for parameter in layer.parameters():
        # Random, non-trivial weights (the depthwise kernel starts as all ones).
        torch.nn.init.normal_(parameter, std=0.5)
    return layer.eval()


def use_triton_interpreter(monkeypatch):
    """Sends the aggregation down the GPU path, its Triton kernels run by Triton's interpreter on CPU tensors
    (which tests/conftest.py selects where there is no GPU)."""
    triton = pytest.importorskip("triton")
    if not triton.knobs.runtime.interpret:
        pytest.skip("Triton's interpreter is off (a GPU is present): scripts/check_device.py covers the GPU path")
    monkeypatch.setattr(neighbour_conv_module, "_uses_triton", lambda source: True)


@pytest.fixture
def triton_interpreter(monkeypatch):
    use_triton_interpreter(monkeypatch)


CPU_PATHS = ["one-chunk", "chunk-per-sequence"]


def select_path(path, monkeypatch):
    """Each way the layer can run: on the CPU, the aggregation over the whole batch at once with the selection's
    dense backward (that of small candidate sets), and over chunks of one sequence each (the chunks of a large
    batch) with the selection's sparse backward (that of large ones); the GPU path's Triton kernels, interpreted."""
    if path == "one-chunk":
        monkeypatch.setattr(neighbour_selection_module, "DENSE_CANDIDATES_PER_CHOICE", 10**9)
    if path == "chunk-per-sequence":
        monkeypatch.setattr(neighbour_conv_module, "CHUNK_BYTES", 1)
        monkeypatch.setattr(neighbour_selection_module, "DENSE_CANDIDATES_PER_CHOICE", 0)
    if path == "triton":
        use_triton_interpreter(monkeypatch)


@pytest.fixture(params=[*CPU_PATHS, pytest.param("triton", marks=pytest.mark.slow)])
def aggregation_path(request, monkeypatch):
    select_path(request.param, monkeypatch)
    return request.param


def fixed_candidates(layer):
    if layer.sampling_type == "random":
        return torch.tensor([0, 3, 5, 8, 11, 12, 16])
    return layer.grid_candidates


def compare_with_reference(layer, batch=3, seq_len=SEQ_LEN, tolerance=1e-9):
    torch.manual_seed(1)
    x = torch.randn(batch, seq_len, WIDTH, dtype=torch.float64, requires_grad=True)
    candidates = None
    if layer.sampling_type != "all":
        candidates = fixed_candidates(layer)
        layer.sample_candidates = lambda n, device: candidates

    fast = layer(x)
    grad_out = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, [x, *layer.parameters()], grad_out, materialize_grads=True)
    slow = reference_convnn(layer, x, candidates)
    slow_grads = torch.autograd.grad(slow, [x, *layer.parameters()], grad_out, materialize_grads=True)

    torch.testing.assert_close(fast, slow, rtol=0, atol=tolerance)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "sampling_type,magnitude_type,softmax_topk_val,convolution_type,coordinate_encoding",
    list(itertools.product(
        ["all", "random", "spatial"],
        ["matmul", "cosine", "euclidean"],
        [True, False],
        ["standard", "depthwise", "depthwise-separable"],
        [False, True],
    )),
)
def test_matches_reference_for_every_option(sampling_type, magnitude_type, softmax_topk_val, convolution_type,
                                            coordinate_encoding, aggregation_path):
    layer = make_layer(sampling_type=sampling_type, magnitude_type=magnitude_type, softmax_topk_val=softmax_topk_val,
                       convolution_type=convolution_type, coordinate_encoding=coordinate_encoding)
    compare_with_reference(layer)


@pytest.mark.parametrize("convolution_type", CONVOLUTION_TYPES)
@pytest.mark.parametrize("sampling_type", ["all", "random"])
def test_triton_kernels_match_reference(sampling_type, convolution_type, triton_interpreter):
    # A quick share of the comparisons above, which run on every path when slow tests are included.
    compare_with_reference(make_layer(sampling_type=sampling_type, convolution_type=convolution_type))


@pytest.mark.parametrize("sampling_type", ["all", "random", "spatial"])
@pytest.mark.parametrize("similarity_type,aggregation_type",
                         [("Loc", "Col"), ("Loc", "Loc_Col"), ("Loc_Col", "Col"), ("Col", "Loc_Col")])
@pytest.mark.parametrize("convolution_type", ["standard", "depthwise"])
def test_similarity_and_aggregation_types_match_reference(sampling_type, similarity_type, aggregation_type,
                                                          convolution_type, aggregation_path):
    layer = make_layer(sampling_type=sampling_type, similarity_type=similarity_type,
                       aggregation_type=aggregation_type, convolution_type=convolution_type)
    compare_with_reference(layer)


@pytest.mark.parametrize("K", [1, 2, 5, SEQ_LEN])
def test_matches_reference_for_extreme_K(K, aggregation_path):
    compare_with_reference(make_layer(K=K, convolution_type="standard"))


@pytest.mark.parametrize("sampling_type", ["random", "spatial"])
@pytest.mark.parametrize("magnitude_type", ["matmul", "euclidean"])
@pytest.mark.parametrize("softmax_topk_val", [True, False])
def test_K_1_in_sampled_modes_is_the_token_alone(sampling_type, magnitude_type, softmax_topk_val):
    """Slot 0 of a sampled mode is the token itself (docs/convnn_attention.md step 4), so with K = 1 no candidate is taken
    and each token's output is the convolution's one slot applied to its own value, weighted as its
    constant similarity 1.0 gives."""
    layer = make_layer(sampling_type=sampling_type, K=1, magnitude_type=magnitude_type,
                       softmax_topk_val=softmax_topk_val, convolution_type="standard")
    compare_with_reference(layer)
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    weight = 1.0 if softmax_topk_val else (1.0 / (1.0 + 1e-8) if magnitude_type == "euclidean" else 1.0)
    expected = (weight * x @ layer.W_v.weight.t() @ layer.conv.weight[:, :, 0].t()) @ layer.W_o.weight.t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_coordinate_encoding_is_loc_col_similarity_and_aggregation():
    encoded = make_layer(coordinate_encoding=True, convolution_type="standard")
    spelled_out = make_layer(similarity_type="Loc_Col", aggregation_type="Loc_Col", convolution_type="standard")
    spelled_out.load_state_dict(encoded.state_dict())
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    torch.testing.assert_close(encoded(x), spelled_out(x), rtol=0, atol=0)
    assert encoded.conv.weight.shape == (WIDTH, WIDTH + 1, 4)


def test_depthwise_keeps_value_width_under_coordinate_encoding():
    layer = make_layer(coordinate_encoding=True, convolution_type="depthwise")
    assert layer.conv.weight.shape == (WIDTH, 1, 4)
    separable = make_layer(coordinate_encoding=True, convolution_type="depthwise-separable")
    assert separable.conv[0].weight.shape == (WIDTH + 1, 1, 4)
    assert separable.conv[1].weight.shape == (WIDTH, WIDTH + 1, 1)


def test_depthwise_kernel_starts_at_one():
    layer = MultiHeadConvNNAttention(d_hidden=8, num_heads=1, K=3, num_tokens=10)
    assert torch.equal(layer.conv.weight, torch.ones(8, 1, 3))


def neighbour_conv_inputs(kernel_shape, projected, dtype=torch.float64):
    torch.manual_seed(0)
    batch, seq_len, slots = 2, 6, 3
    source = torch.randn(batch, seq_len, 4 if projected else 5, dtype=dtype, requires_grad=True)
    neighbours = torch.randint(0, seq_len, (batch, seq_len, slots))
    weights = torch.randn(batch, seq_len, slots, dtype=dtype, requires_grad=True)
    kernel = torch.randn(*kernel_shape, dtype=dtype, requires_grad=True)
    value_weight = torch.randn(5, 4, dtype=dtype, requires_grad=True) if projected else None
    return source, neighbours, weights, kernel, value_weight


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
def test_neighbour_conv_takes_weights_of_any_layout(kernel_shape, path, monkeypatch):
    # Weights whose (B, N) axes merge but whose slots are strided: the gradient buffer copied that layout and the
    # per-chunk writes into it could not be viewed flat (a direct caller's input; the layer's are contiguous).
    select_path(path, monkeypatch)
    source, neighbours, weights, kernel, _ = neighbour_conv_inputs(kernel_shape, projected=False)
    strided = weights.detach().permute(2, 0, 1).contiguous().permute(1, 2, 0).requires_grad_()
    grads = [torch.autograd.grad(neighbour_conv(source, neighbours, given, kernel).square().sum(),
                                 (source, given, kernel)) for given in (weights, strided)]
    for contiguous_grad, strided_grad in zip(*grads):
        torch.testing.assert_close(strided_grad, contiguous_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("batch,seq_len", [(2, 6), (7, 1)])
def test_neighbour_conv_takes_neighbours_of_any_layout(batch, seq_len, path, monkeypatch):
    # Neighbours laid out batch-innermost gave silently wrong results with several chunks (the embedding_bag
    # kernels read their indices' memory as if row-major) or failed to be viewed flat; found by a hostile review.
    select_path(path, monkeypatch)
    torch.manual_seed(0)
    source = torch.randn(batch, seq_len, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, seq_len, 3, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    neighbours = torch.randint(0, seq_len, (batch, seq_len, 3))
    batch_innermost = neighbours.transpose(0, 2).contiguous().transpose(0, 2)
    results = []
    for given in (neighbours, batch_innermost, neighbours[:1].expand(batch, -1, -1)):
        out = neighbour_conv(source, given, weights, kernel)
        results.append((out, *torch.autograd.grad(out.square().sum(), (source, weights, kernel))))
    for contiguous_result, strided_result in zip(results[0], results[1]):
        torch.testing.assert_close(strided_result, contiguous_result, rtol=0, atol=1e-12)
    expanded = neighbour_conv(source, neighbours[:1].expand(batch, -1, -1).contiguous(), weights, kernel)
    torch.testing.assert_close(results[2][0], expanded, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("position", [-1, 3])
def test_neighbour_conv_refuses_positions_outside_the_sequence(position, path, monkeypatch):
    # Found by a hostile review: with several sequences in a chunk, position N read the next sequence's first
    # token and -1 the previous sequence's last, silently.
    select_path(path, monkeypatch)
    source = torch.arange(12.0, dtype=torch.float64).view(2, 3, 2)
    neighbours = torch.zeros(2, 3, 1, dtype=torch.long)
    neighbours[int(position < 0), 0, 0] = position  # -1 in the second sequence, 3 in the first
    with pytest.raises(IndexError, match="positions 0..2"):
        neighbour_conv(source, neighbours, torch.ones(2, 3, 1, dtype=torch.float64),
                       torch.ones(2, 1, dtype=torch.float64))


@pytest.mark.parametrize("path", [*CPU_PATHS, pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kernel_shape", [(4, 3), (5, 4, 3)], ids=["depthwise", "standard"])
@pytest.mark.parametrize("projected", [False, True], ids=["values", "projected-source"])
def test_neighbour_conv_of_an_empty_batch_is_empty_with_zero_parameter_gradients(kernel_shape, projected, path,
                                                                                monkeypatch):
    select_path(path, monkeypatch)
    source = torch.randn(0, 6, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(0, 6, 3, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(kernel_shape, dtype=torch.float64, requires_grad=True)
    value_weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True) if projected else None
    out = neighbour_conv(source, torch.zeros(0, 6, 3, dtype=torch.long), weights, kernel, value_weight)
    assert out.shape == (0, 6, kernel_shape[0])
    wanted = [source, weights, kernel] + ([value_weight] if projected else [])
    gradients = torch.autograd.grad(out.sum(), wanted)
    for tensor, gradient in zip(wanted, gradients):
        assert gradient.shape == tensor.shape
        assert not gradient.any()


@pytest.mark.parametrize("path", [*CPU_PATHS, pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
@pytest.mark.parametrize("projected", [False, True], ids=["values", "projected-source"])
def test_gradcheck_neighbour_conv(kernel_shape, projected, path, monkeypatch):
    select_path(path, monkeypatch)
    inputs = neighbour_conv_inputs(kernel_shape, projected)
    assert torch.autograd.gradcheck(neighbour_conv, inputs)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
@pytest.mark.parametrize("projected", [False, True], ids=["values", "projected-source"])
def test_neighbour_conv_operator_registration_is_consistent(kernel_shape, projected, path, monkeypatch):
    # Shapes from the fake kernel, schema, autograd registration and AOT tracing, as torch.compile sees them.
    select_path(path, monkeypatch)
    torch.library.opcheck(torch.ops.convnn.neighbour_bags.default, neighbour_conv_inputs(kernel_shape, projected))


@pytest.mark.parametrize("standard", [False, True], ids=["depthwise", "standard"])
def test_triton_kernel_operators_are_registered_consistently(standard, triton_interpreter):
    torch.manual_seed(0)
    batch, seq_len, slots, channels = 2, 6, 3, 5
    neighbours = torch.randint(0, seq_len, (batch, seq_len, slots))
    weights = torch.randn(batch, seq_len, slots)
    if standard:
        table, scale, slot_stride = torch.randn(batch * seq_len, slots * channels), None, channels
    else:
        table, scale, slot_stride = torch.randn(batch * seq_len, channels), torch.randn(channels, slots), 0
    torch.library.opcheck(torch.ops.convnn.slot_gather.default,
                          (table, neighbours, weights, scale, slot_stride, channels))
    accumulators = torch.zeros(table.numel() + weights.numel() + (0 if scale is None else scale.numel()))
    torch.library.opcheck(torch.ops.convnn.slot_gather_backward.default,
                          (torch.randn(batch, seq_len, channels), table, neighbours, weights, scale, slot_stride,
                           accumulators))


def test_gpus_take_the_triton_kernels_unless_results_must_be_reproducible():
    on_gpu = types.SimpleNamespace(is_cuda=True)
    assert not neighbour_conv_module._uses_triton(torch.zeros(1))
    assert neighbour_conv_module._uses_triton(on_gpu) == (importlib.util.find_spec("triton") is not None)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not neighbour_conv_module._uses_triton(on_gpu)
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
@pytest.mark.parametrize("projected", [False, True], ids=["values", "projected-source"])
@pytest.mark.parametrize("path", ["one-chunk", "triton"])
def test_neighbour_conv_flops_are_those_of_the_convolution_it_computes(kernel_shape, projected, path, monkeypatch):
    select_path(path, monkeypatch)
    source, neighbours, weights, kernel, value_weight = neighbour_conv_inputs(kernel_shape, projected)
    with FlopCounterMode(display=False) as counted:
        neighbour_conv(source, neighbours, weights, kernel, value_weight)
    with FlopCounterMode(display=False) as plain:
        values = source if value_weight is None else source @ value_weight.t()
        batch, seq_len, slots = neighbours.shape
        gathered = values[torch.arange(batch).view(-1, 1, 1), neighbours] * weights.unsqueeze(-1)
        sequence = gathered.reshape(batch, seq_len * slots, -1).transpose(1, 2)
        if kernel.dim() == 2:
            F.conv1d(sequence, kernel.unsqueeze(1), stride=slots, groups=kernel.shape[0])
        else:
            F.conv1d(sequence, kernel, stride=slots)
    assert counted.get_total_flops() == plain.get_total_flops() > 0


def test_compiled_layer_calls_the_aggregation_operator_instead_of_tracing_its_loop():
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    layer = make_layer().float().train()
    torch.compile(layer, backend=capture, fullgraph=True)(torch.randn(2, SEQ_LEN, WIDTH))
    called = {node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert torch.ops.convnn.neighbour_bags.default in called
    assert torch.index_select not in called


@pytest.mark.parametrize("path", ["one-chunk", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
def test_compiled_neighbour_conv_gives_the_eager_result(kernel_shape, path, monkeypatch):
    select_path(path, monkeypatch)
    torch._dynamo.reset()
    inputs = neighbour_conv_inputs(kernel_shape, projected=True, dtype=torch.float32)
    differentiable = [tensor for tensor in inputs if tensor is not None and tensor.requires_grad]
    results = []
    for function in (neighbour_conv, torch.compile(neighbour_conv, fullgraph=True)):
        out = function(*inputs)
        results.append((out, torch.autograd.grad(out.square().sum(), differentiable)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_neighbour_conv_handles_repeated_neighbours(aggregation_path):
    values = torch.arange(6.0, dtype=torch.float64).view(1, 3, 2).requires_grad_()
    neighbours = torch.tensor([[[1, 1], [0, 2], [2, 2]]])
    weights = torch.ones(1, 3, 2, dtype=torch.float64)
    out = neighbour_conv(values, neighbours, weights, torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[[4.0, 6.0], [4.0, 6.0], [8.0, 10.0]]], dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]], dtype=torch.float64))


def test_all_tokens_with_softmax_and_unit_depthwise_weights_is_single_head_attention():
    layer = make_layer(K=SEQ_LEN, magnitude_type="matmul", softmax_topk_val=True, convolution_type="depthwise")
    torch.nn.init.ones_(layer.conv.weight)
    x = torch.randn(3, SEQ_LEN, WIDTH, dtype=torch.float64)
    q, k, v = (x @ w.weight.t() for w in (layer.W_q, layer.W_k, layer.W_v))
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(WIDTH), dim=-1) @ v
    torch.testing.assert_close(layer(x), attention @ layer.W_o.weight.t(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [3, 4, 5])
def test_loc_similarity_with_standard_convolution_is_a_conv1d(K):
    seq_len = 23
    layer = MultiHeadConvNNAttention(d_hidden=WIDTH, num_heads=1, attention_dropout=0.0, K=K, num_tokens=seq_len,
                                     similarity_type="Loc", convolution_type="standard").double().eval()
    x = torch.randn(2, seq_len, WIDTH, dtype=torch.float64)
    v = (x @ layer.W_v.weight.t()).transpose(1, 2)
    conv = F.conv1d(v, layer.conv.weight, padding=K // 2)[..., :seq_len].transpose(1, 2)
    expected = conv @ layer.W_o.weight.t()
    interior = slice(K, seq_len - K)
    torch.testing.assert_close(layer(x)[:, interior], expected[:, interior], rtol=0, atol=1e-12)


def test_sampled_modes_put_the_token_itself_in_slot_zero_and_never_again():
    for sampling_type in ("random", "spatial"):
        layer = make_layer(sampling_type=sampling_type, K=3)
        layer.train()
        neighbours, weights = layer.neighbours_and_weights(torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64))
        tokens = torch.arange(SEQ_LEN).view(1, -1)
        assert torch.equal(neighbours[..., 0], tokens.expand(2, -1))
        assert not (neighbours[..., 1:] == tokens.unsqueeze(-1)).any()


def test_random_sampling_draws_fresh_candidates_in_training_and_fixed_ones_in_evaluation():
    layer = make_layer(sampling_type="random")
    layer.train()
    draws = {tuple(layer.sample_candidates(SEQ_LEN, torch.device("cpu")).tolist()) for _ in range(10)}
    assert len(draws) > 1
    assert all(len(set(draw)) == 7 for draw in draws)
    layer.eval()
    first, second = (layer.sample_candidates(SEQ_LEN, torch.device("cpu")) for _ in range(2))
    assert torch.equal(first, second) and len(set(first.tolist())) == 7


def test_spatial_grid_follows_linspace_rows_and_columns():
    grid = spatial_grid((8, 8), 3, 1)  # rows/cols round(linspace(1, 6, 3)) = 1, 4 (3.5 rounds to even), 6
    rows_cols = [(int(t - 1) // 8, int(t - 1) % 8) for t in grid]
    assert rows_cols == [(r, c) for r in (1, 4, 6) for c in (1, 4, 6)]


def test_euclidean_distance_is_never_nan_for_identical_query_and_key():
    layer = make_layer(magnitude_type="euclidean")
    layer.W_k.weight.data.copy_(layer.W_q.weight.data)
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_recorded_selection_is_what_the_forward_pass_used():
    layer = make_layer(sampling_type="random", K=3, convolution_type="depthwise")
    torch.nn.init.ones_(layer.conv.weight)
    layer.record_selection = True
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    out = layer(x)
    neighbours, weights, candidates = layer.last_selection
    assert candidates is not None and len(candidates) == 7
    assert set(neighbours[..., 1:].unique().tolist()) <= set(candidates.tolist())
    v = x @ layer.W_v.weight.t()
    rebuilt = torch.stack([(weights[b].unsqueeze(-1) * v[b, neighbours[b]]).sum(1) for b in range(2)])
    torch.testing.assert_close(out, rebuilt @ layer.W_o.weight.t(), rtol=0, atol=1e-12)
    layer.record_selection = False
    layer.last_selection = None
    layer(x)
    assert layer.last_selection is None


@pytest.mark.parametrize("convolution_type", ["standard", "depthwise", "depthwise-separable"])
@pytest.mark.parametrize("aggregation_type", ["Col", "Loc_Col"])
def test_autocast_runs_in_one_dtype_and_stays_close_to_float32(convolution_type, aggregation_type, aggregation_path):
    # Positional selection keeps bfloat16 from flipping near-tied neighbours, so the aggregation's
    # numerics can be compared; feature selection is checked for dtypes and finiteness.
    torch.manual_seed(0)
    options = dict(d_hidden=16, K=3, attention_dropout=0.0, num_tokens=17, convolution_type=convolution_type,
                   aggregation_type=aggregation_type)
    for similarity_type in ("Loc", "Col"):
        layer = MultiHeadConvNNAttention(**options, similarity_type=similarity_type).eval()
        x = torch.randn(2, 17, 16, requires_grad=True)
        exact = layer(x)
        (exact_grad,) = torch.autograd.grad(exact.sum(), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
        (mixed_grad,) = torch.autograd.grad(mixed.float().sum(), x)
        assert mixed.dtype == torch.bfloat16 and mixed_grad.dtype == torch.float32
        assert torch.isfinite(mixed).all() and torch.isfinite(mixed_grad).all()
        if similarity_type == "Loc":
            assert (mixed.float() - exact).norm() / exact.norm() < 0.02
            assert (mixed_grad - exact_grad).norm() / exact_grad.norm() < 0.02


def test_cpu_aggregation_dispatches_a_fixed_number_of_operations_whatever_K():
    # Walking the slots one at a time dispatched about 3 operations per slot forward and 7 backward.
    counts = []
    for slots in (3, 9):
        torch.manual_seed(0)
        source, weights = torch.randn(2, 12, 5), torch.randn(2, 12, slots)
        neighbours, kernel, value_weight = torch.randint(0, 12, (2, 12, slots)), torch.randn(5, slots), torch.randn(5, 5)
        with_inputs = (source, neighbours, weights, kernel, value_weight)
        counts.append(benchmark.dispatched_operations(lambda: (
            neighbour_conv_module._forward(*with_inputs),
            neighbour_conv_module._backward_kernel(torch.randn(2, 12, 5), *with_inputs))))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
def test_aggregation_keeps_only_its_inputs_for_backward(kernel_shape, aggregation_path):
    inputs = neighbour_conv_inputs(kernel_shape, projected=True, dtype=torch.float32)
    kept = benchmark.saved_bytes(lambda: neighbour_conv(*inputs))
    assert kept == sum(tensor.untyped_storage().nbytes() for tensor in inputs)


def aggregation_results(inputs):
    out = neighbour_conv(*inputs)
    learnable = [tensor for tensor in inputs if tensor is not None and tensor.requires_grad]
    return (out, *torch.autograd.grad(out.square().sum(), learnable))


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("kernel_shape", [(5, 3), (4, 5, 3)], ids=["depthwise", "standard"])
@pytest.mark.parametrize("projected", [False, True], ids=["values", "projected-source"])
def test_aggregation_scratch_block_is_reused_and_never_reaches_the_results(kernel_shape, projected, path,
                                                                           monkeypatch):
    # The chunks' tables, values and value gradients live in a per-thread block kept between calls: what it holds
    # from an earlier call must not leak into a result, and no result may be a view of it.
    select_path(path, monkeypatch)
    inputs = neighbour_conv_inputs(kernel_shape, projected)
    first = aggregation_results(inputs)
    block = neighbour_conv_module._scratch_blocks.by_dtype[torch.float64]
    block.fill_(float("nan"))
    second = aggregation_results(inputs)
    assert neighbour_conv_module._scratch_blocks.by_dtype[torch.float64] is block
    for earlier, later in zip(first, second):
        torch.testing.assert_close(later, earlier, rtol=0, atol=0)
        assert later.untyped_storage().data_ptr() != block.untyped_storage().data_ptr()


def test_aggregation_scratch_blocks_belong_to_one_thread_each():
    # Calls from two threads at once (the operators release the GIL) would overwrite each other's chunks in a
    # shared block.
    inputs = [neighbour_conv_inputs((5, 3), projected) for projected in (False, True)]
    expected = [aggregation_results(given) for given in inputs]
    blocks, mismatches = [], []

    def repeat(given, wanted):
        for _ in range(20):
            got = aggregation_results(given)
            mismatches.extend(not torch.equal(a, b) for a, b in zip(got, wanted))
        blocks.append(neighbour_conv_module._scratch_blocks.by_dtype[torch.float64])

    threads = [threading.Thread(target=repeat, args=pair) for pair in zip(inputs, expected)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(mismatches) == 20 * sum(len(wanted) for wanted in expected) and not any(mismatches)
    assert len({id(block) for block in blocks}) == 2
    assert all(block is not neighbour_conv_module._scratch_blocks.by_dtype[torch.float64] for block in blocks)


def test_aggregation_made_under_inference_mode_then_trained_on(monkeypatch):
    # The scratch block is created on the first call; made as an inference tensor it could not be written by a
    # training step afterwards.
    monkeypatch.setattr(neighbour_conv_module._scratch_blocks, "by_dtype", {})
    inputs = neighbour_conv_inputs((5, 3), projected=True)
    with torch.inference_mode():
        evaluated = neighbour_conv(*[tensor.detach() for tensor in inputs])
    assert not neighbour_conv_module._scratch_blocks.by_dtype[torch.float64].is_inference()
    trained = aggregation_results(inputs)
    torch.testing.assert_close(trained[0], evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("convolution_type", CONVOLUTION_TYPES)
def test_layer_input_gradients_are_summed_in_place(convolution_type, path, monkeypatch):
    # The layer's input reaches the selection (as queries and as keys) and the aggregation (which projects it to
    # values itself); autograd sums their gradients in place only when one of them is a tensor of its own. A view
    # returned by the aggregation made it allocate a fresh (B, N, D) sum at every step, page-faulted in at large
    # sizes.
    from torch.profiler import profile

    select_path(path, monkeypatch)
    layer = make_layer(convolution_type=convolution_type).float().train()
    source = torch.randn(2, SEQ_LEN, WIDTH, requires_grad=True)
    with profile(record_shapes=True) as profiled:
        layer(source * 1.0).sum().backward()
    sums = [event.name for event in profiled.events() if event.name in ("aten::add", "aten::add_")
            and event.input_shapes and event.input_shapes[0] == list(source.shape)]
    assert sums and "aten::add" not in sums


def test_layer_on_the_gpu_path_dispatches_at_most_30_operations(triton_interpreter):
    # Walking the slots, the aggregation alone dispatched about 90 for K = 9; attention dispatches 16.
    rows = {row["layer"]: row for row in benchmark.operation_table(torch.device("cpu"))}
    convnn = rows["ConvNNAttention"]
    assert convnn["operations"] <= 30
    assert convnn["by_operator"]["convnn::slot_gather"] == convnn["by_operator"]["convnn::slot_gather_backward"] == 1
    assert rows["Attention"]["operations"] > 0


@pytest.fixture(params=["dense", "sparse"])
def selection_backward(request, monkeypatch):
    """Both forms of top_scores' backward: through the (B, N, r) matrix, and over the chosen pairs only."""
    threshold = 10**9 if request.param == "dense" else 0
    monkeypatch.setattr(neighbour_selection_module, "DENSE_CANDIDATES_PER_CHOICE", threshold)


def top_scores_inputs(with_bias, count=3):
    torch.manual_seed(0)
    batch, seq_len, candidates, width = 2, 7, 5, 4
    queries = torch.randn(batch, seq_len, width, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(batch, candidates, width, dtype=torch.float64, requires_grad=True)
    bias = None
    if with_bias:  # a coordinate-like term, and pairs excluded as a token is from its own sampled candidates
        bias = torch.randn(seq_len, candidates, dtype=torch.float64).masked_fill(
            torch.eye(seq_len, candidates, dtype=torch.bool), float("-inf"))
    return queries, keys, bias, count


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_top_scores_is_topk_of_the_scores_with_the_same_gradients(with_bias, selection_backward):
    queries, keys, bias, count = top_scores_inputs(with_bias)
    values, indices = top_scores(queries, keys, bias, count, True)
    scores = queries @ keys.transpose(1, 2) + (0.0 if bias is None else bias)
    plain_values, plain_indices = torch.topk(scores, count, dim=-1)
    assert torch.equal(indices, plain_indices)
    torch.testing.assert_close(values, plain_values, rtol=0, atol=1e-12)
    grad = torch.randn_like(values)
    for fast, plain in zip(torch.autograd.grad(values, (queries, keys), grad),
                           torch.autograd.grad(plain_values, (queries, keys), grad)):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_top_scores_do_not_depend_on_what_the_scratch_block_holds(with_bias, selection_backward):
    # The scores (and the dense backward's score gradients) are written into the thread's scratch block.
    queries, keys, bias, count = top_scores_inputs(with_bias)
    plain_values, plain_indices = torch.topk(queries @ keys.transpose(1, 2) + (0.0 if bias is None else bias), count)
    plain_grads = torch.autograd.grad(plain_values, (queries, keys), torch.ones_like(plain_values))
    top_scores(queries, keys, bias, count, True)
    neighbour_conv_module._scratch_blocks.by_dtype[torch.float64].fill_(float("nan"))
    values, indices = top_scores(queries, keys, bias, count, True)
    assert torch.equal(indices, plain_indices)
    torch.testing.assert_close(values, plain_values, rtol=0, atol=1e-12)
    for fast, plain in zip(torch.autograd.grad(values, (queries, keys), torch.ones_like(values)), plain_grads):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


def test_scratch_requests_over_the_cap_get_fresh_memory(monkeypatch):
    # The block a thread keeps is bounded: larger requests (the scores of a large batch) are not kept.
    monkeypatch.setattr(neighbour_conv_module._scratch_blocks, "by_dtype", {})
    monkeypatch.setattr(neighbour_conv_module, "SCRATCH_BYTES", 64)
    like = torch.zeros(1)
    (small,) = neighbour_conv_module.scratch_buffers(like, (16,))
    first, second = neighbour_conv_module.scratch_buffers(like, (4, 12))
    assert first.data_ptr() == small.data_ptr() and second.data_ptr() == small.data_ptr() + 16
    (large,) = neighbour_conv_module.scratch_buffers(like, (17,))
    assert large.numel() == 17 and large.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
    assert neighbour_conv_module._scratch_blocks.by_dtype[torch.float32].numel() == 16


def test_top_scores_backward_with_scores_wider_than_its_inputs(selection_backward):
    # Under CPU autocast the queries and keys are bfloat16 and a coordinate bias float32, so the scores and their
    # gradients are float32: the dense backward scattered them into a bfloat16 matrix and stopped with an error.
    queries, keys, bias, count = top_scores_inputs(True)
    queries, keys = (tensor.detach().to(torch.bfloat16).requires_grad_() for tensor in (queries, keys))
    bias = bias.float()
    values, indices = top_scores(queries, keys, bias, count, True)
    plain_values, plain_indices = torch.topk(queries @ keys.transpose(1, 2) + bias, count, dim=-1)
    assert values.dtype == torch.float32 and torch.equal(indices, plain_indices)
    grad = torch.randn_like(values)
    for fast, plain in zip(torch.autograd.grad(values, (queries, keys), grad),
                           torch.autograd.grad(plain_values, (queries, keys), grad)):
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast, plain, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_gradcheck_top_scores(with_bias, largest, selection_backward):
    queries, keys, bias, count = top_scores_inputs(with_bias and largest)
    assert torch.autograd.gradcheck(lambda q, k: top_scores(q, k, bias, count, largest)[0], (queries, keys))


def test_top_scores_of_no_candidates_passes_back_zeros(selection_backward):
    queries, keys, _, _ = top_scores_inputs(False)
    values, indices = top_scores(queries, keys, None, 0, True)
    assert values.shape == indices.shape == (2, 7, 0)
    grad_queries, grad_keys = torch.autograd.grad(values.sum(), (queries, keys), materialize_grads=True)
    assert not grad_queries.any() and not grad_keys.any()


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_top_scores_operators_are_registered_consistently(with_bias, selection_backward):
    queries, keys, bias, count = top_scores_inputs(with_bias)
    torch.library.opcheck(torch.ops.convnn.top_scores.default, (queries, keys, bias, count, True))
    indices = top_scores(queries, keys, bias, count, True)[1]
    torch.library.opcheck(torch.ops.convnn.top_scores_gradients.default,
                          (torch.randn(indices.shape, dtype=torch.float64), queries.detach(), keys.detach(), indices))


@pytest.mark.slow
def test_compiled_top_scores_gives_the_eager_result(selection_backward):
    torch._dynamo.reset()
    queries, keys, bias, count = top_scores_inputs(True)
    results = []
    for function in (top_scores, torch.compile(top_scores, fullgraph=True)):
        values, indices = function(queries, keys, bias, count, True)
        results.append((values, indices, torch.autograd.grad(values.square().sum(), (queries, keys))))
    (values, indices, grads), (compiled_values, compiled_indices, compiled_grads) = results
    assert torch.equal(compiled_indices, indices)
    torch.testing.assert_close(compiled_values, values)
    for grad, compiled_grad in zip(grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, grad)


@pytest.mark.parametrize("sampling_type", ["all", "random"])
def test_cpu_selection_sparse_backward_forms_no_token_by_candidate_matrix(sampling_type, monkeypatch):
    # topk's backward scattered K gradients per row into a zero (B, N, r) matrix that two matrix products then read;
    # the sparse backward, which large candidate sets take, does not.
    monkeypatch.setattr(neighbour_selection_module, "DENSE_CANDIDATES_PER_CHOICE", 0)
    seq_len = 65
    layer = MultiHeadConvNNAttention(d_hidden=WIDTH, K=2, num_tokens=seq_len, sampling_type=sampling_type,
                                     num_samples=seq_len).train()
    x = torch.randn(2, seq_len, WIDTH, requires_grad=True)
    out = layer(x)
    shapes = []

    class RecordShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            shapes.extend(tuple(tensor.shape) for tensor in torch.utils._pytree.tree_leaves(result)
                          if isinstance(tensor, torch.Tensor))
            return result

    with RecordShapes():
        out.sum().backward()
    assert shapes and all(shape[-2:] != (seq_len, seq_len) for shape in shapes)
    assert x.grad is not None and layer.W_q.weight.grad.abs().sum() > 0


def test_layer_flops_count_the_similarity_on_the_cpu_path_as_on_the_dense_one(monkeypatch):
    layer = make_layer(K=3).float()
    x = torch.randn(2, SEQ_LEN, WIDTH)
    counts = []
    for dense in (False, True):
        monkeypatch.setattr(vit_layers_module, "takes_gpu_path", lambda source: dense)
        with FlopCounterMode(display=False) as counted:
            layer(x)
        counts.append(counted.get_total_flops())
    assert counts[0] == counts[1] > 0
