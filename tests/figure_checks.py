"""Checks on the figures the scripts save: what a reader sees of their titles and legends."""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def texts_outside_or_overlapping(figure, dpi):
    """Titles (the suptitle among them) and legends of ``figure``, saved at ``dpi``, that are cut off by its
    edge or overlap one another, and x tick labels that overlap their neighbour. Measured at that dpi: text
    does not scale exactly with it."""
    figure.set_dpi(dpi)
    renderer = FigureCanvasAgg(figure).get_renderer()  # what savefig renders a PNG with
    texts = [text for text in [*figure.texts, *(axes.title for axes in figure.axes)] if text.get_text()]
    texts += [axes.get_legend() for axes in figure.axes if axes.get_legend()]
    extents = [text.get_window_extent(renderer) for text in texts]
    outside = [text for text, box in zip(texts, extents) if not figure.bbox.contains(box.x0, box.y0)
               or not figure.bbox.contains(box.x1, box.y1)]
    overlapping = [(a, b) for i, (a, box_a) in enumerate(zip(texts, extents))
                   for b, box_b in list(zip(texts, extents))[i + 1:] if box_a.overlaps(box_b)]
    for axes in figure.axes:
        ticks = [(label, label.get_window_extent(renderer)) for label in axes.get_xticklabels() if label.get_text()]
        overlapping += [(a, b) for (a, box_a), (b, box_b) in zip(ticks, ticks[1:]) if box_a.overlaps(box_b)]
    return outside, overlapping


@pytest.fixture
def saved_figures(monkeypatch):
    """Every Figure saved while the test runs, with the dpi it was saved at."""
    figures = []
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append((figure, kwargs.get("dpi", figure.dpi)))
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures
