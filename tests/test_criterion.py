"""SetCriterion: loss names, near-zero loss for perfect predictions, weights, bad labels."""
import pytest
import torch

from detr import DETRConfig, SetCriterion, loss_weights


def perfect_outputs(targets, queries, num_classes):
    """Predictions that match every target exactly and say "no object" everywhere else."""
    batch = len(targets)
    logits = torch.full((batch, queries, num_classes + 1), -30.0)
    logits[..., num_classes] = 30.0
    boxes = torch.full((batch, queries, 4), 0.5)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        logits[b, :n, num_classes] = -30.0
        logits[b, torch.arange(n), t["labels"]] = 30.0
        boxes[b, :n] = t["boxes"]
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.7, 0.2, 0.35]])},
    {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.6]])},
]


def test_perfect_predictions_give_zero_loss():
    config = DETRConfig.preset("tiny", num_classes=5, aux_loss=False)
    criterion = SetCriterion.from_config(config)
    losses = criterion(perfect_outputs(TARGETS, 6, 5), TARGETS)
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    for name in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-5), name


def test_aux_losses_carry_layer_suffixes_and_weights():
    config = DETRConfig.preset("tiny", num_classes=5, dec_layers=3)
    weights = loss_weights(config)
    assert weights == {
        "loss_ce": 1, "loss_bbox": 5, "loss_giou": 2,
        "loss_ce_0": 1, "loss_bbox_0": 5, "loss_giou_0": 2,
        "loss_ce_1": 1, "loss_bbox_1": 5, "loss_giou_1": 2,
    }
    criterion = SetCriterion.from_config(config)
    layer = perfect_outputs(TARGETS, 6, 5)
    # A permuted, shifted copy: re-matched per layer, so only the shift costs anything.
    wrong = {"pred_logits": layer["pred_logits"].detach().flip(1), "pred_boxes": layer["pred_boxes"].detach().flip(1) + 0.05}
    outputs = {**layer, "aux_outputs": [wrong, wrong]}
    losses = criterion(outputs, TARGETS)
    assert {"loss_ce_0", "loss_bbox_1", "cardinality_error_1"} <= set(losses)
    assert "class_error_0" not in losses  # logged for the last layer only, as officially
    total = criterion.total(losses)
    expected = sum(losses[k] * w for k, w in weights.items())
    assert total.item() == pytest.approx(expected.item())
    assert losses["loss_bbox"].item() < 1e-6
    assert losses["loss_bbox_0"].item() == pytest.approx(4 * 0.05 * 3 / 3, rel=1e-4)  # 4 coords x 0.05, 3 boxes / 3
    assert losses["class_error"].item() == 0


def test_loss_normalisation_and_no_object_weight():
    """loss_ce is the eos-weighted mean over queries; box losses are divided by the number of boxes."""
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 6, 6), "pred_boxes": torch.rand(3, 6, 4) * 0.4 + 0.3}
    criterion = SetCriterion.from_config(DETRConfig.preset("tiny", num_classes=5, aux_loss=False))
    losses = criterion(outputs, TARGETS)
    indices = criterion.matcher(outputs, TARGETS)
    target_classes = torch.full((3, 6), 5)
    for b, (rows, cols) in enumerate(indices):
        target_classes[b, rows] = TARGETS[b]["labels"][cols]
    weight = torch.ones(6)
    weight[-1] = 0.1
    expected_ce = torch.nn.functional.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    l1 = sum((outputs["pred_boxes"][b, r] - TARGETS[b]["boxes"][c]).abs().sum() for b, (r, c) in enumerate(indices))
    assert losses["loss_bbox"].item() == pytest.approx(l1.item() / 3, rel=1e-6)


def test_batch_without_any_target_is_finite():
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    outputs = {"pred_logits": torch.randn(2, 4, 6, requires_grad=True), "pred_boxes": torch.rand(2, 4, 4)}
    criterion = SetCriterion.from_config(DETRConfig.preset("tiny", num_classes=5, aux_loss=False))
    losses = criterion(outputs, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0 and losses["loss_ce"].item() > 0
    criterion.total(losses).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_labels_outside_num_classes_are_a_clear_error():
    criterion = SetCriterion.from_config(DETRConfig.preset("tiny", num_classes=3))
    bad = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    outputs = {"pred_logits": torch.randn(1, 4, 4), "pred_boxes": torch.rand(1, 4, 4)}
    with pytest.raises(ValueError, match="largest category id"):
        criterion(outputs, bad)
