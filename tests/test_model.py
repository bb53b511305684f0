"""The DETR module: forward contract, padding invariance, backbone options, learning on a fixed batch."""
import pytest
import torch

from detr import DETRConfig, PostProcess, SetCriterion, build_model, pad_images


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=5).eval()


def test_forward_contract(tiny):
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 80, 64)])
    with torch.no_grad():
        out = tiny(images, mask)
    cfg = tiny.config
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert all(a["pred_logits"].shape == out["pred_logits"].shape for a in out["aux_outputs"])
    no_aux = build_model("tiny", num_classes=5, aux_loss=False).eval()
    with torch.no_grad():
        assert "aux_outputs" not in no_aux(images, mask)


def test_forward_rejects_mismatched_inputs(tiny):
    with pytest.raises(ValueError, match="pad_images"):
        tiny(torch.randn(2, 3, 64, 64), torch.zeros(2, 32, 32, dtype=torch.bool))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"backbone": "resnet50", "dilation": True, "hidden_dim": 32, "nheads": 2},
     {"backbone": "resnet34", "position_embedding": "learned", "pre_norm": True}],
    ids=["r18", "r50-dc5", "r34-learned-prenorm"],
)
def test_an_image_padded_in_a_batch_gets_the_detections_it_gets_alone(overrides):
    torch.manual_seed(1)
    model = build_model("tiny", num_classes=5, **overrides).eval()
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    post = PostProcess()
    with torch.no_grad():
        alone = post(model(*pad_images([small])), [[70, 90]])[0]
        batched = post(model(*pad_images([large, small])), [[128, 100], [70, 90]])[1]
    for key in ("scores", "boxes"):
        torch.testing.assert_close(batched[key], alone[key], atol=1e-4, rtol=0)
    assert torch.equal(batched["labels"], alone["labels"])


def test_official_padding_mode_leaks_padding_into_features():
    """padding_invariant=False reproduces the official model, whose outputs depend on the batch."""
    torch.manual_seed(1)
    model = build_model("tiny", num_classes=5, padding_invariant=False).eval()
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    with torch.no_grad():
        alone = model(*pad_images([small]))["pred_logits"][0]
        batched = model(*pad_images([large, small]))["pred_logits"][1]
    assert (alone - batched).abs().max() > 1e-3


def test_backbone_freezing_follows_the_paper():
    model = build_model("tiny", num_classes=5)
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[1] for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}
    assert not any(p.requires_grad for p in build_model("tiny", num_classes=5, train_backbone=False).backbone.parameters())
    # Batch-norm statistics are buffers, never trained.
    assert not any("bn" in n for n, _ in model.backbone.named_parameters())


def test_dc5_halves_the_backbone_stride():
    images, mask = pad_images([torch.randn(3, 128, 96)])
    plain = build_model("tiny", num_classes=5, backbone="resnet50").backbone
    dc5 = build_model("tiny", num_classes=5, backbone="resnet50", dilation=True).backbone
    with torch.no_grad():
        (f_plain,), (m_plain,) = plain(images, mask)
        (f_dc5,), (m_dc5,) = dc5(images, mask)
    assert f_plain.shape[-2:] == (4, 3) and f_dc5.shape[-2:] == (8, 6)
    assert m_plain.shape == (1, 4, 3) and m_dc5.shape == (1, 8, 6)


def test_learned_positions_refuse_feature_maps_beyond_their_table():
    model = build_model("tiny", num_classes=5, position_embedding="learned").eval()
    with pytest.raises(ValueError, match="sine"):
        model(*pad_images([torch.randn(3, 32 * 51, 64)]))


def test_loading_torchvision_backbone_weights(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    model = build_model("tiny", num_classes=5, backbone_weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, resnet.bn1.running_var)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="r34.pth"):
        build_model("tiny", num_classes=5, backbone_weights=str(tmp_path / "r34.pth"))


def test_a_few_optimisation_steps_lower_the_loss():
    """The paper's optimiser settings reduce the loss of `tiny` on one fixed batch."""
    torch.manual_seed(0)
    config = DETRConfig.preset("tiny", num_classes=4, dropout=0.0)  # no dropout noise: a clean signal
    model = build_model(config).train()
    criterion = SetCriterion.from_config(config)
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 64, 80)])
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    params = [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad], "lr": 1e-5},
    ]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    totals = []
    for _ in range(15):
        total = criterion.total(criterion(model(images, mask), targets))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        totals.append(total.item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < 0.8 * totals[0], totals
    assert sum(totals[-3:]) < sum(totals[:3])
