"""Group DETR: extra query groups, each matched one-to-one on its own, only in training."""
import torch

from detr import SetCriterion, build_model, loss_weights, official_state_dict, pad_images
from detr.model import group_attention_mask

GROUPS = 3


def grouped_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, query_groups=GROUPS, dropout=0.0)


def test_groups_are_blind_to_each_other():
    mask = group_attention_mask(3, 2, torch.device("cpu"))
    expected = ~torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 3)
    assert torch.equal(mask, expected)
    model = grouped_model().train()
    images, mask = pad_images([torch.randn(3, 64, 64)])
    with torch.no_grad():
        before = model(images, mask)
        model.extra_query_embed.weight.add_(1.0)  # changes the extra groups' queries only
        after = model(images, mask)
    torch.testing.assert_close(after["pred_boxes"], before["pred_boxes"])
    assert not torch.allclose(after["group_outputs"][0]["pred_boxes"], before["group_outputs"][0]["pred_boxes"])


def test_inference_uses_only_the_first_group():
    model = grouped_model()
    images, mask = pad_images([torch.randn(3, 64, 80), torch.randn(3, 72, 64)])
    with torch.no_grad():
        train_out = model.train()(images, mask)
        eval_out = model.eval()(images, mask)
    assert len(train_out["group_outputs"]) == GROUPS - 1
    assert train_out["pred_logits"].shape[1] == model.config.num_queries
    assert "group_outputs" not in eval_out
    single = build_model("tiny", num_classes=4, dropout=0.0).eval()
    official = official_state_dict(model)
    assert not any(k.startswith("extra_query_embed") for k in official)
    single.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("extra_query_embed")})
    with torch.no_grad():
        torch.testing.assert_close(single(images, mask)["pred_logits"], eval_out["pred_logits"])
        # In training the first group computes exactly what the model computes alone.
        torch.testing.assert_close(single.train()(images, mask)["pred_boxes"], train_out["pred_boxes"])


def test_each_group_gets_its_own_one_to_one_assignment():
    model = grouped_model().train()
    criterion = SetCriterion.from_config(model.config)
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 80, 72)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with torch.no_grad():
        outputs = model(images, mask)
    losses = criterion(outputs, targets)
    for g, group in enumerate(outputs["group_outputs"], start=1):
        alone = criterion(group, targets)  # the group's set on its own: its own Hungarian matching
        for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_giou_0"):
            torch.testing.assert_close(losses[f"{name}_g{g}"], alone[name])
        indices = criterion.matcher(group, targets)
        assert [len(rows) for rows, _ in indices] == [2, 1]  # one prediction per target within the group
    weights = loss_weights(model.config)
    assert weights["loss_bbox_g2"] == weights["loss_bbox"] and weights["loss_ce_0_g1"] == weights["loss_ce_0"]
    assert set(weights) <= set(losses)
    assert not any(k.startswith(("class_error_g", "cardinality_error_g")) for k in losses)
