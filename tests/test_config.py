"""DETRConfig: the paper's defaults, presets, validation and serialisation."""
import pytest

from detr import PRESETS, DETRConfig


def test_defaults_are_the_papers():
    c = DETRConfig()
    assert (c.backbone, c.dilation, c.position_embedding) == ("resnet50", False, "sine")
    assert (c.hidden_dim, c.nheads, c.enc_layers, c.dec_layers, c.dim_feedforward) == (256, 8, 6, 6, 2048)
    assert (c.dropout, c.pre_norm, c.num_queries, c.aux_loss) == (0.1, False, 100, True)
    assert (c.set_cost_class, c.set_cost_bbox, c.set_cost_giou) == (1, 5, 2)
    assert (c.ce_loss_coef, c.bbox_loss_coef, c.giou_loss_coef, c.eos_coef) == (1, 5, 2, 0.1)
    assert c.num_classes == 91  # COCO: largest category id (90) + 1


def test_presets():
    assert PRESETS["detr_r50"] == DETRConfig()
    assert PRESETS["detr_r50_dc5"] == DETRConfig(dilation=True)
    assert PRESETS["detr_r101"].backbone == "resnet101" and not PRESETS["detr_r101"].dilation
    assert PRESETS["detr_r101_dc5"].backbone == "resnet101" and PRESETS["detr_r101_dc5"].dilation
    tiny = DETRConfig.preset("tiny", num_classes=4)
    assert tiny.backbone == "resnet18" and tiny.hidden_dim <= 64 and tiny.num_classes == 4
    with pytest.raises(ValueError, match="unknown preset"):
        DETRConfig.preset("detr_r200")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"backbone": "resnet18", "dilation": True}, "dilation"),
        ({"hidden_dim": 250, "nheads": 8}, "divisible"),
        ({"num_classes": 0}, "largest category id"),
        ({"position_embedding": "rope"}, "position_embedding"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"set_cost_class": 0, "set_cost_bbox": 0, "set_cost_giou": 0}, "costs"),
    ],
)
def test_invalid_configs_are_rejected_with_a_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        DETRConfig(**fields)


def test_dict_round_trip_and_unknown_keys():
    c = DETRConfig.preset("tiny", pre_norm=True, num_classes=7)
    assert DETRConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="hiden_dim"):
        DETRConfig.from_dict({**c.to_dict(), "hiden_dim": 3})


def test_a_checkpoint_naming_a_removed_option_loads_only_with_it_off():
    saved = {**DETRConfig.preset("tiny").to_dict(), "query_groups": 1, "set_cost_mask": 0.0,
             "denoising_label_noise": 0.3}  # what a checkpoint from before the removal holds
    assert DETRConfig.from_dict(saved) == DETRConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"box_refine=True was removed .* cannot be built"):
        DETRConfig.from_dict({**saved, "box_refine": True})


def test_parts_are_nested_configs_none_is_off_and_round_trip():
    from detr import DenseHead, FocalLoss, MaskHead, TwoStage

    c = DETRConfig.preset("tiny_panoptic", focal={}, dense_head={"matches": 3}, two_stage=TwoStage(nms=0.5))
    assert c.focal == FocalLoss() and c.dense_head == DenseHead(3) and c.mask_head == MaskHead()
    assert DETRConfig.from_dict(c.to_dict()) == c and c.to_dict()["two_stage"] == {"nms": 0.5, "nms_per_class": False,
                                                                                    "content": False}
    assert c.replace(mask_head=None).masks is False
    with pytest.raises(ValueError, match=r"unknown two_stage field\(s\) \['nsm'\]"):
        DETRConfig.preset("tiny", two_stage={"nsm": 0.5})
    with pytest.raises(ValueError, match="mask_head must be a MaskHead, a mapping or None"):
        DETRConfig(mask_head=True)


def test_the_flat_layout_of_older_checkpoints_is_read_into_parts():
    from detr import DenseHead, FocalLoss, MaskHead, SemanticHead, TwoStage

    flat = {**{k: v for k, v in DETRConfig.preset("tiny_panoptic").to_dict().items()
               if k not in ("focal", "dense_head", "two_stage", "mask_head", "semantic_head")},
            "focal_loss": True, "focal_alpha": 0.3, "focal_gamma": 2.0, "encoder_aux_matches": 2,
            "encoder_mask_assignment": True, "two_stage": True, "proposal_nms": 0.5, "proposal_nms_per_class": True,
            "proposal_content": False, "masks": True, "freeze_detector": False, "scaled_mask_attention": True,
            "mask_loss_coef": 1.0, "dice_loss_coef": 1.0, "semantic_loss_coef": 2.0, "query_groups": 1}
    c = DETRConfig.from_dict(flat)
    assert c.focal == FocalLoss(alpha=0.3) and c.dense_head == DenseHead(2, mask_assignment=True)
    assert c.two_stage == TwoStage(nms=0.5, nms_per_class=True)
    assert c.mask_head == MaskHead(freeze_detector=False, scaled_attention=True)
    assert c.semantic_head == SemanticHead(2.0)
    off = DETRConfig.from_dict({**flat, "focal_loss": False, "encoder_aux_matches": 0, "two_stage": False,
                                "masks": False, "semantic_loss_coef": 0.0})
    assert (off.focal, off.dense_head, off.two_stage, off.mask_head, off.semantic_head) == (None,) * 5
