"""The neighbour-map script: the indices it shows are those the layers used, and it draws and
summarises real runs of every sampling type and of a branching layer."""

import csv
import math

import pytest
import torch
from matplotlib.figure import Figure

import settings
import vit_main
from models.vit import ViT
from models.vit_layers import MultiHeadConvNNAttention, spatial_grid
from scripts import neighbour_maps
from tests.helpers import expect_one_line_error, texts_outside_or_overlapping

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID_SIDE = 4  # the tiny runs: 32 px images, patch 8


def loc_neighbours(seq_len, K):
    """The K nearest sequence positions of every token (ties to the lower index), in position order."""
    return [sorted(sorted(range(seq_len), key=lambda j: (abs(j - i), j))[:K]) for i in range(seq_len)]


# ---------------------------------------------------------------------------------------------
# The indices come from the layers' own forward pass
# ---------------------------------------------------------------------------------------------


def test_matmul_selection_with_hand_set_weights_is_the_nearest_rotated_query():
    # Unit vectors at these angles; W_q rotates a token by +0.5 rad and W_k is the identity, so token
    # i's similarity to j is cos(angle_i + 0.5 - angle_j) / sqrt(2): its neighbours are the tokens
    # whose angle is nearest to angle_i + 0.5, best first.
    angles = torch.tensor([0.0, 0.1, 0.35, 0.45, 1.0, 1.6])
    tokens = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0)
    layer = MultiHeadConvNNAttention(d_hidden=2, K=3, num_tokens=6).eval()
    turn = torch.tensor(0.5)
    with torch.no_grad():
        layer.W_q.weight.copy_(torch.stack([torch.stack([turn.cos(), -turn.sin()]),
                                            torch.stack([turn.sin(), turn.cos()])]))
        layer.W_k.weight.copy_(torch.eye(2))

    (selection,) = neighbour_maps.collect_selections(layer, tokens)

    expected = [[3, 2, 1], [3, 2, 4], [4, 3, 2], [4, 3, 2], [5, 4, 3], [5, 4, 3]]
    assert selection.neighbours[0].tolist() == expected
    similarity = torch.cos(angles.view(-1, 1) + 0.5 - angles[torch.tensor(expected)]) / math.sqrt(2)
    torch.testing.assert_close(selection.weights[0], torch.softmax(similarity, dim=-1))
    assert selection.candidates is None
    assert layer.record_selection is False and layer.last_selection is None  # recording switched off again


def test_loc_selection_in_every_layer_of_a_vit_is_the_positional_neighbourhood():
    torch.manual_seed(0)
    model = ViT(img_size=16, num_classes=3, layer="ConvNNAttention", patch_size=4, num_layers=2, num_heads=1,
                d_hidden=8, d_mlp=16, layer_options=dict(K=5, similarity_type="Loc")).eval()
    selections = neighbour_maps.collect_selections(model, torch.randn(2, 3, 16, 16))

    assert [s.name for s in selections] == ["transformer_encoder.0.attention", "transformer_encoder.1.attention"]
    expected = torch.tensor(loc_neighbours(17, 5)).expand(2, -1, -1)
    for selection in selections:
        assert torch.equal(selection.neighbours, expected)
        assert torch.equal(selection.weights, torch.ones(2, 17, 5))


def test_branching_layers_show_their_convnn_part():
    torch.manual_seed(0)
    model = ViT(img_size=16, num_classes=3, layer="BranchAttention", patch_size=4, num_layers=2, num_heads=2,
                d_hidden=8, d_mlp=16, layer_options={"K": 5}).eval()
    selections = neighbour_maps.collect_selections(model, torch.randn(1, 3, 16, 16))
    assert [neighbour_maps.layer_label(s.name) for s in selections] == \
        ["block 0 (ConvNN branch)", "block 1 (ConvNN branch)"]
    assert all(s.neighbours.shape == (1, 17, 5) for s in selections)


def test_collected_selection_is_what_the_layer_computes_from_its_input():
    torch.manual_seed(0)
    model = ViT(img_size=16, num_classes=3, layer="ConvNNAttention", patch_size=4, num_layers=2, num_heads=1,
                d_hidden=8, d_mlp=16, layer_options=dict(K=4, sampling_type="spatial", num_samples=3)).eval()
    layer_inputs = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0]))
             for _, layer in neighbour_maps.convnn_layers(model)]
    selections = neighbour_maps.collect_selections(model, torch.randn(2, 3, 16, 16))
    for hook in hooks:
        hook.remove()

    for (_, layer), selection, layer_input in zip(neighbour_maps.convnn_layers(model), selections, layer_inputs):
        neighbours, weights = layer.neighbours_and_weights(layer_input)
        assert torch.equal(selection.neighbours, neighbours) and torch.equal(selection.weights, weights)
        assert torch.equal(selection.candidates, spatial_grid((4, 4), 3, 0))
        assert torch.equal(selection.neighbours[..., 0], torch.arange(17).expand(2, -1))  # slot 0: the token itself


def test_candidates_are_shaded_and_a_selected_class_token_gets_a_badge():
    axes = Figure().subplots()
    picture = torch.rand(8, 8, 3)
    neighbour_maps.draw_panel(axes, picture, side=4, query=6, slots=[6, 0, 7], candidates=torch.tensor([0, 1, 7, 16]))
    shaded = [p for p in axes.patches if p.get_facecolor()[:3] == (1.0, 1.0, 1.0) and p.get_fill()]
    assert sorted((p.get_x(), p.get_y()) for p in shaded) == [(0, 0), (2, 1), (3, 3)]  # tokens 1, 7, 16
    texts = [text.get_text() for text in axes.texts]
    assert "CLS: slot 1" in texts and "0" in texts and "2" in texts and "CLS is a candidate" in texts


@pytest.mark.parametrize("blocks", [1, 4, 12])
@pytest.mark.parametrize("branch", [False, True], ids=["ConvNN", "branch"])
def test_summary_titles_fit_the_figure(tmp_path, saved_figures, blocks, branch):
    names = [".attention.convnn", ".attention.attention"] if branch else [".attention"]
    rows = [{"layer": f"transformer_encoder.{block}{suffix}", "kind": kind, "block": block, "head": "all",
             "mean_distance": 3.0, "class_token_fraction": 0.05,
             "head_distances": [2.5, 3.5] if kind == "attention" else []}
            for block in range(blocks) for suffix, kind in zip(names, ["ConvNN", "attention"])]
    references = neighbour_maps.reference_distances(8, 9)
    title = "BranchAttention K=9, spatial sampling, Cosine similarity"

    neighbour_maps.draw_summary(str(tmp_path / "summary.png"), rows, references, title)

    ((figure, dpi),) = saved_figures
    assert texts_outside_or_overlapping(figure, dpi) == ([], [])


# ---------------------------------------------------------------------------------------------
# Real run directories
# ---------------------------------------------------------------------------------------------


def train(tiny_argv, output_dir, *flags):
    vit_main.main(tiny_argv(output_dir, "--num_epochs", "1", *flags))
    return output_dir


def read_summary(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("K, flags", [
    (9, ("--layer", "ConvNNAttention")),
    (4, ("--layer", "ConvNNAttention", "--sampling_type", "random", "--num_samples", "8")),
    (4, ("--layer", "ConvNNAttention", "--sampling_type", "spatial", "--num_samples", "3")),
    (5, ("--layer", "BranchConv")),
], ids=["all", "random", "spatial", "BranchConv"])
@pytest.mark.slow
def test_maps_and_summary_of_a_trained_run(tiny_argv, tmp_path, capsys, K, flags):
    run = train(tiny_argv, tmp_path / "run", *flags, "--K", K)
    capsys.readouterr()

    paths = neighbour_maps.main([str(run), "--images", "3", "--summary", "--max_images", "40"])

    out = run / "neighbour_maps"
    assert paths == [str(out / name) for name in ("image_3.png", "summary.png", "summary.csv")]
    assert capsys.readouterr().out.splitlines()[-3:] == paths
    for path in paths[:2]:
        assert open(path, "rb").read(8) == PNG_SIGNATURE
    rows = read_summary(out / "summary.csv")
    convnn_rows = [row for row in rows if row["kind"] == "ConvNN"]
    assert [row["block"] for row in convnn_rows] == ["0", "1"]
    assert len(rows) == (4 if flags[1] == "BranchConv" else 2)  # BranchConv: also its Conv1d branch per block
    farthest = math.dist((0, 0), (GRID_SIDE - 1, GRID_SIDE - 1))
    for row in convnn_rows:
        assert 0 <= float(row["mean_distance"]) <= farthest
        assert 0 <= float(row["class_token_fraction"]) <= 1
        assert int(row["patch_selections"]) + int(row["class_token_selections"]) == 40 * 16 * K  # images x patches x K


def test_loc_summary_equals_the_positional_expectation(tiny_argv, tmp_path, capsys):
    K = 5
    run = train(tiny_argv, tmp_path / "run", "--layer", "ConvNNAttention", "--similarity_type", "Loc", "--K", K)
    neighbour_maps.main([str(run), "--images", "--summary", "--out", str(tmp_path / "maps")])

    # Patch token t sits at row (t-1) // 4, column (t-1) % 4; its neighbours are the K nearest sequence positions.
    distances, class_token_picks = [], 0
    for token, neighbours in enumerate(loc_neighbours(GRID_SIDE * GRID_SIDE + 1, K)):
        if token == 0:
            continue
        for neighbour in neighbours:
            if neighbour == 0:
                class_token_picks += 1
            else:
                distances.append(math.dist(divmod(token - 1, GRID_SIDE), divmod(neighbour - 1, GRID_SIDE)))
    rows = read_summary(tmp_path / "maps" / "summary.csv")
    assert len(rows) == 2
    for row in rows:
        assert float(row["mean_distance"]) == pytest.approx(sum(distances) / len(distances), rel=1e-6)
        assert float(row["class_token_fraction"]) == pytest.approx(class_token_picks / (16 * K))
    assert not (tmp_path / "maps" / "image_0.png").exists()  # --images with no index draws no maps


def test_a_bare_state_dict_takes_the_runs_args_txt(tiny_argv, tmp_path):
    run = train(tiny_argv, tmp_path / "run", "--layer", "ConvNNAttention", "--K", "4")
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    torch.save(checkpoint["model"], run / "weights.pt")

    paths = neighbour_maps.main([str(run / "weights.pt"), "--images", "1", "--queries", "0", "16",
                                 "--out", str(tmp_path / "maps")])

    assert paths == [str(tmp_path / "maps" / "image_1.png")]
    args = neighbour_maps.read_args_file(run / "args.txt")
    assert vars(args) == {name: value for name, value in checkpoint["args"].items() if name in settings.FLAGS}


def save_untrained_run(tiny_argv, output_dir, layer):
    """A run directory holding only a best.pt of a freshly built model: enough for the script's checks."""
    args = vit_main.build_parser().parse_args(tiny_argv(output_dir, "--layer", layer))
    model = ViT(**vit_main.model_config(args, img_size=32, num_classes=10))
    torch.save({"model": model.state_dict(), "args": vars(args)}, output_dir / "best.pt")


def test_maps_of_a_model_without_convnn_or_attention_layers_are_refused(tiny_argv, tmp_path, capsys):
    save_untrained_run(tiny_argv, tmp_path, "Conv1d")
    expect_one_line_error(capsys, [tmp_path, "--images", "0"], 2,
                          "--images: the Conv1d model has no ConvNN-Attention or attention layer to draw",
                          main=neighbour_maps.main)


@pytest.mark.parametrize("options, message", [
    (["--queries", "17"], "--queries: [17] outside 0..16"),
    (["--images", "100"], "--images: [100] outside the 100 test images"),
    (["--summary", "--max_images", "0"], "--max_images: must be >= 1"),
])
def test_impossible_options_are_usage_errors(tiny_argv, tmp_path, capsys, options, message):
    save_untrained_run(tiny_argv, tmp_path, "ConvNNAttention")
    with pytest.raises(SystemExit) as exit_info:
        neighbour_maps.main([str(tmp_path), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    expect_one_line_error(capsys, [tmp_path, "--summary"], 2, f"{tmp_path}: neither a checkpoint file nor a run",
                          main=neighbour_maps.main)
