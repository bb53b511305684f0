"""Denoising queries (DN-DETR) and iterative box refinement on the two-stage decoder."""
import pytest
import torch
from torch import nn

from detr import DETRConfig, SetCriterion, build_model, loss_weights, pad_images
from detr.denoising import denoising_attention_mask, denoising_queries, noised_boxes

TARGETS = [
    {"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3], [0.2, 0.25, 0.1, 0.2]])},
    {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])},
]


def two_stage(**options):
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, focal_loss=True, encoder_aux_matches=2, two_stage=True,
                       num_queries=4, dropout=0.0, **options)


def test_each_group_holds_every_target_once_and_padding_is_flagged():
    torch.manual_seed(0)
    embed = nn.Embedding(4, 8)
    dn = denoising_queries(TARGETS, groups=3, label_embed=embed, label_noise=0.0, box_noise=0.0)
    assert dn.size == 6 and dn.content.shape == (2, 6, 8)
    assert dn.valid.tolist() == [[True, True] * 3, [True, False] * 3]
    assert dn.labels[0].tolist() == [2, 1] * 3 and dn.labels[1, ::2].tolist() == [0, 0, 0]
    torch.testing.assert_close(dn.boxes[0, 4:], TARGETS[0]["boxes"])
    torch.testing.assert_close(dn.reference[dn.valid], dn.boxes[dn.valid])  # no noise asked for
    torch.testing.assert_close(dn.content, embed(dn.labels))
    assert denoising_queries([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                             3, embed, 0.2, 0.4) is None


def test_noise_stays_within_its_scale_and_labels_flip_at_their_rate():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(20000, 1)
    noisy = noised_boxes(boxes, 0.4)
    shift = (noisy[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2)
    scale = (noisy[:, 2:] - boxes[:, 2:]).abs() / boxes[:, 2:]
    assert shift.max() <= 0.4 + 1e-6 and scale.max() <= 0.4 + 1e-6 and shift.mean() > 0.15
    many = [{"labels": torch.zeros(5000, dtype=torch.long), "boxes": boxes[:5000]}]
    embed = nn.Embedding(4, 8)
    dn = denoising_queries(many, 1, embed, label_noise=0.4, box_noise=0.0)
    # A flipped label is redrawn among all 4 classes, so 3/4 of flips change it: 0.4 * 0.75 = 0.3.
    changed = (dn.content != embed(dn.labels)).any(-1).float().mean()
    assert abs(float(changed) - 0.3) < 0.03


def test_attention_mask_hides_the_answers():
    blocked = denoising_attention_mask(num_queries=2, groups=2, group_size=2, device=torch.device("cpu"))
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(blocked, expected)


def test_denoising_queries_leave_the_model_queries_unchanged_and_train():
    model = two_stage(denoising_groups=3).train()
    images, mask = pad_images([torch.randn(3, 96, 96), torch.randn(3, 64, 80)])
    with torch.no_grad():
        plain = model(images, mask)
        torch.manual_seed(1)
        noised = model(images, mask, targets=TARGETS)
    assert "dn_outputs" not in plain
    torch.testing.assert_close(noised["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(noised["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=0)
    dn = noised["dn_outputs"]
    assert dn["pred_boxes"].shape == (2, 6, 4) and len(dn["aux_outputs"]) == model.config.dec_layers - 1

    criterion = SetCriterion.from_config(model.config)
    losses = criterion(model(images, mask, targets=TARGETS), TARGETS)
    last_aux = model.config.dec_layers - 2
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0", f"loss_giou_dn_{last_aux}"} <= set(losses)
    assert loss_weights(model.config)[f"loss_giou_dn_{last_aux}"] == model.config.giou_loss_coef
    criterion.total(losses).backward()
    assert model.denoising_label_embed.weight.grad.abs().sum() > 0
    assert "dn_outputs" not in model.eval()(images, mask, targets=TARGETS)


def test_every_trainable_parameter_gets_a_gradient_even_without_targets():
    """DDP waits for each trainable parameter's gradient: a worker whose batch has no boxes must not stall."""
    model = two_stage(denoising_groups=2, box_refine=True).train()
    images, mask = pad_images([torch.randn(3, 64, 64)])
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    criterion = SetCriterion.from_config(model.config)
    criterion.total(criterion(model(images, mask, targets=empty), empty)).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_denoising_losses_score_each_query_against_its_own_target():
    model = two_stage(denoising_groups=2)
    criterion = SetCriterion.from_config(model.config)
    valid = torch.tensor([[True, False, True, False]])
    truth = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 4])
    predicted = truth.clone()
    predicted[0, 2, 0] += 0.1  # group 1's copy is 0.1 off in x; the padding slots are ignored
    predicted[0, 1] = predicted[0, 3] = torch.tensor([0.9, 0.9, 0.05, 0.05])
    logits = torch.full((1, 4, 5), -5.0)
    dn = {"pred_logits": logits, "pred_boxes": predicted, "valid": valid, "labels": torch.zeros(1, 4, dtype=torch.long),
          "boxes": truth, "groups": 2}
    losses = criterion._denoising_losses(dn, {"num_boxes": 1.0, "ce_weight": 1.0})
    # One target, two groups: the normaliser is 2; the L1 error is 0.1 on one copy.
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.1 / 2, abs=1e-6)
    assert losses["loss_giou_dn"].item() > 0


def test_box_refinement_compounds_each_layers_offset():
    """With a box head that always moves a box by +0.5 in logit x, L refining layers move it L times."""
    plain, refining = two_stage(), two_stage(box_refine=True)
    for model in (plain, refining):
        model.eval()
        nn.init.constant_(model.bbox_embed.layers[-1].bias, 0.0)
        with torch.no_grad():
            model.bbox_embed.layers[-1].bias[0] = 0.5
    images, mask = pad_images([torch.randn(3, 96, 96)])
    with torch.no_grad():
        once, refined = plain(images, mask), refining(images, mask)
    layers = plain.config.dec_layers
    start = torch.logit(once["pred_boxes"][..., 0]) - 0.5
    torch.testing.assert_close(torch.logit(refined["pred_boxes"][..., 0]), start + 0.5 * layers, atol=1e-4, rtol=0)
    first = refined["aux_outputs"][0]["pred_boxes"][..., 0]
    torch.testing.assert_close(torch.logit(first), start + 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(refined["pred_boxes"][..., 1:], once["pred_boxes"][..., 1:])


def test_both_options_need_the_two_stage_decoder():
    with pytest.raises(ValueError, match="box_refine"):
        DETRConfig(box_refine=True)
    with pytest.raises(ValueError, match="denoising"):
        DETRConfig(denoising_groups=2)
    with pytest.raises(ValueError, match="denoising_label_noise"):
        DETRConfig(focal_loss=True, encoder_aux_matches=1, two_stage=True, denoising_groups=1,
                   denoising_label_noise=1.5)
