"""The box refiner (`DETRConfig.roi_refine`): it starts at the decoder's boxes, reads the fine backbone features
inside each box of each image (padding included), trains end to end, and loads official weights fresh."""
from __future__ import annotations

import pytest
import torch

from detr import (DenseHead, DETRConfig, FocalLoss, RoIRefine, SetCriterion, TwoStage, build_model, from_official,
                  official_state_dict, pad_images)
from detr.roi_refine import RoIBoxRefiner

FAST = dict(backbone_norm="batch", train_backbone_stem=True, backbone_stages=2, focal=FocalLoss(),
            dense_head=DenseHead(2), two_stage=TwoStage(nms=0.5, content=True), num_classes=4, dropout=0.0)


def refined_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", **{**FAST, "roi_refine": RoIRefine(), **overrides})


def test_refined_boxes_start_at_the_decoders_which_become_an_auxiliary_output():
    model = refined_model().eval()
    assert model.backbone.return_stages == ("layer1", "layer2") and model.refiner.stride == 4
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 64, 80)])
    with torch.no_grad():
        refined = model(images, mask)
        model.aux_loss = False
        plain = model(images, mask)
    decoder = refined["aux_outputs"][-1]
    assert len(refined["aux_outputs"]) == model.config.dec_layers
    torch.testing.assert_close(decoder["pred_logits"], refined["pred_logits"])
    torch.testing.assert_close(refined["pred_boxes"], decoder["pred_boxes"].clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(plain["pred_boxes"], refined["pred_boxes"])  # without aux: the same boxes


def test_the_refiner_reads_the_features_inside_each_images_own_box():
    torch.manual_seed(0)
    refiner = RoIBoxRefiner(in_channels=8, hidden_dim=16, stride=4)
    torch.nn.init.normal_(refiner.delta.layers[-1].weight)  # not at the start: every input must matter
    features = torch.randn(2, 8, 16, 20, requires_grad=True)  # a 64 x 80 padded batch at stride 4
    mask = torch.ones(2, 64, 80, dtype=torch.bool)
    mask[0] = False  # the first image fills the batch
    mask[1, :40, :60] = False  # the second is 40 x 60
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]]])  # the central half of each image
    refiner(features, mask, boxes, torch.zeros(2, 1, 16)).sum().backward()
    touched = features.grad.abs().sum(1) > 0  # [B, H, W]: cells the result depends on
    # Image 0: pixels x 20..60, y 16..48 -> cells x 5..15, y 4..12; image 1: x 15..45, y 10..30 -> x 3..11, y 2..8
    # (bilinear sampling reaches the next cell).
    for image, (x0, x1, y0, y1) in enumerate([(4, 15, 3, 12), (3, 11, 2, 8)]):
        rows, cols = touched[image].nonzero().T
        assert rows.min() >= y0 and rows.max() <= y1 and cols.min() >= x0 and cols.max() <= x1, image
        assert touched[image, (y0 + y1) // 2, (x0 + x1) // 2]
    assert touched[0].sum() > touched[1].sum()  # the larger image's box spans more cells


def test_boxes_at_or_beyond_the_edge_read_the_same_features_alone_as_in_a_padded_batch():
    torch.manual_seed(0)
    refiner = RoIBoxRefiner(in_channels=8, hidden_dim=16, stride=4)
    torch.nn.init.normal_(refiner.delta.layers[-1].weight)
    alone = torch.randn(1, 8, 10, 15)  # a 40 x 60 image (its last cells half outside it: 38 x 58 would do too)
    padded = torch.zeros(1, 8, 16, 20)
    padded[:, :, :10, :15] = alone
    mask = torch.ones(1, 64, 80, dtype=torch.bool)
    mask[0, :38, :58] = False
    boxes = torch.tensor([[[0.8, 0.8, 0.4, 0.4], [0.9, 0.5, 0.5, 0.3], [1.0, 1.0, 0.3, 0.3], [0.5, 0.5, 1.0, 1.0]]])
    queries = torch.randn(1, 4, 16)
    torch.testing.assert_close(refiner(padded, mask, boxes, queries), refiner(alone, mask[:, :38, :58], boxes, queries),
                               rtol=0, atol=1e-6)


def test_an_image_alone_gets_the_refined_boxes_it_gets_in_a_padded_batch():
    model = refined_model().eval()
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 64, 80)])
    model.refiner.delta.layers[-1].weight.data.normal_(0, 0.1)
    with torch.no_grad():
        together = model(images, mask)["pred_boxes"]
        alone = model(images[1:, :, :64, :80], mask[1:, :64, :80])["pred_boxes"]
    torch.testing.assert_close(together[1:], alone, rtol=0, atol=1e-5)


def test_the_refined_boxes_losses_train_the_refiner():
    model = refined_model().train()
    criterion = SetCriterion.from_config(model.config)
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 64, 80)])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    assert f"loss_bbox_{model.config.dec_layers - 1}" in criterion(model(images, mask), targets)  # the decoder's
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):  # the offset head starts at zero: its inputs learn from the second step on
        optimizer.zero_grad()
        losses = criterion(model(images, mask), targets)
        (losses["loss_bbox"] + losses["loss_giou"]).backward()  # the refined boxes' losses alone
        grads = {name: p.grad.abs().sum().item() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    assert grads["refiner.delta.layers.1.weight"] > 0 and grads["refiner.pool_proj.weight"] > 0


def test_official_weights_load_with_a_fresh_refiner_and_bad_settings_are_refused(tmp_path):
    torch.manual_seed(0)
    plain = build_model("tiny", num_classes=4, dropout=0.0)
    path = tmp_path / "official.pth"
    torch.save({"model": official_state_dict(plain)}, path)
    model = from_official(path, backbone_stages=4, focal=FocalLoss(), dense_head=DenseHead(2),
                          two_stage=TwoStage(), roi_refine=RoIRefine(stage=2))
    assert model.refiner.stride == 8 and model.backbone.return_stages == ("layer2", "layer4")
    dc5 = build_model("detr_r50", hidden_dim=64, dilation=True, roi_refine=RoIRefine(stage=4))
    assert dc5.refiner.stride == dc5.backbone.stride == 16  # a dilated stage 4 keeps stage 3's stride
    torch.testing.assert_close(model.backbone.state_dict(), plain.backbone.state_dict())
    with pytest.raises(ValueError, match=r"roi_refine.stage must be a stage the backbone has \(1..2\), got 3"):
        DETRConfig(**{**FAST, "roi_refine": RoIRefine(stage=3)})
    with pytest.raises(ValueError, match="roi_refine.pooled must be >= 1"):
        DETRConfig(**{**FAST, "roi_refine": RoIRefine(pooled=0)})
