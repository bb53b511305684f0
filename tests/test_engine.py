"""Training step, batched prediction and COCO evaluation (pycocotools) on known answers."""
import pytest
import torch

from detr import PostProcess, SetCriterion, build_model, pad_images
from detr.engine import predict, train_step
from detr.evaluation import evaluate_coco
from detr.optim import OptimizerConfig, build_optimizer

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 50, "height": 60}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def det(box, score, label):
    return {"boxes": torch.tensor([box], dtype=torch.float), "scores": torch.tensor([score]),
            "labels": torch.tensor([label])}


def test_perfect_detections_score_one_and_a_wrong_class_halves_ap():
    perfect = {1: det([10, 10, 40, 30], 0.9, 1), 2: det([5, 5, 25, 25], 0.8, 2)}
    result = evaluate_coco(GT, perfect)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    assert result["per_class"] == pytest.approx({1: 1.0, 2: 1.0})
    assert result["AP_large"] == -1  # no large objects: pycocotools' -1
    wrong = {**perfect, 2: det([5, 5, 25, 25], 0.8, 1)}
    result = evaluate_coco(GT, wrong)
    assert result["AP"] == pytest.approx(0.5) and result["per_class"][2] == 0.0


def test_missing_detections_still_count_the_ground_truth():
    result = evaluate_coco(GT, {1: det([10, 10, 40, 30], 0.9, 1)}, image_ids=[1, 2])
    assert result["AP"] == pytest.approx(0.5) and result["num_images"] == 2
    shifted = evaluate_coco(GT, {1: det([20, 15, 50, 35], 0.9, 1)}, image_ids=[1])  # IoU 1/3
    assert shifted["AP50"] == 0.0


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    images, mask = pad_images([torch.randn(3, 64, 80, generator=g), torch.randn(3, 72, 64, generator=g)])
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]]), "image_id": torch.tensor(1),
         "orig_size": torch.tensor([128, 160])},
        {"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.3, 0.3, 0.4]]),
         "image_id": torch.tensor(2), "orig_size": torch.tensor([72, 64])},
    ]
    return images, mask, targets


def test_train_step_reports_losses_and_clips():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, dropout=0.0).train()
    criterion = SetCriterion.from_config(model.config)
    optimizer = build_optimizer(model, OptimizerConfig())
    before = model.class_embed.weight.detach().clone()
    images, mask, targets = tiny_batch()
    halves = [(images[:1], mask[:1], targets[:1]), (images[1:], mask[1:], targets[1:])]
    metrics = train_step(model, criterion, optimizer, halves, clip_max_norm=0.1)
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "grad_norm", "class_error", "loss_ce_0"} <= set(metrics)
    assert metrics["grad_norm"] > 0.1  # the norm before clipping
    assert not torch.equal(before, model.class_embed.weight)


def test_train_step_refuses_a_non_finite_loss():
    model = build_model("tiny", num_classes=4).train()
    criterion = SetCriterion.from_config(model.config)
    optimizer = build_optimizer(model, OptimizerConfig())
    images, mask, targets = tiny_batch()
    with torch.no_grad():
        model.class_embed.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN|not finite"):
        train_step(model, criterion, optimizer, [(images, mask, targets)])


def test_predict_keys_by_image_id_and_scales_to_the_original_size():
    model = build_model("tiny", num_classes=4).eval()
    images, mask, targets = tiny_batch()
    results = predict(model, [(images, mask, targets)], PostProcess(top_k=3))
    assert sorted(results) == [1, 2] and results[1]["boxes"].shape == (3, 4)
    assert results[1]["boxes"][:, 2].max() <= 160 + 1e-3 and results[2]["boxes"][:, 3].max() <= 72 + 1e-3
    assert model.training is False


def test_ground_truth_rebuilt_from_evaluation_targets_matches_the_original():
    from detr.evaluation import coco_ground_truth

    # Image 1 was 80x100 (h, w), evaluated at 160x200: the box 10,10,30x20 is normalised by the resized size.
    target = {"image_id": torch.tensor(1), "orig_size": torch.tensor([80, 100]), "size": torch.tensor([160, 200]),
              "labels": torch.tensor([1]), "boxes": torch.tensor([[0.25, 0.25, 0.3, 0.25]]),
              "area": torch.tensor([2400.0]), "iscrowd": torch.tensor([0])}
    gt = coco_ground_truth([target, target], categories=GT["categories"])
    assert gt["images"] == [{"id": 1, "height": 80, "width": 100}]
    (ann,) = gt["annotations"]
    assert ann["bbox"] == pytest.approx([10, 10, 30, 20]) and ann["area"] == pytest.approx(600)
    result = evaluate_coco(gt, {1: det([10, 10, 40, 30], 0.9, 1)})
    assert result["AP"] == pytest.approx(1.0)
