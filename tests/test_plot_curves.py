"""scripts/plot_curves.py on a tiny synthetic results folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_curves.py"


def write_log(folder, records):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def pretraining_log(knn_at):
    records = [{"event": "start", "args": {"groups": 4}}]
    for epoch in (1, 2, 3):
        records += [{"epoch": epoch, "step": 2 * epoch - 1 + s, "loss": 9.0 - epoch, "rankme": 50.0 + epoch} for s in (0, 1)]
        records.append({"event": "epoch", "epoch": epoch, "step": 2 * epoch, "loss": 9.0 - epoch,
                        **({"knn": {"top1@20": 80.0 + epoch, "top5@20": 98.0}} if epoch in knn_at else {})})
    return records


def test_one_png_with_the_curves_of_every_pretraining_row(tmp_path):
    from PIL import Image
    pytest.importorskip("matplotlib")
    resumed = [{"event": "start", "args": {"groups": 4}}, {"epoch": 3, "step": 6, "loss": 6.0, "rankme": 55.0},
               {"event": "epoch", "epoch": 3, "step": 6, "loss": 6.0, "knn": {"top1@10": 84.0, "top1@200": 85.0}}]
    write_log(tmp_path / "mdra", pretraining_log(knn_at=(2, 3)) + resumed)  # the last of each step counts
    # A run without the kNN monitor, started afresh over an abandoned one, and killed while writing a line.
    abandoned = [{"event": "start", "step": 0, "args": {}}, {"epoch": 1, "step": 1, "loss": 99.0, "rankme": 1.0},
                 {"event": "epoch", "epoch": 4, "step": 8, "loss": 99.0}]
    fresh = [{"event": "start", "step": 0, "args": {}}]
    write_log(tmp_path / "mdra-g1", abandoned + fresh + pretraining_log(knn_at=()))
    with open(tmp_path / "mdra-g1" / "log.jsonl", "a") as log:
        log.write('{"epoch": 3, "st')
    write_log(tmp_path / "mdra-ft1", [{"event": "epoch", "epoch": 1, "top1": 80.0}])  # fine-tuning: not a curve
    sys.path.insert(0, str(SCRIPT.parent))
    import plot_curves
    assert list(plot_curves.pretraining_logs(tmp_path)) == ["mdra", "mdra-g1"]
    assert plot_curves.curves(tmp_path / "mdra" / "log.jsonl") == {
        "knn": [(2, 82.0), (3, 84.0)], "loss": [(1, 8.0), (2, 7.0), (3, 6.0)], "rankme": [(1, 51.0), (2, 52.0), (3, 54.0)]}
    assert plot_curves.curves(tmp_path / "mdra-g1" / "log.jsonl") == {
        "knn": [], "loss": [(1, 8.0), (2, 7.0), (3, 6.0)], "rankme": [(1, 51.0), (2, 52.0), (3, 53.0)]}
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure = plot_curves.draw(plt, plot_curves.pretraining_logs(tmp_path))
    colours = {}  # each row one colour on every panel, though only mdra has kNN points
    for ax in figure.axes:
        for line in ax.get_lines():
            assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color(), line.get_label()
    assert len(set(colours.values())) == 2
    legend = figure.axes[0].get_legend()
    assert [(t.get_text(), h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)] == \
        [(row, colours[row]) for row in ("mdra", "mdra-g1")]
    plt.close(figure)
    made = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    with Image.open(tmp_path / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 1000 and 300 <= image.size[1] <= image.size[0]


def test_knn_records_of_their_own_are_plotted_beside_those_inside_epoch_records(tmp_path):
    pytest.importorskip("matplotlib")
    start, *epochs = pretraining_log(knn_at=(2,))
    untrained = {"event": "knn", "epoch": 0, "step": 0, "knn": {"top1@20": 10.0, "top5@20": 50.0}}
    # a kNN record of its own before its epoch's record, which holds none, and one after its epoch's
    first = {"event": "knn", "epoch": 1, "step": 2, "knn": {"top1@10": 60.0, "top1@200": 61.0}}
    last = {"event": "knn", "epoch": 3, "step": 6, "knn": {"top1@20": 90.0}}
    write_log(tmp_path / "mdra", [start, untrained, *epochs[:2], first, *epochs[2:], last])
    sys.path.insert(0, str(SCRIPT.parent))
    import plot_curves
    curves = plot_curves.curves(tmp_path / "mdra" / "log.jsonl")
    assert curves["knn"] == [(0, 10.0), (1, 60.0), (2, 82.0), (3, 90.0)]
    assert curves["loss"] == [(1, 8.0), (2, 7.0), (3, 6.0)]  # a kNN record is no epoch of the loss
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure = plot_curves.draw(plt, plot_curves.pretraining_logs(tmp_path))
    (knn_line,) = figure.axes[0].get_lines()
    assert list(knn_line.get_xdata()) == [0, 1, 2, 3] and list(knn_line.get_ydata()) == [10.0, 60.0, 82.0, 90.0]
    plt.close(figure)


def test_without_matplotlib_it_says_so_in_one_sentence(tmp_path):
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    made = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(fake.parent)})
    assert made.returncode == 1 and made.stderr.strip() == \
        "plot_curves.py needs matplotlib, which nothing else here does: pip install matplotlib"
