"""The dense one-to-many encoder head: training-only, cell-relative boxes, k cells per target."""
import pytest
import torch

from detr import DETRConfig, SetCriterion, build_model, loss_weights, official_state_dict, pad_images

K = 2


def dense_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, focal_loss=True, encoder_aux_matches=K, dropout=0.0)


def test_cells_start_at_their_own_box_and_padding_is_background():
    model = dense_model().train()
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 64, 64)])  # 2x3 and 2x2 cells
    with torch.no_grad():
        enc = model(images, mask)["enc_outputs"]
    assert enc["pred_logits"].shape == (2, 6, 5) and enc["pred_boxes"].shape == (2, 6, 4)
    boxes = enc["pred_boxes"].view(2, 2, 3, 4)
    torch.testing.assert_close(boxes[0, 1, 2], torch.tensor([2.5 / 3, 1.5 / 2, 2 / 3, 1.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes[1, 0, 1], torch.tensor([1.5 / 2, 0.5 / 2, 1.0, 1.0]), atol=1e-3, rtol=0)
    padded = enc["pred_logits"].view(2, 2, 3, 5)[1, :, 2]
    assert (padded <= -1e4).all() and (enc["pred_logits"].view(2, 2, 3, 5)[0] > -100).all()


def test_each_target_gets_k_cells_and_the_head_is_training_only():
    model = dense_model().train()
    criterion = SetCriterion.from_config(model.config)
    images, mask = pad_images([torch.randn(3, 96, 96)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}]
    out = model(images, mask)
    losses = criterion(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    assert loss_weights(model.config)["loss_bbox_enc"] == model.config.bbox_loss_coef
    repeated = [{"labels": targets[0]["labels"].repeat(K), "boxes": targets[0]["boxes"].repeat(K, 1)}]
    (cells, columns), = criterion.matcher(out["enc_outputs"], repeated)
    assert len(set(cells.tolist())) == 2 * K and sorted((columns % 2).tolist()) == [0] * K + [1] * K
    criterion.total(losses).backward()
    assert model.encoder_bbox_embed.layers[-1].weight.grad.abs().sum() > 0
    assert "enc_outputs" not in model.eval()(images, mask)
    assert not any(k.startswith("encoder_") for k in official_state_dict(model))


def test_the_dense_head_needs_the_focal_loss():
    with pytest.raises(ValueError, match="focal_loss"):
        DETRConfig(encoder_aux_matches=2)
