"""The files an evaluation logs: the per-class table and the precision-recall plot."""
import csv
import math

from PIL import Image

from pipelines.evaluation.report import PANOPTIC_COLUMNS, plot_precision_recall, write_per_class_table


def test_the_per_class_table_names_each_class_and_leaves_missing_numbers_empty(tmp_path):
    boxes = write_per_class_table(str(tmp_path / "ap.csv"), {2: {"AP": 0.25}, 1: {"AP": math.nan}},
                                  [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}], ("AP",))
    with open(boxes) as f:
        assert list(csv.reader(f)) == [["category_id", "name", "AP"], ["1", "circle", ""], ["2", "square", "0.250000"]]
    panoptic = {3: {"PQ": 0.5, "SQ": 0.75, "RQ": 2 / 3, "TP": 2, "FP": 1, "FN": 1, "mask_AP": math.nan}}
    path = write_per_class_table(str(tmp_path / "pq.csv"), panoptic, [{"id": 3, "name": "sky", "isthing": 0}],
                                 PANOPTIC_COLUMNS)
    with open(path) as f:
        assert list(csv.reader(f))[1] == ["3", "sky", "0", "0.500000", "0.750000", "0.666667", "2", "1", "1", ""]


def test_the_precision_recall_plot_is_a_png(tmp_path):
    curves = {1: [1.0] * 50 + [0.5] * 51, 2: [0.8] * 101}
    path = plot_precision_recall(curves, [{"id": 1, "name": "circle"}], str(tmp_path / "pr.png"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 450)
