"""The paper's evaluation analyses on hand-made images whose numbers can be counted by hand, and their plots."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines.evaluation.analysis import (ImageAnalysis, confusion_matrix, error_counts, greedy_match,
                                           missed_by_instance_count, per_layer_ap, slot_boxes)
from pipelines.evaluation.analysis_plots import (draw_error_grid, plot_confusion_matrix, plot_missed_by_instance_count,
                                                 plot_per_layer_ap, plot_slot_boxes)

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
QUERIES = 5


def _layer(boxes, scores, labels, queries=QUERIES):
    """A decoder layer's output: the given predictions, then queries of score 0 up to `queries`."""
    pad = queries - len(boxes)
    return {"boxes": np.asarray(list(boxes) + [[0, 0, 1, 1]] * pad, dtype=np.float32).reshape(-1, 4),
            "scores": np.asarray(list(scores) + [0.0] * pad, dtype=np.float32),
            "labels": np.asarray(list(labels) + [1] * pad, dtype=np.int64)}


def _image(image_id, gt_boxes, gt_labels, layers, size=(120, 160)):
    slots = np.random.default_rng(image_id).uniform(0, 1, (QUERIES, 4)).astype(np.float32)
    return ImageAnalysis(image_id=image_id, size=size, gt_boxes=np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4),
                         gt_labels=np.asarray(gt_labels, dtype=np.int64), layers=layers, slot_boxes=slots,
                         slot_scores=np.linspace(0.1, 0.9, QUERIES).astype(np.float32))


def _ap_images():
    """Two images, three decoder layers: 1 every box far from its object, 2 right but image 1's circle found twice
    (the duplicate outranks image 2's circle), 3 exactly the ground truth."""
    a, b, c = [10, 10, 50, 50], [60, 60, 90, 100], [20, 30, 70, 80]
    far = [[v + 1000 for v in box] for box in (a, b)]
    first = _image(1, [a, b], [1, 2], [_layer(far, [1, 1], [1, 2]), _layer([a, a, b], [1.0, 0.9, 1.0], [1, 1, 2]),
                                       _layer([a, b], [1, 1], [1, 2])])
    second = _image(2, [c], [1], [_layer([[v + 1000 for v in c]], [1], [1]), _layer([c], [0.8], [1]),
                                  _layer([c], [1], [1])])
    return [first, second]


def test_ap_per_decoder_layer_with_and_without_nms():
    rows = per_layer_ap(_ap_images(), CATEGORIES)
    assert [row["layer"] for row in rows] == [1, 2, 3]
    assert rows[0] == {"layer": 1, "boxes": "decoder", "AP": 0.0, "AP50": 0.0, "AP_nms": 0.0, "AP50_nms": 0.0}
    # Circles ranked TP 1.0, FP 0.9 (the duplicate), TP 0.8: interpolated precision 1 up to recall 0.5 (51 of COCO's
    # 101 recall points), 2/3 above; squares are perfect. NMS removes the duplicate.
    circle_ap = (51 + 50 * 2 / 3) / 101
    assert rows[1]["AP"] == pytest.approx((circle_ap + 1) / 2) and rows[1]["AP50"] == pytest.approx((circle_ap + 1) / 2)
    assert rows[1]["AP_nms"] == pytest.approx(1.0) and rows[1]["AP50_nms"] == pytest.approx(1.0)
    assert all(rows[2][key] == pytest.approx(1.0) for key in ("AP", "AP50", "AP_nms", "AP50_nms"))
    json.dumps(rows)
    # A box refiner's output follows the decoder's layers (the model's last per-layer output).
    assert [row["boxes"] for row in per_layer_ap(_ap_images(), CATEGORIES, refined=1)] == ["decoder"] * 2 + ["refined"]


def test_ap_is_nan_without_ground_truth_and_empty_without_images():
    empty = _image(7, [], [], [_layer([], [], [])])
    (row,) = per_layer_ap([empty], CATEGORIES)
    assert all(math.isnan(row[key]) for key in ("AP", "AP50", "AP_nms", "AP50_nms"))
    assert per_layer_ap([], CATEGORIES) == []


def _hand_images():
    """Image 1: circle A found, square B found as a circle, circle D missed (its prediction scores 0.3), a square
    predicted on nothing. Image 2: its circle found. Image 3: its circle predicted at 0.4 only, so missed."""
    a, b, d, nothing = [0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 80, 80], [100, 100, 110, 110]
    first = _image(1, [a, b, d], [1, 2, 1], [_layer([a, b, nothing, d], [0.9, 0.8, 0.7, 0.3], [1, 1, 2, 1])])
    second = _image(2, [a], [1], [_layer([a], [0.95], [1])])
    third = _image(3, [b], [1], [_layer([b], [0.4], [1])])
    return [first, second, third]


def test_confusion_matrix_counts_a_hand_made_case():
    cm = confusion_matrix(_hand_images()[:1], CATEGORIES)
    assert cm["classes"] == ["circle", "square", "background"] and cm["category_ids"] == [1, 2]
    assert cm["matrix"] == [[1, 0, 1],  # circle: A found, D missed
                            [1, 0, 0],  # square: B predicted as a circle
                            [0, 1, 0]]  # background: a square predicted on nothing
    assert confusion_matrix([], CATEGORIES)["matrix"] == [[0] * 3] * 3
    json.dumps(cm)


def test_missed_by_instance_count_counts_a_hand_made_case():
    missed = missed_by_instance_count(_hand_images(), CATEGORIES)
    assert missed == {"circle": [{"instances": 1, "images": 2, "mean_missed": 0.5},
                                 {"instances": 2, "images": 1, "mean_missed": 1.0}],
                      "square": [{"instances": 1, "images": 1, "mean_missed": 1.0}]}


def test_error_counts_rank_the_worst_images_first():
    assert error_counts(_hand_images()) == [{"image_id": 1, "false_positives": 2, "false_negatives": 2},
                                            {"image_id": 3, "false_positives": 0, "false_negatives": 1},
                                            {"image_id": 2, "false_positives": 0, "false_negatives": 0}]
    assert error_counts([_image(4, [], [], [])]) == [{"image_id": 4, "false_positives": 0, "false_negatives": 0}]


def test_greedy_matching_takes_the_best_overlap_once():
    gt = np.array([[0, 0, 10, 10], [2, 0, 12, 10]])
    predictions = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [2, 0, 12, 10]])
    # The best-scored prediction takes the second box (IoU 1, not 2/3), the next the first; the third is left over.
    assert greedy_match(predictions, np.array([0.8, 0.9, 0.7]), gt).tolist() == [0, 1, -1]
    assert greedy_match(predictions, np.array([0.8, 0.9, 0.7]), gt, 0.5, np.array([2, 1, 1]),
                        np.array([1, 1])).tolist() == [-1, 1, 0]


def test_slot_boxes_are_the_input_boxes():
    images = _hand_images()
    slots = slot_boxes(images, min_score=0.5)
    kept = np.linspace(0.1, 0.9, QUERIES).astype(np.float32) >= 0.5
    assert slots["slots"] == QUERIES
    for q in range(QUERIES):
        expected = [image.slot_boxes[q].tolist() for image in images] if kept[q] else []
        assert slots["boxes"][q] == expected
    assert slot_boxes([]) == {"slots": 0, "boxes": {}}


def test_every_plot_is_a_png(tmp_path):
    images = _hand_images()
    slots = json.loads(json.dumps(slot_boxes(images)))
    image = np.full((120, 160, 3), 80, dtype=np.uint8)
    first = images[0]
    last = first.layers[-1]
    entry = (image, first.gt_boxes, first.gt_labels, last["boxes"], last["scores"], last["labels"], "1: 2 FP, 2 FN")
    paths = [plot_per_layer_ap(per_layer_ap(_ap_images(), CATEGORIES, refined=1), str(tmp_path / "layers.png")),
             plot_slot_boxes(slots, str(tmp_path / "slots.png")),
             plot_slot_boxes({"slots": 0, "boxes": {}}, str(tmp_path / "no_slots.png")),
             plot_missed_by_instance_count(missed_by_instance_count(images, CATEGORIES), CATEGORIES,
                                           str(tmp_path / "missed.png")),
             plot_confusion_matrix(confusion_matrix(images, CATEGORIES), str(tmp_path / "confusion.png")),
             draw_error_grid([entry, entry], str(tmp_path / "errors.png")),
             draw_error_grid([], str(tmp_path / "no_errors.png"))]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 0 and png.size[1] > 0
