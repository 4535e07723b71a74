"""What the plots show: whole epochs on the epoch axes, the curve each run's epoch was selected on, one colour
per setting and one line style per seed, and each group's difference from the baseline with its interval."""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

import run_files
from scripts import summarize
from tests.helpers import texts_outside_or_overlapping
from tests.test_selected_epoch import record
from tests.test_summary_statistics import attention_seeds, finished_run, summarise, three_seeds


def visible_ticks(axes):
    FigureCanvasAgg(axes.figure).draw()
    low, high = axes.get_xlim()
    return [tick for tick in axes.get_xticks() if low <= tick <= high]


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_the_learning_curves_tick_whole_epochs_only(tmp_path, saved_figures, epochs):
    history = [record(epoch, 50.0 + epoch, 40.0 + epoch) for epoch in range(1, epochs + 1)]
    run_files.write_curves(str(tmp_path / "curves.png"), history)
    (figure, _), = saved_figures
    for axes in figure.axes:
        ticks = visible_ticks(axes)
        assert ticks and all(tick == int(tick) for tick in ticks), ticks


def test_the_epoch_plot_of_one_epoch_ticks_whole_epochs_only(tmp_path, capsys, saved_figures):
    finished_run(tmp_path / "sweep" / "Attention_s0", 0, (50.0,), layer="Attention", num_epochs=1)
    summarise(tmp_path / "sweep", tmp_path, capsys)
    figure = next(figure for figure, _ in saved_figures if figure.axes[0].get_xlabel() == "epoch")
    assert visible_ticks(figure.axes[0]) == [1]


def epoch_plot_lines(saved_figures):
    figure = next(figure for figure, _ in saved_figures if figure.axes[0].get_xlabel() == "epoch")
    (axes,) = figure.axes
    return axes, [line for line in axes.lines if line.get_linestyle() != "None"]


def test_the_epoch_plot_has_a_colour_per_setting_and_a_line_style_per_seed(tmp_path, capsys, saved_figures):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0), seeds=(0, 1))
    attention_seeds(root, (78.0, 79.0), (0, 1))
    summarise(root, tmp_path, capsys)

    axes, lines = epoch_plot_lines(saved_figures)
    assert len(lines) == 4
    by_run = {(to_hex(line.get_color()), line.get_linestyle()) for line in lines}
    assert len(by_run) == 4
    assert len({colour for colour, _ in by_run}) == 2 and len({style for _, style in by_run}) == 2
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["Attention", "ConvNNAttention_K4_all", "seed 0", "seed 1"]


def test_the_epoch_plot_shows_the_curve_that_selected_the_epoch(tmp_path, capsys, saved_figures):
    root = tmp_path / "sweep"
    finished_run(root / "held_out_s0", 0, (60.0, 75.0, 70.0), val_top1s=(50.0, 72.0, 71.0))
    summarise(root, tmp_path, capsys)

    axes, (line,) = epoch_plot_lines(saved_figures)
    assert list(line.get_ydata()) == [50.0, 72.0, 71.0]
    assert axes.get_ylabel().startswith("validation top-1")
    (star,) = [line for line in axes.lines if line.get_marker() == "*"]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([2], [72.0])


def test_the_difference_plot_shows_each_groups_interval_around_its_difference(tmp_path, capsys, saved_figures):
    root = tmp_path / "sweep"
    three_seeds(root, top1s=(80.0, 81.0, 83.0))
    attention_seeds(root, (78.0, 80.0, 79.0), (0, 1, 2))
    three_seeds(root, "ConvNNAttention_K9_all", (85.0,), (0,), K=9)
    attention_seeds(root / "one", (81.0,), (0,), lr=0.002)
    three_seeds(root / "one", "lr_0.002_K4", (82.0,), (0,), lr=0.002)
    groups, _, _ = summarise(root, tmp_path, capsys, "--baseline", "Attention")

    assert (tmp_path / "summary" / summarize.DIFFERENCES_PLOT).read_bytes()[:4] == b"\x89PNG"
    figure, dpi = next(saved for saved in saved_figures if saved[0].axes[0].get_title() == "Difference from Attention")
    (axes,) = figure.axes
    points = []
    for container in axes.containers:
        if isinstance(container, ErrorbarContainer):
            line, _, bars = container
            points.append((line.get_xdata()[0], [x for x, _ in bars[0].get_segments()[0]] if bars else None))
    points.sort(key=lambda point: point[0])
    # The paired interval worked out by hand in test_summary_statistics; a single run on a side gives no interval.
    assert [x for x, _ in points] == pytest.approx([1.0, 2.3333, 6.0], abs=1e-4)
    assert points[1][1] == pytest.approx([-1.4613, 6.1279], abs=1e-4)
    assert points[0][1] is None and points[2][1] is None
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert "ConvNNAttention_K4_all (paired, n=3)" in labels
    assert "test top-1 (%) at the best-test epoch (optimistic)" in axes.get_xlabel()
    assert texts_outside_or_overlapping(figure, dpi) == ([], [])


def test_no_difference_plot_without_a_baseline(tmp_path, capsys):
    three_seeds(tmp_path / "sweep")
    summarise(tmp_path / "sweep", tmp_path, capsys)
    assert not (tmp_path / "summary" / summarize.DIFFERENCES_PLOT).exists()
