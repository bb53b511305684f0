"""Sigmoid focal classification (Deformable DETR): loss, matching cost, scores; the class head keeps its layout."""
import math

import pytest
import torch

from detr import DETRConfig, FocalLoss, PostProcess, SetCriterion, build_model, scored_by_sigmoid
from detr.matcher import HungarianMatcher, focal_class_cost

ALPHA, GAMMA = 0.25, 2.0


def focal_term(logit: float, positive: bool) -> float:
    p = 1 / (1 + math.exp(-logit))
    if positive:
        return -ALPHA * (1 - p) ** GAMMA * math.log(p)
    return -(1 - ALPHA) * p**GAMMA * math.log(1 - p)


def criterion(**fields) -> SetCriterion:
    config = DETRConfig(num_classes=3, aux_loss=False, focal=FocalLoss(ALPHA, GAMMA), **fields)
    return SetCriterion.from_config(config)


def test_focal_loss_matches_a_hand_computation():
    # Two queries, classes 0..2 plus the unused no-object logit; one target (class 2) at query 1's box.
    logits = torch.tensor([[[0.5, -1.0, 2.0, 9.0], [-0.3, 0.8, 1.5, -9.0]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.3, 0.3]]])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.3]])}]
    losses = criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    expected = sum(
        focal_term(logits[0, q, c].item(), positive=(q, c) == (1, 2)) for q in range(2) for c in range(3)
    )  # normalised by the number of boxes (1); the no-object logit plays no part
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["class_error"].item() == 0.0


def test_perfect_predictions_give_zero_loss():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 1] = logits[0, 2, 2] = 30.0
    pred_boxes = torch.tensor([[boxes[0].tolist(), [0.5, 0.5, 0.1, 0.1], boxes[1].tolist()]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": boxes}]
    crit = criterion()
    losses = crit({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert crit.total(losses).item() == pytest.approx(0.0, abs=1e-5)
    assert losses["cardinality_error"].item() == 0.0


def test_focal_matching_cost_ranks_predictions_like_the_loss():
    logits = torch.tensor([[-2.0], [0.0], [3.0]])
    cost = focal_class_cost(logits, ALPHA, GAMMA)
    for i, x in enumerate(logits[:, 0].tolist()):
        assert cost[i, 0].item() == pytest.approx(focal_term(x, True) - focal_term(x, False), rel=1e-5)
    assert cost[2, 0] < cost[1, 0] < cost[0, 0]
    # Same boxes everywhere: the class cost alone picks the query most confident in the target's class.
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal=(ALPHA, GAMMA))
    outputs = {"pred_logits": torch.tensor([[[3.0, -3.0, 0.0], [-3.0, 3.0, 0.0]]]),
               "pred_boxes": torch.full((1, 2, 4), 0.5)}
    (rows, cols), = matcher(outputs, [{"labels": torch.tensor([1]), "boxes": torch.full((1, 4), 0.5)}])
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_sigmoid_detections_are_the_best_query_class_pairs():
    # Query 0 is torn between classes 1 and 2 (the truth may be either); query 1 is sure of class 0.
    logits = torch.tensor([[[-5.0, 1.0, 0.8, 9.0], [3.0, -6.0, -6.0, 9.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    (det,) = PostProcess(max_detections=3, sigmoid=True)(outputs, [[100, 100]])
    assert det["labels"].tolist() == [0, 1, 2]
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 1.0, 0.8])))
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 10, 30, 30], [40, 40, 60, 60], [40, 40, 60, 60]]))
    (trimmed,) = PostProcess(score_threshold=0.6, top_k=5, sigmoid=True)(outputs, [[100, 100]])
    assert trimmed["labels"].tolist() == [0, 1, 2]  # sigmoid(0.8) = 0.69 is above the threshold too
    with pytest.raises(ValueError, match="max_detections"):
        PostProcess(max_detections=0)


def test_focal_models_keep_the_class_head_and_are_scored_with_sigmoids():
    model = build_model("tiny", num_classes=3, focal=FocalLoss()).eval()
    assert model.class_embed.out_features == 4  # num_classes + 1, the official layout
    torch.testing.assert_close(model.class_embed.bias.sigmoid(), torch.full((4,), 0.01))  # the focal prior
    assert scored_by_sigmoid(model.config) and not scored_by_sigmoid(DETRConfig.preset("tiny"))
    logits = torch.tensor([[[0.0, 2.0, -1.0, 5.0]]])
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 1, 4), 0.5)}
    (det,) = PostProcess(sigmoid=scored_by_sigmoid(model.config))(outputs, [[10, 10]])
    # One detection per (query, class) pair, best first; the unused no-object column (5.0) is none.
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([2.0, 0.0, -1.0])))
    assert det["labels"].tolist() == [1, 0, 2]
    (softmax,) = PostProcess()({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, [[10, 10]])
    assert softmax["scores"].item() == pytest.approx(torch.softmax(logits[0, 0], -1)[1].item())
