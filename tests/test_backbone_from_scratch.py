"""Backbone options for training from scratch: trainable batch norm, a trained stem, a 3-stage backbone."""
import pytest
import torch

from detr import build_model, pad_images
from detr.backbone import Backbone, TrainableBatchNorm2d


def test_trainable_batch_norm_is_the_frozen_layer_in_eval_mode():
    """Same state-dict keys, and after training its eval outputs are the frozen model's with those weights."""
    torch.manual_seed(0)
    trained = build_model("tiny", num_classes=3, backbone_norm="batch", train_backbone_stem=True).train()
    with torch.no_grad():
        trained(*pad_images([torch.randn(3, 64, 80), torch.randn(3, 72, 64)]))  # updates running statistics
        for module in trained.modules():
            if isinstance(module, TrainableBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    frozen = build_model("tiny", num_classes=3)
    assert set(frozen.state_dict()) == set(trained.state_dict())
    frozen.load_state_dict(trained.state_dict())
    images, mask = pad_images([torch.randn(3, 96, 64), torch.randn(3, 64, 64)])
    with torch.no_grad():
        ours, theirs = trained.eval()(images, mask), frozen.eval()(images, mask)
    torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-5, rtol=0)


def test_batch_statistics_leave_out_the_padding():
    """An image padded into a larger canvas trains the norms exactly as it does alone."""
    torch.manual_seed(0)
    alone = Backbone("resnet18", norm="batch", train_stem=True).train()
    padded = Backbone("resnet18", norm="batch", train_stem=True).train()
    padded.load_state_dict(alone.state_dict())
    image = torch.randn(1, 3, 64, 96)
    canvas, mask = pad_images([image[0], torch.zeros(3, 128, 128)])
    (f_alone,), _ = alone(image, torch.zeros(1, 64, 96, dtype=torch.bool))
    (f_padded,), _ = padded(canvas[:1], mask[:1])
    torch.testing.assert_close(f_padded[..., : f_alone.shape[-2], : f_alone.shape[-1]], f_alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded.body.bn1.running_var, alone.body.bn1.running_var, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.body.layer3[1].bn2.running_mean, alone.body.layer3[1].bn2.running_mean,
                               atol=1e-5, rtol=0)


def test_batch_norm_learns_its_statistics_in_training():
    norm = TrainableBatchNorm2d(4, momentum=1.0).train()
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    out = norm(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(norm.running_var, x.var((0, 2, 3), unbiased=True))
    assert norm.weight.requires_grad and norm.bias.requires_grad


def test_train_backbone_stem_trains_the_stem_and_stage_1_too():
    model = build_model("tiny", num_classes=3, backbone_norm="batch", train_backbone_stem=True)
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}


@pytest.mark.parametrize("stages, channels, stride", [(3, 256, 16), (2, 128, 8)])
def test_fewer_stages_give_a_finer_stride_and_fewer_channels(stages, channels, stride):
    model = build_model("tiny", num_classes=3, backbone_stages=stages)
    assert not hasattr(model.backbone.body, "layer4") and hasattr(model.backbone.body, f"layer{stages}")
    assert model.input_proj.in_channels == channels == model.config.backbone_channels
    images, mask = pad_images([torch.randn(3, 128, 96)])
    with torch.no_grad():
        (features,), (feature_mask,) = model.backbone(images, mask)
    assert features.shape[-2:] == (128 // stride, 96 // stride) == feature_mask.shape[-2:]


@pytest.mark.parametrize(
    "fields, message",
    [({"backbone_norm": "group"}, "backbone_norm"),
     ({"backbone_norm": "batch", "train_backbone": False}, "train_backbone=True"),
     ({"backbone_stages": 1}, "backbone_stages"),
     ({"backbone": "resnet50", "dilation": True, "backbone_stages": 3}, "dilation")],
)
def test_invalid_backbone_options_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", num_classes=3, **fields)
