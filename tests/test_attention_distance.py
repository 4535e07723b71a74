"""The distance summary of every layer kind: the attention probabilities the layers record are those their
forward used, the distances match plain float64 references on hand-made probabilities, a convolution's reach is
the receptive field of its kernel, and the spectrum script draws several runs on one figure."""

import csv
import itertools
import math

import pytest
import torch

import vit_main
from models.vit import ViT
from models.vit_layers import (
    MultiHeadAttention,
    MultiHeadBranchingAttention,
    MultiHeadConv1dAttention,
    MultiHeadKvtAttention,
    MultiHeadLocalAttention,
    MultiHeadSparseAttention,
)
from scripts import neighbour_maps, spectrum
from tests.helpers import expect_one_line_error

SIDE = 4  # the tiny runs: 32 px images, patch 8
TOKENS = SIDE * SIDE + 1
WIDTH, HEADS = 12, 3

# Per attention layer: how to build it, and its value and output projections.
ATTENTION_LAYERS = {
    "Attention": (lambda: MultiHeadAttention(WIDTH, HEADS),
                  lambda layer, x: layer.W_v(x), lambda layer: layer.W_o),
    "Kvt": (lambda: MultiHeadKvtAttention(WIDTH, HEADS, K=4, num_tokens=TOKENS),
            lambda layer, x: layer.qkv(x).chunk(3, dim=-1)[2], lambda layer: layer.proj),
    "Local": (lambda: MultiHeadLocalAttention(WIDTH, 2, local_window=2),
              lambda layer, x: layer.to_qkv(x).chunk(3, dim=-1)[2], lambda layer: layer.to_out),
    "Sparse local": (lambda: MultiHeadSparseAttention(WIDTH, HEADS, sparse_mode="local", sparse_context_window=5),
                     lambda layer, x: layer.v_proj(x), lambda layer: layer.out_proj),
    "Sparse strided": (lambda: MultiHeadSparseAttention(WIDTH, HEADS, sparse_mode="strided", sparse_context_window=3),
                       lambda layer, x: layer.v_proj(x), lambda layer: layer.out_proj),
}


def split_heads(x, num_heads):
    batch, seq_len, width = x.shape
    return x.view(batch, seq_len, num_heads, width // num_heads).transpose(1, 2)


def patch_distance(query, key):
    """Grid distance between patch tokens (1-based, raster order on the SIDE x SIDE grid)."""
    return math.dist(divmod(query - 1, SIDE), divmod(key - 1, SIDE))


def reference_summary(probabilities):
    """(mean distance, class-token share) of ``(..., N, N)`` probabilities, by plain float64 loops over patch
    queries and patch keys: the distance per unit of mass on patches, pooled over everything."""
    flat = probabilities.double().reshape(-1, TOKENS, TOKENS).tolist()
    weighted, patch_mass, class_mass = 0.0, 0.0, 0.0
    for matrix in flat:
        for query in range(1, TOKENS):
            class_mass += matrix[query][0]
            for key in range(1, TOKENS):
                weighted += matrix[query][key] * patch_distance(query, key)
                patch_mass += matrix[query][key]
    return weighted / patch_mass, class_mass / (patch_mass + class_mass)


def tally(probabilities):
    result = neighbour_maps.DistanceTally()
    result.add(probabilities, neighbour_maps.patch_distances(SIDE))
    return result


# ---------------------------------------------------------------------------------------------
# Recording attention probabilities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTENTION_LAYERS)
def test_recorded_probabilities_produce_the_fast_paths_output(name):
    build, values, output = ATTENTION_LAYERS[name]
    torch.manual_seed(0)
    layer = build().double().eval()
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.float64)
    fast = layer(x)
    assert layer.last_attention is None  # nothing is kept while recording is off

    layer.record_attention = True
    recorded = layer(x)
    probabilities = layer.last_attention

    torch.testing.assert_close(recorded, fast)
    heads = probabilities.shape[1]
    assert probabilities.shape == (2, heads, TOKENS, TOKENS)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, heads, TOKENS, dtype=torch.float64))
    rebuilt = output(layer)((probabilities @ split_heads(values(layer, x), heads)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(rebuilt, fast)


def test_recorded_attention_is_the_softmax_of_scaled_scores():
    torch.manual_seed(1)
    layer = MultiHeadAttention(WIDTH, HEADS).double().eval()
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.float64)
    layer.record_attention = True
    layer(x)
    q, k = split_heads(layer.W_q(x), HEADS), split_heads(layer.W_k(x), HEADS)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS), dim=-1)
    torch.testing.assert_close(layer.last_attention, expected)


def test_masked_keys_get_no_probability():
    layer = MultiHeadSparseAttention(WIDTH, HEADS, sparse_mode="local", sparse_context_window=3).eval()
    layer.record_attention = True
    layer(torch.randn(1, TOKENS, WIDTH))
    offsets = (torch.arange(TOKENS).view(-1, 1) - torch.arange(TOKENS).view(1, -1)).abs()
    assert torch.all(layer.last_attention[..., offsets > 1] == 0)


def test_collected_records_follow_forward_order_and_recording_is_switched_off():
    torch.manual_seed(0)
    model = ViT(img_size=32, num_classes=3, layer="BranchAttention", patch_size=8, num_layers=2, num_heads=2,
                d_hidden=16, d_mlp=16, layer_options={"K": 3}).eval()
    records = neighbour_maps.collect_records(model, torch.randn(2, 3, 32, 32))
    assert [neighbour_maps.layer_label(record.name) for record in records] == [
        "block 0 (ConvNN branch)", "block 0 (attention branch)",
        "block 1 (ConvNN branch)", "block 1 (attention branch)"]
    assert records[1].probabilities.shape == (2, 2, TOKENS, TOKENS)
    branches = [module for module in model.modules() if isinstance(module, MultiHeadBranchingAttention)]
    assert all(not b.attention.record_attention and b.attention.last_attention is None for b in branches)
    assert all(not b.convnn.record_selection and b.convnn.last_selection is None for b in branches)


# ---------------------------------------------------------------------------------------------
# Distances against plain references
# ---------------------------------------------------------------------------------------------


def test_uniform_attention_is_the_mean_distance_between_patches():
    result = tally(torch.full((1, TOKENS, TOKENS), 1.0 / TOKENS))
    pairs = list(itertools.product(range(1, TOKENS), repeat=2))
    assert result.mean_distance == pytest.approx(sum(patch_distance(q, k) for q, k in pairs) / len(pairs), rel=1e-12)
    assert result.class_token_fraction == pytest.approx(1 / TOKENS, rel=1e-12)


def test_identity_attention_has_distance_zero():
    result = tally(torch.eye(TOKENS).expand(3, -1, -1))
    assert result.mean_distance == 0.0 and result.class_token_fraction == 0.0


def test_random_probabilities_match_the_float64_reference():
    torch.manual_seed(2)
    probabilities = torch.softmax(3 * torch.randn(2, TOKENS, TOKENS), dim=-1)
    distance, share = reference_summary(probabilities)
    result = tally(probabilities)
    assert result.mean_distance == pytest.approx(distance, rel=1e-9)
    assert result.class_token_fraction == pytest.approx(share, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_kernel_coverage_is_the_conv1d_layers_receptive_field():
    for kernel_size in (1, 2, 3, 4, 9):
        torch.manual_seed(0)
        layer = MultiHeadConv1dAttention(4, 2, kernel_size=kernel_size, num_tokens=TOKENS).double()
        x = torch.randn(1, TOKENS, 4, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(layer, x).abs().sum(dim=(0, 2, 3, 5))  # (N out, N in)
        assert torch.equal((jacobian > 0).double(), neighbour_maps.kernel_coverage(kernel_size, TOKENS)), kernel_size


# ---------------------------------------------------------------------------------------------
# Summaries of tiny models with hand-made probabilities
# ---------------------------------------------------------------------------------------------


def tiny_model(tiny_argv, tmp_path, layer, *flags):
    args = vit_main.build_parser().parse_args(tiny_argv(tmp_path, "--layer", layer, *flags))
    model = ViT(**vit_main.model_config(args, img_size=32, num_classes=10)).eval()
    return model, args


def zero_queries_and_keys(model):
    """Every score 0: each query spreads its probability evenly over the keys its mask allows."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("W_q.weight", "W_k.weight", "q_proj.weight", "k_proj.weight")):
                parameter.zero_()


def test_attention_summary_of_uniform_attention_per_block_and_head(tiny_argv, tmp_path):
    model, args = tiny_model(tiny_argv, tmp_path, "Attention")
    zero_queries_and_keys(model)
    rows = neighbour_maps.summarise(model, args, max_images=3, batch_size=2)

    distance, share = reference_summary(torch.full((1, TOKENS, TOKENS), 1.0 / TOKENS))
    assert [(row["block"], row["head"]) for row in rows] == list(itertools.product([0, 1], ["all", 0, 1]))
    for row in rows:
        assert row["kind"] == "attention"
        assert row["mean_distance"] == pytest.approx(distance, rel=1e-6)
        assert row["class_token_fraction"] == pytest.approx(share, rel=1e-6)


def test_sparse_window_summary_against_the_reference(tiny_argv, tmp_path):
    model, args = tiny_model(tiny_argv, tmp_path, "SparseAttention", "--sparse_mode", "local",
                             "--sparse_context_window", "3")
    zero_queries_and_keys(model)
    rows = neighbour_maps.summarise(model, args, max_images=2, batch_size=2)

    within = (torch.arange(TOKENS).view(-1, 1) - torch.arange(TOKENS).view(1, -1)).abs() <= 1
    distance, share = reference_summary(within.double() / within.sum(-1, keepdim=True))
    for row in rows:
        assert row["mean_distance"] == pytest.approx(distance, rel=1e-6)
        assert row["class_token_fraction"] == pytest.approx(share, rel=1e-6)


def test_a_window_of_zero_attends_to_the_token_itself(tiny_argv, tmp_path):
    model, args = tiny_model(tiny_argv, tmp_path, "LocalAttention", "--local_window", "0", "--num_heads", "1")
    rows = neighbour_maps.summarise(model, args, max_images=2, batch_size=2)
    assert [(row["block"], row["head"]) for row in rows] == [(0, "all"), (1, "all")]
    assert all(row["mean_distance"] == 0.0 and row["class_token_fraction"] == 0.0 for row in rows)


def test_conv1d_reach_against_the_reference(tiny_argv, tmp_path):
    kernel_size = 3
    model, args = tiny_model(tiny_argv, tmp_path, "Conv1d", "--kernel_size", kernel_size)
    rows = neighbour_maps.summarise(model, args, max_images=1, batch_size=1)

    # Patch t reads tokens t-1, t, t+1 that exist; token 0 is the class token.
    distances, class_taps, taps = [], 0, 0
    for token in range(1, TOKENS):
        for read in range(max(token - 1, 0), min(token + 1, TOKENS - 1) + 1):
            taps += 1
            if read == 0:
                class_taps += 1
            else:
                distances.append(patch_distance(token, read))
    assert len(rows) == 2
    for row in rows:
        assert row["kind"] == "convolution" and row["head"] == "all"
        assert row["mean_distance"] == pytest.approx(sum(distances) / len(distances), rel=1e-12)
        assert row["class_token_fraction"] == pytest.approx(class_taps / taps, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The command lines
# ---------------------------------------------------------------------------------------------


def save_untrained_run(tiny_argv, output_dir, layer, *flags):
    output_dir.mkdir(parents=True, exist_ok=True)
    args = vit_main.build_parser().parse_args(tiny_argv(output_dir, "--layer", layer, *flags))
    model = ViT(**vit_main.model_config(args, img_size=32, num_classes=10))
    torch.save({"model": model.state_dict(), "args": vars(args)}, output_dir / "best.pt")
    return output_dir


def test_summary_csv_of_an_attention_run(tiny_argv, tmp_path, capsys):
    run = save_untrained_run(tiny_argv, tmp_path / "run", "BranchAttention", "--K", "3")
    paths = neighbour_maps.main([str(run), "--images", "0", "--summary", "--max_images", "4"])

    out = run / "neighbour_maps"
    assert paths == [str(out / name) for name in ("image_0.png", "summary.png", "summary.csv")]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == neighbour_maps.SUMMARY_COLUMNS
    block_0 = [(row["layer"], row["kind"], row["head"]) for row in rows if row["block"] == "0"]
    assert block_0 == [("transformer_encoder.0.attention.convnn", "ConvNN", "all"),
                       ("transformer_encoder.0.attention.attention", "attention", "all"),
                       ("transformer_encoder.0.attention.attention", "attention", "0"),
                       ("transformer_encoder.0.attention.attention", "attention", "1")]
    convnn, attention = rows[0], rows[1]
    assert int(convnn["patch_selections"]) + int(convnn["class_token_selections"]) == 4 * 16 * 3
    assert attention["patch_selections"] == "" and 0 <= float(attention["class_token_fraction"]) <= 1
    assert "block 0 (attention branch)" in capsys.readouterr().out


def test_a_conv1d_run_is_summarised_without_maps(tiny_argv, tmp_path):
    run = save_untrained_run(tiny_argv, tmp_path / "run", "Conv1d")
    paths = neighbour_maps.main([str(run), "--summary"])
    assert [path.rsplit("/", 1)[-1] for path in paths] == ["summary.png", "summary.csv"]


@pytest.mark.slow
def test_spectrum_of_several_runs(tiny_argv, tmp_path, capsys):
    runs = [save_untrained_run(tiny_argv, tmp_path / name, layer, *flags) for name, layer, flags in [
        ("attention", "Attention", ()), ("k4", "ConvNNAttention", ("--K", "4")),
        ("k9", "ConvNNAttention", ("--K", "9")), ("conv", "Conv1d", ()), ("branch", "BranchConv", ("--K", "4"))]]
    output = tmp_path / "spectrum.png"
    assert spectrum.main([*map(str, runs), "--output", str(output), "--max_images", "4"]) == str(output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectrum_legend_names_layer_and_k():
    rows = [{"layer": f"transformer_encoder.{block}.attention.{branch}", "kind": kind, "block": block, "head": "all",
             "mean_distance": 1.0, "class_token_fraction": 0.0}
            for block in range(2) for branch, kind in (("convnn", "ConvNN"), ("conv1d", "convolution"))]
    series = spectrum.run_series("BranchConv K=4", rows)
    assert [(name, kind, len(members)) for name, kind, members in series] == [
        ("BranchConv K=4 (ConvNN branch)", "ConvNN", 2), ("BranchConv K=4 (Conv1d branch)", "convolution", 2)]
    assert spectrum.distinct_labels(["Attention", "Attention", "Conv1d kernel 9"], ["a/x", "b/y", "c"]) == [
        "Attention [x]", "Attention [y]", "Conv1d kernel 9"]


def test_spectrum_refuses_runs_on_different_grids(tiny_argv, tmp_path, capsys):
    first = save_untrained_run(tiny_argv, tmp_path / "a", "Attention")
    second = save_untrained_run(tiny_argv, tmp_path / "b", "Attention", "--patch_size", "4")
    expect_one_line_error(capsys, [first, second, "--output", tmp_path / "s.png"], 2,
                          f"{second}: its patch grid is 8x8, that of {first} 4x4", main=spectrum.main)


def test_spectrum_refuses_a_directory_without_checkpoint(tmp_path, capsys):
    expect_one_line_error(capsys, [tmp_path, "--output", tmp_path / "s.png"], 2,
                          f"{tmp_path}: neither a checkpoint file nor a run", main=spectrum.main)
