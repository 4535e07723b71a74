"""summarize.py over several seeds: which runs form a group, which epoch each run is judged by, and the mean,
deviation and confidence intervals, checked against numbers worked out by hand. The runs are fake directories
(args.txt, model.txt, metrics.csv, train_eval_results.txt) as vit_main writes them."""

import csv
import math
import re

import pytest
from matplotlib.container import ErrorbarContainer

import run_files
from scripts import summarize
from tests.helpers import without_hint

SETTINGS = {"layer": "ConvNNAttention", "K": 4, "sampling_type": "all", "num_samples": -1,
            "convolution_type": "depthwise", "lr": 0.001, "num_epochs": 2, "device": "cpu", "num_workers": 0}
VALIDATION_COLUMNS = ["val_loss", "val_top1", "val_top5"]


def finished_run(directory, seed, test_top1s, val_top1s=None, **settings):
    """A finished run of ``seed`` with one epoch per test top-1, and validation columns when ``val_top1s`` is
    given (appended after images_per_second, as with --val_split)."""
    directory.mkdir(parents=True)
    run_files.RunOutputs(str(directory)).write_args({**SETTINGS, "seed": seed, "output_dir": str(directory),
                                                     **settings})
    (directory / "model.txt").write_text("ViT()\n\nTotal parameters: 1,234\nGFLOPs per image (32x32, forward): 0.5\n")
    columns = run_files.METRIC_COLUMNS + (VALIDATION_COLUMNS if val_top1s else [])
    lines = [",".join(columns)]
    for epoch, test_top1 in enumerate(test_top1s, start=1):
        values = [epoch, 0.001, 1.5, 40.0, 90.0, 1.25, test_top1, 95.0, 2.0 * epoch, 100.0]
        if val_top1s:
            values += [1.0, val_top1s[epoch - 1], 99.0]
        lines.append(",".join(map(str, values)))
    (directory / "metrics.csv").write_text("\n".join(lines) + "\n")
    (directory / "train_eval_results.txt").write_text("...\nAverage Epoch Time: 3.0000s\nMax Accuracy: 1% at epoch 1\n")
    return directory


def three_seeds(root, name="ConvNNAttention_K4_all", top1s=(80.0, 81.0, 83.0), seeds=(0, 1, 2), **settings):
    """A run per seed whose best test top-1 (in its second epoch) is the given one."""
    for seed, top1 in zip(seeds, top1s):
        finished_run(root / f"{name}_s{seed}", seed, (50.0, top1), **settings)


def summarise(root, tmp_path, capsys, *flags):
    out_dir = tmp_path / "summary"
    assert summarize.main([str(root), "--out_dir", str(out_dir), *flags]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    with open(out_dir / "groups.csv", newline="") as handle:
        groups = {row["group"]: row for row in csv.DictReader(handle)}
    with open(out_dir / "summary.csv", newline="") as handle:
        runs = {row["run"]: row for row in csv.DictReader(handle)}
    return groups, runs, printed


def summary_text(tmp_path):
    """summary.md: the full tables (the terminal gets a compact one)."""
    return (tmp_path / "summary" / "summary.md").read_text()


def test_runs_differing_only_in_seed_form_a_group_with_mean_and_sample_deviation(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root)
    # Where and how fast a run ran does not change its result: still the same group.
    finished_run(root / "ConvNNAttention_K4_all_s3", 3, (50.0, 84.0), device="cuda", num_workers=8,
                 data_path="/elsewhere")
    # Another learning rate is another group; an unfinished run is left out of the groups.
    finished_run(root / "lr_0.002_s0", 0, (50.0, 70.0), lr=0.002)
    unfinished = finished_run(root / "ConvNNAttention_K4_all_s4", 4, (50.0, 99.0))
    (unfinished / "train_eval_results.txt").write_text("[Epoch 001] ...\n")

    groups, runs, printed = summarise(root, tmp_path, capsys)

    assert sorted(groups) == ["ConvNNAttention_K4_all", "lr_0.002"]
    group = groups["ConvNNAttention_K4_all"]
    # By hand: 80, 81, 83, 84 -> mean 82.0; squares of deviations 4 + 1 + 1 + 4 = 10, / 3 -> sd sqrt(10/3) = 1.8257.
    assert (group["n_seeds"], group["seeds"], group["selected_by"]) == ("4", "0 1 2 3", "test (optimistic)")
    assert float(group["top1_mean"]) == pytest.approx(82.0)
    assert float(group["top1_std"]) == pytest.approx(1.8257, abs=1e-4)
    assert group["runs"].split() == [f"ConvNNAttention_K4_all_s{seed}" for seed in range(4)]
    assert (group["parameters"], group["gflops"], group["num_epochs"]) == ("1234", "0.5", "2")
    assert float(group["average_epoch_seconds"]) == pytest.approx(3.0)  # epochs of 2 s and 4 s
    single = groups["lr_0.002"]
    assert (single["n_seeds"], single["top1_mean"], single["top1_std"]) == ("1", "70.0", "")
    single_row = "| lr_0.002 | ConvNNAttention | 4 | all | depthwise | 2 | 1 (0) | test (optimistic) | 70.00 | - |"
    table = summary_text(tmp_path)
    assert single_row in table
    assert "| ConvNNAttention_K4_all | ConvNNAttention | 4 | all | depthwise | 2 | 4 (0, 1, 2, 3) |" in table
    assert runs["ConvNNAttention_K4_all_s4"]["finished"] == "False"


def test_three_seeds_by_hand(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root)
    groups, _, _ = summarise(root, tmp_path, capsys)
    # 80, 81, 83: mean 81.3333; deviations -1.3333, -0.3333, 1.6667, squares 1.7778 + 0.1111 + 2.7778 = 4.6667,
    # / 2 = 2.3333, sd 1.5275.
    assert float(groups["ConvNNAttention_K4_all"]["top1_mean"]) == pytest.approx(81.3333, abs=1e-4)
    assert float(groups["ConvNNAttention_K4_all"]["top1_std"]) == pytest.approx(1.5275, abs=1e-4)


def test_the_epoch_is_selected_by_validation_when_there_is_a_split_and_marked_otherwise(tmp_path, capsys):
    root = tmp_path / "sweep"
    # Validation peaks at epoch 2 (the first of two equal ones); the test top-1 peaks at epoch 4.
    finished_run(root / "held_out_s0", 0, (60.0, 75.0, 70.0, 90.0), val_top1s=(50.0, 72.0, 72.0, 65.0))
    finished_run(root / "held_out_s1", 1, (60.0, 77.0, 70.0, 91.0), val_top1s=(50.0, 70.0, 72.0, 65.0))
    # The same settings without validation columns: selected on the test set, a group of its own.
    finished_run(root / "test_picked_s0", 0, (60.0, 75.0, 70.0, 90.0))

    groups, runs, printed = summarise(root, tmp_path, capsys)

    assert (runs["held_out_s0"]["selected_by"], runs["held_out_s0"]["selected_epoch"],
            runs["held_out_s0"]["selected_top1"]) == ("val", "2", "75.0")
    assert (runs["held_out_s1"]["selected_epoch"], runs["held_out_s1"]["selected_top1"]) == ("3", "70.0")
    assert (runs["held_out_s0"]["best_top1"], runs["held_out_s0"]["best_epoch"]) == ("90.0", "4")
    assert (runs["test_picked_s0"]["selected_by"], runs["test_picked_s0"]["selected_epoch"],
            runs["test_picked_s0"]["selected_top1"]) == ("test (optimistic)", "4", "90.0")
    assert sorted(groups) == ["held_out", "test_picked"]
    assert (groups["held_out"]["selected_by"], float(groups["held_out"]["top1_mean"])) == ("val", 72.5)
    assert groups["test_picked"]["selected_by"] == "test (optimistic)"
    assert "the epoch of the best test top-1, picked on the test set itself" in summary_text(tmp_path)


def test_a_run_whose_validation_top1_is_not_a_number_is_skipped(tmp_path, capsys):
    """NaN compares false with everything: the selected epoch would depend on where it stands."""
    root = tmp_path / "sweep"
    finished_run(root / "good_s0", 0, (60.0, 75.0), val_top1s=(50.0, 72.0))
    bad = finished_run(root / "bad_s0", 0, (60.0, 75.0), val_top1s=(50.0, math.nan))
    groups, runs, printed = summarise(root, tmp_path, capsys)
    assert sorted(runs) == ["good_s0"]
    assert printed.err.splitlines() == [f"summarize.py: skipped {bad}: metrics.csv line 3: val_top1 is nan"]


def test_two_runs_of_one_seed_are_no_group(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root)
    finished_run(root / "copy" / "ConvNNAttention_K4_all_s1", 1, (50.0, 81.0))
    groups, _, printed = summarise(root, tmp_path, capsys)
    assert groups == {}
    assert printed.err.splitlines() == [
        "summarize.py: left out the group of ConvNNAttention_K4_all_s1, copy/ConvNNAttention_K4_all_s1: same settings "
        "and same seed 1 (copies of a run are not independent seeds)"]


def test_a_run_given_twice_counts_once(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root)
    out_dir = tmp_path / "summary"
    assert summarize.main([str(root), str(root / "ConvNNAttention_K4_all_s1"), "--out_dir", str(out_dir)]) == 0
    with open(out_dir / "groups.csv", newline="") as handle:
        (group,) = csv.DictReader(handle)
    assert group["n_seeds"] == "3"


# ---------------------------------------------------------------------------------------------
# Differences from a baseline layer
# ---------------------------------------------------------------------------------------------


def attention_seeds(root, top1s, seeds, **settings):
    # The baseline ignores the ConvNN options: a K of its own must not stop the match.
    three_seeds(root, "Attention", top1s, seeds, layer="Attention", K=9, **settings)


def test_paired_difference_and_interval_by_hand(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0, 83.0))
    attention_seeds(root, (78.0, 80.0, 79.0), (0, 1, 2))
    groups, _, printed = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    # Differences per seed 2, 1, 4: mean 2.3333, sd 1.5275, se = 1.5275 / sqrt(3) = 0.8819;
    # t(0.975, df 2) = 4.3027 (tables), half width 3.7946: [-1.4613, 6.1279].
    group = groups["ConvNNAttention_K4_all"]
    assert (group["baseline"], group["comparison"], group["df"]) == ("Attention", "paired", "2")
    assert float(group["difference"]) == pytest.approx(2.3333, abs=1e-4)
    assert float(group["ci95_low"]) == pytest.approx(-1.4613, abs=1e-4)
    assert float(group["ci95_high"]) == pytest.approx(6.1279, abs=1e-4)
    assert groups["Attention"]["baseline"] == ""
    assert "| paired | +2.33 | [-1.46, +6.13] |" in summary_text(tmp_path)


def test_unpaired_welch_interval_by_hand(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0, 83.0))
    attention_seeds(root, (77.0, 78.0, 80.0), (3, 4, 5))
    groups, _, _ = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    # Means 81.3333 and 78.3333: difference 3.0. Both variances 2.3333: se = sqrt(2.3333/3 + 2.3333/3) = 1.2472,
    # Welch's df = (2 * 0.7778)^2 / (2 * 0.7778^2 / 2) = 4; t(0.975, 4) = 2.7764, half width 3.4628.
    group = groups["ConvNNAttention_K4_all"]
    assert group["comparison"] == "unpaired (Welch)"
    assert float(group["df"]) == pytest.approx(4.0)
    assert float(group["difference"]) == pytest.approx(3.0)
    assert float(group["ci95_low"]) == pytest.approx(-0.4628, abs=1e-4)
    assert float(group["ci95_high"]) == pytest.approx(6.4628, abs=1e-4)


def test_welch_degrees_of_freedom_need_not_be_whole(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0, 83.0))
    attention_seeds(root, (78.0, 79.0), (3, 4))
    groups, _, _ = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    # Shares of the variance 2.3333/3 = 0.7778 and 0.5/2 = 0.25, se = sqrt(1.0278) = 1.0138;
    # df = 1.0278^2 / (0.7778^2 / 2 + 0.25^2 / 1) = 2.8943, so t lies between t(df 3) = 3.1824 and t(df 2) = 4.3027.
    group = groups["ConvNNAttention_K4_all"]
    assert float(group["difference"]) == pytest.approx(2.8333, abs=1e-4)
    assert float(group["df"]) == pytest.approx(2.8943, abs=1e-4)
    t = (float(group["ci95_high"]) - float(group["difference"])) / 1.0138
    assert 3.1824 < t < 4.3027
    assert float(group["ci95_low"]) == pytest.approx(2 * float(group["difference"]) - float(group["ci95_high"]))


def test_one_pair_gives_a_difference_but_no_interval(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0,), seeds=(0,))
    attention_seeds(root, (78.5,), (0,))
    groups, _, printed = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    group = groups["ConvNNAttention_K4_all"]
    assert (group["comparison"], float(group["difference"]), group["ci95_low"], group["ci95_high"]) == (
        "paired", 1.5, "", "")
    assert "| paired | +1.50 | - (needs 2 paired seeds) |" in summary_text(tmp_path)


def test_a_group_without_a_matching_baseline_is_named_and_not_compared(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root)
    attention_seeds(root, (78.0, 80.0, 79.0), (0, 1, 2))
    three_seeds(root, "lr_0.002", lr=0.002)  # no Attention group at this learning rate
    groups, _, printed = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    assert groups["lr_0.002"]["baseline"] == "" and groups["ConvNNAttention_K4_all"]["baseline"] == "Attention"
    assert printed.err.splitlines() == ["summarize.py: lr_0.002: no Attention group with the same other settings "
                                        "and selection; not compared"]


@pytest.mark.parametrize("layer, message", [
    ("Atention", "argument --baseline: invalid choice: 'Atention'"),
    ("LocalAttention", "--baseline: no finished run of layer LocalAttention among the runs; choose one of "
                       "ConvNNAttention"),
])
def test_a_baseline_without_runs_is_a_one_line_error(tmp_path, capsys, layer, message):
    root = tmp_path / "sweep"
    three_seeds(root)
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(root), "--out_dir", str(tmp_path / "summary"), "--baseline", layer])
    assert exit_.value.code == 2
    assert message in without_hint(capsys.readouterr().err).splitlines()[-1]
    assert not (tmp_path / "summary").exists()


# ---------------------------------------------------------------------------------------------
# The t quantile and the plot's error bars
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df, expected", [
    (1, math.tan(math.pi * 0.475)),  # the Cauchy distribution: 12.7062
    (2, math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))),  # df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)); 4.3027
    (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423),  # the usual t tables
    (1e6, 1.9600),  # the normal quantile in the limit
])
def test_t_quantile_matches_the_tables(df, expected):
    assert summarize.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_the_accuracy_against_k_plot_has_standard_deviations_as_error_bars(tmp_path, capsys, saved_figures):
    root = tmp_path / "sweep"
    three_seeds(root, "ConvNNAttention_K4_all", (80.0, 81.0, 83.0))
    three_seeds(root, "ConvNNAttention_K9_all", (85.0,), (0,), K=9)  # one seed: no bar
    attention_seeds(root, (78.0, 80.0, 79.0), (0, 1, 2))
    summarise(root, tmp_path, capsys)

    figure = next(figure for figure, _ in saved_figures if figure.axes[0].get_xlabel().startswith("K"))
    (axes,) = figure.axes
    (container,) = [container for container in axes.containers if isinstance(container, ErrorbarContainer)]
    line, _, (bars,) = container
    assert list(line.get_xdata()) == [4, 9]
    assert list(line.get_ydata()) == pytest.approx([81.3333, 85.0], abs=1e-4)
    (bar, no_bar) = bars.get_segments()
    assert [x for x, _ in bar] == [4, 4]
    assert [y for _, y in bar] == pytest.approx([81.3333 - 1.5275, 81.3333 + 1.5275], abs=1e-4)
    assert all(math.isnan(y) for _, y in no_bar)
    # Attention ignores K: a dashed line at its mean (79.0) in a band of one deviation (1.0).
    (band,) = axes.patches
    assert (band.get_bbox().y0, band.get_bbox().y1) == pytest.approx((78.0, 80.0))
    assert 79.0 in [line.get_ydata()[0] for line in axes.lines if line.get_linestyle() == "--"]


# ---------------------------------------------------------------------------------------------
# Names: unique over several directories, and whole table cells
# ---------------------------------------------------------------------------------------------


def summarise_directories(tmp_path, capsys, *directories):
    out_dir = tmp_path / "summary"
    assert summarize.main([*map(str, directories), "--out_dir", str(out_dir), "--baseline", "Attention"]) == 0
    printed = capsys.readouterr()
    with open(out_dir / "groups.csv", newline="") as handle:
        groups = [row["group"] for row in csv.DictReader(handle)]
    with open(out_dir / "summary.csv", newline="") as handle:
        runs = [row["run"] for row in csv.DictReader(handle)]
    return groups, runs, printed


def test_two_sweeps_of_the_same_layers_get_names_that_tell_them_apart(tmp_path, capsys):
    for lr in ("1e-3", "1e-2"):
        three_seeds(tmp_path / f"lr{lr}", top1s=(80.0, 81.0), seeds=(0, 1), lr=lr)
        attention_seeds(tmp_path / f"lr{lr}", (78.0, 79.0), (0, 1), lr=lr)

    groups, runs, printed = summarise_directories(tmp_path, capsys, tmp_path / "lr1e-3", tmp_path / "lr1e-2")

    assert sorted(runs) == sorted(f"lr{lr}/{name}_s{seed}" for lr in ("1e-3", "1e-2")
                                  for name in ("Attention", "ConvNNAttention_K4_all") for seed in (0, 1))
    assert sorted(groups) == ["lr1e-2/Attention", "lr1e-2/ConvNNAttention_K4_all", "lr1e-3/Attention",
                              "lr1e-3/ConvNNAttention_K4_all"]
    assert "| lr1e-3/ConvNNAttention_K4_all | ConvNNAttention |" in (tmp_path / "summary" / "summary.md").read_text()
    assert "| lr1e-3/Attention |" in (tmp_path / "summary" / "summary.md").read_text()
    assert "not compared" not in printed.err


def test_directories_of_the_same_name_are_told_apart_by_their_parents(tmp_path, capsys):
    for parent in ("a", "b"):
        attention_seeds(tmp_path / parent / "sweep", (78.0,), (0,), lr=0.1 if parent == "a" else 0.2)
    # Runs given themselves are named from their parent directory.
    finished_run(tmp_path / "c" / "Attention_s1", 1, (50.0, 60.0), layer="Attention", lr=0.3)
    finished_run(tmp_path / "d" / "Attention_s1", 1, (50.0, 60.0), layer="Attention", lr=0.4)

    groups, runs, _ = summarise_directories(tmp_path, capsys, tmp_path / "a" / "sweep", tmp_path / "b" / "sweep",
                                            tmp_path / "c" / "Attention_s1", tmp_path / "d" / "Attention_s1")

    assert sorted(runs) == ["a/sweep/Attention_s0", "b/sweep/Attention_s0", "c/Attention_s1", "d/Attention_s1"]
    assert sorted(groups) == ["a/sweep/Attention", "b/sweep/Attention", "c/Attention", "d/Attention"]


def test_a_single_sweep_keeps_its_short_names(tmp_path, capsys):
    attention_seeds(tmp_path / "sweep", (78.0, 79.0), (0, 1))
    groups, runs, _ = summarise_directories(tmp_path, capsys, tmp_path / "sweep")
    assert (groups, sorted(runs)) == (["Attention"], ["Attention_s0", "Attention_s1"])


def table_column_counts(text):
    """The number of cells of each line of the Markdown tables in ``text`` (an escaped pipe is no boundary)."""
    return {len(re.split(r"(?<!\\)\|", line)) for line in text.splitlines() if line.startswith("|")}


def test_group_names_of_runs_named_without_a_seed_ending_keep_the_table_whole(tmp_path, capsys):
    root = tmp_path / "sweep"
    for seed, name in enumerate(("trial_a", "trial_b")):
        finished_run(root / name, seed, (50.0, 80.0 + seed), layer="Attention")
    for seed, name in enumerate(("first", "second", "third")):
        finished_run(root / name, seed, (50.0, 70.0 + seed), lr=0.002)
    finished_run(root / "odd|name_s0", 0, (50.0, 60.0), lr=0.003)

    groups, _, printed = summarise_directories(tmp_path, capsys, root)

    assert sorted(groups) == ["first+2", "odd|name", "trial"]
    text = (tmp_path / "summary" / "summary.md").read_text()
    assert "odd\\|name" in text
    for table in text.split("\n\n"):
        assert len(table_column_counts(table)) <= 1, table


def test_groups_of_one_name_but_different_settings_are_named_by_their_first_run(tmp_path, capsys):
    root = tmp_path / "sweep"
    finished_run(root / "Attention_s0", 0, (50.0, 80.0), layer="Attention")
    finished_run(root / "Attention_s1", 1, (50.0, 81.0), layer="Attention", lr=0.002)
    groups, _, _ = summarise_directories(tmp_path, capsys, root)
    assert sorted(groups) == ["Attention_s0", "Attention_s1"]


# ---------------------------------------------------------------------------------------------
# The terminal's compact table
# ---------------------------------------------------------------------------------------------


def test_the_terminal_gets_a_compact_table_with_the_intervals(tmp_path, capsys):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0, 83.0))
    attention_seeds(root, (78.0, 80.0, 79.0), (0, 1, 2))
    _, _, printed = summarise(root, tmp_path, capsys, "--baseline", "Attention")
    lines = printed.out.splitlines()
    # 80, 81, 83: mean 81.33, se 1.5275 / sqrt(3) = 0.8819, t(0.975, 2) = 4.3027: 81.33 +- 3.79. The difference
    # and its interval are worked out in test_paired_difference_and_interval_by_hand.
    assert lines[0].split() == ["group", "/", "run", "layer", "K", "seeds", "top-1", "[95%", "CI]", "minus",
                                "Attention", "[95%", "CI]"]
    assert lines[1].split() == ["Attention", "Attention", "-", "3", "79.00", "[76.52,", "81.48]", "baseline"]
    assert lines[2].split() == ["ConvNNAttention_K4_all", "ConvNNAttention", "4", "3", "81.33", "[77.54,", "85.13]",
                                "+2.33", "[-1.46,", "+6.13]"]
    assert "full tables" in printed.out.lower()


def test_every_terminal_line_fits_100_columns(tmp_path, capsys):
    long_name = "ConvNNAttention_K4_all_with_a_name_long_enough_to_need_all_the_room_there_is"
    for lr in ("1e-3", "1e-2"):
        three_seeds(tmp_path / f"learning_rate_{lr}_sweep_of_the_long_names", long_name, (80.0, 81.0), (0, 1), lr=lr)
        attention_seeds(tmp_path / f"learning_rate_{lr}_sweep_of_the_long_names", (78.0, 79.0), (0, 1), lr=lr)
    held_out = tmp_path / "learning_rate_1e-3_sweep_of_the_long_names" / "held_out_s0"
    finished_run(held_out, 0, (60.0, 75.0), val_top1s=(50.0, 72.0), lr="1e-3")
    unfinished = finished_run(tmp_path / "learning_rate_1e-2_sweep_of_the_long_names" / (long_name + "_s5"), 5,
                              (50.0,), lr="1e-2")
    (unfinished / "train_eval_results.txt").write_text("[Epoch 001] ...\n")
    _, runs, printed = summarise_directories(tmp_path, capsys, *sorted(tmp_path.glob("learning_rate_*")))

    lines = printed.out.splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    assert lines[0].split()[-3:] == ["Attention", "[95%", "CI]"] and " by " in lines[0]
    # Names too long for the room left have a line of their own, above their numbers: none is cut.
    (unfinished_name,) = [name for name in runs if name.endswith("_s5")]
    assert unfinished_name + "*" in "".join(lines)
    for lr in ("1e-3", "1e-2"):
        name = f"learning_rate_{lr}_sweep_of_the_long_names/{long_name}"
        start = lines.index(name[:100])
        assert lines[start + 1] == name[100:]
