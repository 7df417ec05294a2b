"""The PNG figures: valid, of a sensible size, written whole; a plotting failure never fails a run."""

import logging

import pytest
from PIL import Image

from cl_runner.outputs import plots

NAMES = ["color", "city", "food"]
ROWS = [[0.0, 0.0, 0.0], [0.95, 0.02, 0.0], [0.40, 0.97, 0.03], [0.12, 0.33, 0.98]]


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_run_writes_a_heatmap_and_learning_curves(tmp_path):
    written = plots.plot_run(tmp_path, NAMES, ROWS, ["exact_match"] * 3, title="naive · seed 0")
    assert written == [tmp_path / "score_matrix.png", tmp_path / "learning_curves.png"]
    for path in written:
        width, height = _png_size(path)
        assert 600 <= width <= 2000 and 400 <= height <= 1600, (path.name, width, height)
        assert path.stat().st_size > 10_000  # text and colour, not an empty canvas
    assert not list(tmp_path.glob(".*.tmp"))


def test_figures_grow_with_the_number_of_tasks(tmp_path):
    names = [f"task{i}" for i in range(8)]
    rows = [[0.1 * ((i + j) % 10) for j in range(8)] for i in range(9)]
    small = _png_size(plots.score_matrix(tmp_path / "small.png", NAMES, ROWS, ["exact_match"] * 3))
    large = _png_size(plots.score_matrix(tmp_path / "large.png", names, rows, ["exact_match"] * 8))
    assert large[0] > small[0] and large[1] > small[1] and large[0] <= 2400


def test_perplexity_tasks_get_their_own_panel(tmp_path):
    rows = [[0.0, 40.0], [0.9, 30.0], [0.5, 6.0]]
    one = _png_size(plots.learning_curves(tmp_path / "one.png", NAMES[:2], ROWS[:3], ["exact_match"] * 2))
    two = _png_size(plots.learning_curves(tmp_path / "two.png", ["color", "wiki"], rows,
                                          ["exact_match", "perplexity"]))
    assert two[1] > 1.5 * one[1]  # a second panel below the first
    _png_size(plots.score_matrix(tmp_path / "matrix.png", ["color", "wiki"], rows, ["exact_match", "perplexity"]))


def test_plot_run_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cl_runner.outputs.plots"):
        assert plots.plot_run(tmp_path, NAMES, [[0.1, 0.2]], ["exact_match"] * 3) == []
    assert "plots of" in caplog.text and "were not written" in caplog.text


@pytest.mark.parametrize(("values", "name"), [(["1", "10", "100", "1000"], "numeric"),
                                              (["reservoir", "random", "hardest"], "categorical")])
def test_metric_against_a_swept_value(tmp_path, values, name):
    series = {"ewc": [(v, 0.1 * i, 0.02, 2) for i, v in enumerate(values)],
              "ewc_replay": [(v, 0.2 + 0.1 * i, None, 1) for i, v in enumerate(values[:2])]}
    path = plots.metric_vs_parameter(tmp_path / f"{name}.png", "strategy.x", "ACC", series)
    width, height = _png_size(path)
    assert 700 <= width <= 1600 and 400 <= height <= 1000
