"""PQ/SQ/RQ against a case computed by hand, a perfect prediction, and mask AP through pycocotools."""
import numpy as np
import pytest

from detr.panoptic_evaluation import PanopticEvaluator, instance_ground_truth, mask_ap, panoptic_target
from detr import masks_to_rle

CATEGORIES = [{"id": 1, "name": "circle", "isthing": 1}, {"id": 2, "name": "square", "isthing": 1},
              {"id": 3, "name": "sky", "isthing": 0}, {"id": 4, "name": "grass", "isthing": 0},
              {"id": 5, "name": "never", "isthing": 1}]

# Ground truth (4 x 6): sky on top, thing A | grass | thing B below.
GT = np.array([[10, 10, 10, 10, 10, 10],
               [10, 10, 10, 10, 10, 10],
               [1, 1, 11, 11, 2, 2],
               [1, 1, 11, 11, 2, 2]])
GT_SEGMENTS = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 10, "category_id": 3},
               {"id": 11, "category_id": 4}]
# Prediction: sky loses one pixel to grass, A grows into the grass, B gets the wrong class.
PRED = np.array([[5, 5, 5, 5, 5, 5],
                 [5, 5, 5, 5, 5, 8],
                 [6, 6, 6, 8, 7, 7],
                 [6, 6, 6, 8, 7, 7]])
PRED_SEGMENTS = [{"id": 5, "category_id": 3}, {"id": 6, "category_id": 1}, {"id": 7, "category_id": 2},
                 {"id": 8, "category_id": 4}]


def test_pq_of_a_case_computed_by_hand():
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(PRED, PRED_SEGMENTS, GT, GT_SEGMENTS)
    r = evaluator.compute()
    # Matches need IoU > 0.5 and the same class:
    #   sky  (3): IoU 11/12 -> TP.                      SQ 11/12, RQ 1,        PQ 11/12
    #   A    (1): IoU 4/6   -> TP; B (1) unmatched: FN. SQ 2/3,   RQ 1/1.5,    PQ 4/9
    #   b    (2): predicted square, no square: FP.      SQ 0,     RQ 0,        PQ 0
    #   grass(4): IoU 2/5 = 0.4 -> FP + FN.             SQ 0,     RQ 0,        PQ 0
    #   class 5 never occurs: not averaged.
    pc = r["per_class"]
    assert set(pc) == {1, 2, 3, 4}
    assert pc[3]["PQ"] == pytest.approx(11 / 12) and pc[3]["RQ"] == 1.0
    assert (pc[1]["TP"], pc[1]["FP"], pc[1]["FN"]) == (1, 0, 1)
    assert pc[1]["SQ"] == pytest.approx(2 / 3) and pc[1]["RQ"] == pytest.approx(2 / 3)
    assert pc[1]["PQ"] == pytest.approx(4 / 9)
    assert (pc[2]["FP"], pc[4]["FP"], pc[4]["FN"]) == (1, 1, 1) and pc[2]["PQ"] == pc[4]["PQ"] == 0.0
    assert r["PQ"] == pytest.approx((4 / 9 + 0 + 11 / 12 + 0) / 4)
    assert r["SQ"] == pytest.approx((2 / 3 + 11 / 12) / 4)
    assert r["RQ"] == pytest.approx((2 / 3 + 1) / 4)
    assert r["PQ_th"] == pytest.approx(4 / 9 / 2) and r["PQ_st"] == pytest.approx(11 / 12 / 2)
    assert r["SQ_th"] == pytest.approx(1 / 3) and r["RQ_st"] == pytest.approx(0.5)
    assert (r["classes"], r["classes_th"], r["classes_st"], r["num_images"]) == (4, 2, 2, 1)


def test_a_perfect_prediction_has_pq_one_and_void_is_ignored():
    evaluator = PanopticEvaluator(CATEGORIES)
    renumbered = {1: 21, 2: 22, 10: 30, 11: 31}  # segment ids are arbitrary labels
    pred = np.vectorize(renumbered.get)(GT)
    pred_segments = [{"id": renumbered[s["id"]], "category_id": s["category_id"]} for s in GT_SEGMENTS]
    evaluator.update(pred, pred_segments, GT, GT_SEGMENTS)
    gt_with_void = GT.copy()
    gt_with_void[0, :3] = 0  # unlabelled ground truth: whatever is predicted there does not count
    evaluator.update(pred, pred_segments, gt_with_void, GT_SEGMENTS)
    r = evaluator.compute()
    assert r["PQ"] == r["SQ"] == r["RQ"] == r["PQ_th"] == r["PQ_st"] == 1.0


def test_segments_left_unpredicted_are_false_negatives():
    evaluator = PanopticEvaluator(CATEGORIES)
    nothing = np.zeros_like(GT)
    evaluator.update(nothing, [], GT, GT_SEGMENTS)  # an empty prediction misses all four segments
    r = evaluator.compute()
    assert r["PQ"] == 0.0 and {c: v["FN"] for c, v in r["per_class"].items()} == {1: 2, 3: 1, 4: 1}


def test_mask_ap_of_perfect_and_wrong_masks():
    is_thing = {c["id"]: bool(c["isthing"]) for c in CATEGORIES}
    annotations = instance_ground_truth(7, GT, GT_SEGMENTS, is_thing)
    assert [a["category_id"] for a in annotations] == [1, 1] and annotations[0]["area"] == 4
    ground_truth = {"images": [{"id": 7, "height": 4, "width": 6}], "annotations": annotations,
                    "categories": CATEGORIES}
    masks = np.stack([GT == 1, GT == 2])
    perfect = [{"image_id": 7, "category_id": 1, "segmentation": rle, "score": s}
               for rle, s in zip(masks_to_rle(masks), (0.9, 0.8))]
    assert mask_ap(ground_truth, perfect)["segm_AP"] == pytest.approx(1.0)
    shifted = [{**perfect[0], "segmentation": masks_to_rle(np.roll(masks[:1], 1, axis=2))[0]}]
    assert mask_ap(ground_truth, shifted)["segm_AP50"] < 0.6  # IoU 1/3 misses, and B is never found


def test_counts_summed_over_workers_score_all_their_images():
    """Training validates on each worker's share of the images and sums the counts: the same PQ as one
    evaluator that saw every image."""
    whole, first, second = (PanopticEvaluator(CATEGORIES) for _ in range(3))
    for evaluator, (pred, segments) in ((first, (PRED, PRED_SEGMENTS)), (second, (np.zeros_like(GT), []))):
        evaluator.update(pred, segments, GT, GT_SEGMENTS)
        whole.update(pred, segments, GT, GT_SEGMENTS)
    first.set_counts(first.counts() + second.counts())
    assert first.compute()["per_class"] == whole.compute()["per_class"]
    assert first.compute()["PQ"] == pytest.approx(whole.compute()["PQ"]) and whole.compute()["PQ"] > 0


def test_a_samples_masks_become_a_panoptic_ground_truth():
    masks = np.zeros((2, 4, 6), dtype=bool)
    masks[0, :, :3] = True
    masks[1, 2:, 2:] = True  # overlaps the first: the later mask wins, as segments do not overlap
    id_map, segments = panoptic_target(masks, np.array([3, 1]))
    assert segments == [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 1}]
    assert id_map.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2]]
