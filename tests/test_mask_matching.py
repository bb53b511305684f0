"""Mask costs in the Hungarian matching (set_cost_mask, set_cost_dice): regions that share a box are told apart."""
from __future__ import annotations

import math

import pytest
import torch

from detr import DETRConfig, HungarianMatcher, SetCriterion, build_model, pad_images


def diagonal_halves(size: int = 16) -> torch.Tensor:
    """Two stuff-like regions split by the diagonal: both boxes are the whole image."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    upper = x > y
    return torch.stack([upper, ~upper])


def test_mask_cost_by_hand():
    matcher = HungarianMatcher(1, 1, 1, cost_mask=1.0, cost_dice=1.0)
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :4, :] = True  # the top half: cells (0, 0) and (0, 1) of the 2x2 grid
    logits = torch.tensor([[[2.0, 2.0], [-2.0, -2.0]]])  # one query, on the top half
    cost = matcher.mask_cost(logits, target)
    p, t = torch.sigmoid(torch.tensor([2.0, 2.0, -2.0, -2.0])), torch.tensor([1.0, 1.0, 0.0, 0.0])
    ce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(cost, (ce + dice).view(1, 1))
    # Cells are averaged over their 4x4 pixels, and the padded batch grid is cropped to the image's cells.
    half_cell = torch.zeros(1, 6, 8, dtype=torch.bool)
    half_cell[0, :2, :4] = True  # half of cell (0, 0); the 6x8 image owns 2x2 cells
    padded = torch.full((1, 3, 5), -30.0)
    padded[0, 0, 0] = 0.0  # p = 0.5 on the one cell that holds some target
    got = matcher.mask_cost(padded, half_cell)
    q = torch.tensor([0.5, *(torch.sigmoid(torch.tensor(-30.0)),) * 3])
    t = torch.tensor([0.5, 0.0, 0.0, 0.0])
    ce = -(t * q.log() + (1 - t) * (1 - q).log()).mean()
    dice = 1 - (2 * (q * t).sum() + 1) / (q.sum() + t.sum() + 1)
    torch.testing.assert_close(got, (ce + dice).view(1, 1), rtol=1e-5, atol=1e-6)


def test_regions_sharing_a_box_are_matched_by_their_masks():
    halves = diagonal_halves()
    targets = [{"labels": torch.tensor([1, 1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2), "masks": halves}]
    # Two queries with the same class and box; query 0's mask is the lower half, query 1's the upper half.
    cells = halves.float().view(2, 1, 4, 4, 4, 4).mean((3, 5))[:, 0]  # 4x4 cells
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.tensor([[[0.5, 0.5, 1.0, 1.0]] * 2]),
               "pred_masks": torch.stack([cells[1], cells[0]])[None] * 20 - 10}
    by_boxes = HungarianMatcher(1, 5, 2)(outputs, targets)[0]
    by_masks = HungarianMatcher(1, 5, 2, cost_mask=5, cost_dice=5)(outputs, targets)[0]
    pairs = dict(zip(by_masks[0].tolist(), by_masks[1].tolist()))
    assert pairs == {0: 1, 1: 0}  # each query takes the region its mask covers
    assert dict(zip(by_boxes[0].tolist(), by_boxes[1].tolist())) == {0: 0, 1: 1}  # boxes alone: a tie


def test_mask_matching_computes_every_mask_in_training_and_needs_a_mask_head():
    with pytest.raises(ValueError, match="need masks=True"):
        DETRConfig.preset("tiny", set_cost_mask=1.0)
    config = DETRConfig.preset("tiny_panoptic", num_classes=4, freeze_detector=False, enc_layers=1, dec_layers=1,
                               num_queries=5, set_cost_mask=5.0, set_cost_dice=5.0)
    torch.manual_seed(0)
    model = build_model(config).train()
    criterion = SetCriterion.from_config(config)
    assert criterion.mask_query_selection([]) is None  # all masks
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2),
                "masks": diagonal_halves(64)},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0]]),
                "masks": torch.zeros(1, 48, 64, dtype=torch.bool).index_fill_(2, torch.arange(32), True)}]
    outputs = model(images, mask, mask_queries=criterion.mask_query_selection(targets))
    assert (outputs["pred_masks"] > -1e3).all()  # every query's mask was computed
    losses = criterion(outputs, targets)
    assert math.isfinite(float(criterion.total(losses))) and losses["loss_dice"] > 0
    criterion.total(losses).backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
