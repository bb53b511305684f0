"""DenseHead.mask_assignment: the dense head's positives are each target's best-matched cells and the cells inside its mask."""
from __future__ import annotations

import pytest
import torch

from detr import (DenseHead, DETRConfig, FocalLoss, HungarianMatcher, MaskHead, SetCriterion, TwoStage, build_model,
                  pad_images)
from detr.class_losses import FocalClasses
from detr.mask_assignment import covered_cells, mask_assignment


def one_to_many(matcher, dense, targets, k):
    """The criterion's one-to-many match: each target repeated k times."""
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    return matcher({"pred_logits": dense["pred_logits"], "pred_boxes": dense["pred_boxes"]}, repeated)


def test_cells_whose_centres_lie_inside_a_mask_by_hand():
    masks = torch.zeros(3, 30, 32, dtype=torch.bool)
    masks[0, :, :16] = True  # the left half: centre columns 4 and 12
    masks[1, 18:26, 18:26] = True  # holds the centre (20, 20) only: cell (2, 2)
    masks[2, 0:3, 29:32] = True  # too small for any centre
    masks[0, 18:26, 18:26] = False
    cells, owners = covered_cells(masks, (4, 4), 8)
    got = sorted(zip(cells.tolist(), owners.tolist()))
    # Row 3's centres sit at y = 28, inside the 30-pixel image.
    left = [(r * 4 + c, 0) for r in range(4) for c in (0, 1)]
    assert got == sorted(left + [(2 * 4 + 2, 1)])
    # A cell inside two (overlapping instance) masks goes to the smaller target.
    overlapping = torch.zeros(2, 16, 16, dtype=torch.bool)
    overlapping[0] = True
    overlapping[1, :8, :8] = True
    cells, owners = covered_cells(overlapping, (2, 2), 8)
    assert dict(zip(cells.tolist(), owners.tolist())) == {0: 1, 1: 0, 2: 0, 3: 0}
    # Centres beyond the image (a padded grid) are never inside.
    cells, _ = covered_cells(torch.ones(1, 12, 12, dtype=torch.bool), (3, 3), 8)
    assert cells.tolist() == [0]  # centres at 4, 12 and 20: only 4 lies inside 12 pixels
    cells, owners = covered_cells(torch.zeros(0, 16, 16, dtype=torch.bool), (2, 2), 8)  # an image without targets
    assert cells.numel() == 0 and owners.numel() == 0


def test_k_best_cells_weigh_one_and_the_rest_of_each_mask_shares_k():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True  # 8 cell centres: columns 0 and 1
    masks[1, 1:3, 29:31] = True  # no centre: only its matched cells
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.94, 0.06, 0.06, 0.06]]),
                "masks": masks}]
    boxes = torch.tensor([[0.9, 0.9, 0.05, 0.05]] * 16)
    boxes[[0, 4]] = torch.tensor([0.25, 0.5, 0.5, 1.0])  # cells (0, 0) and (1, 0) predict the left half
    boxes[3] = torch.tensor([0.94, 0.06, 0.07, 0.07])  # cell (0, 3) predicts the small box
    boxes[7] = torch.tensor([0.9, 0.1, 0.1, 0.1])
    dense = {"pred_logits": torch.zeros(1, 16, 3), "pred_boxes": boxes[None]}
    matched = one_to_many(HungarianMatcher(1, 5, 2), dense, targets, k=2)
    ((cells, owners),), weights = mask_assignment(matched, targets, (4, 4), 8, k=2)
    got = {(c, o): w for c, o, w in zip(cells.tolist(), owners.tolist(), weights.tolist())}
    expected = {(0, 0): 1.0, (4, 0): 1.0, (3, 1): 1.0, (7, 1): 1.0}
    expected.update({(r * 4 + c, 0): pytest.approx(2 / 6) for r in range(4) for c in (0, 1) if r * 4 + c not in (0, 4)})
    assert got == expected
    assert len(set(cells.tolist())) == len(cells)  # a cell is one target's positive at most


def test_dense_head_trains_every_covered_cell():
    config = DETRConfig.preset("tiny_panoptic", num_classes=4, enc_layers=1, dec_layers=1, num_queries=5,
                               mask_head=MaskHead(freeze_detector=False), focal=FocalLoss(),
                               dense_head=DenseHead(2, mask_assignment=True), two_stage=TwoStage(), backbone_stages=2)
    torch.manual_seed(0)
    model = build_model(config).train()
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    halves = torch.zeros(2, 64, 64, dtype=torch.bool)
    halves[0, :, :32] = True
    halves[1, :, 32:] = True
    small = torch.zeros(1, 48, 64, dtype=torch.bool)
    small[0, 8:24, 8:24] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0]]),
                "masks": halves},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.25, 1 / 3, 0.25, 1 / 3]]), "masks": small}]
    criterion = SetCriterion.from_config(config)
    out = model(images, mask, mask_queries=criterion.mask_query_selection(targets))
    enc = out["enc_outputs"]
    assert enc["grid"] == (8, 8) and enc["stride"] == 8
    matched = one_to_many(criterion.matcher, enc, targets, k=2)
    indices, weights = mask_assignment(matched, targets, enc["grid"], enc["stride"], 2)
    assert len(indices[0][0]) == 64  # the two halves cover all 8x8 cells
    square = {r * 8 + c for r in (1, 2) for c in (1, 2)}  # centres (12, 12) to (20, 20) lie inside it
    assert square <= set(indices[1][0].tolist()) and len(indices[1][0]) <= 6  # plus its matched cells
    assert weights.sum().item() == pytest.approx(2 * 2 * 3)  # each of the 3 targets: k matched + k shared
    losses = criterion(out, targets)
    plain = SetCriterion.from_config(config.replace(dense_head=DenseHead(2)))(out, targets)
    assert losses["loss_ce_enc"] != plain["loss_ce_enc"] and losses["loss_ce"] == plain["loss_ce"]
    criterion.total(losses).backward()
    assert model.detr.dense_head.class_embed.weight.grad.abs().sum() > 0


def test_weighted_losses_scale_each_matched_prediction():
    # Weights of 1 give the unweighted losses; weights scale each matched prediction's terms.
    criterion = SetCriterion(3, HungarianMatcher(1, 5, 2), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2},
                             classes=FocalClasses(3, 0.25, 2.0))
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 6, 4), "pred_boxes": torch.rand(1, 6, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])}]
    pairs = [(torch.tensor([1, 4]), torch.tensor([0, 1]))]
    norms = {"num_boxes": 2.0, "ce_weight": 1.0}
    plain = {**criterion.loss_labels(outputs, targets, pairs, norms, log=False),
             **criterion.loss_boxes(outputs, targets, pairs, norms)}
    ones = {**criterion.loss_labels(outputs, targets, pairs, norms, log=False, weights=torch.ones(2)),
            **criterion.loss_boxes(outputs, targets, pairs, norms, weights=torch.ones(2))}
    for name in plain:
        assert torch.allclose(plain[name], ones[name], atol=1e-6), name
    doubled = criterion.loss_boxes(outputs, targets, pairs, norms, weights=torch.tensor([2.0, 0.0]))
    first = criterion.loss_boxes(outputs, targets, [(pairs[0][0][:1], pairs[0][1][:1])], norms)
    assert torch.allclose(doubled["loss_bbox"], 2 * first["loss_bbox"]) and torch.allclose(doubled["loss_giou"], 2 * first["loss_giou"])
