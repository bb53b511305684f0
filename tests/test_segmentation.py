"""The mask head: forward contract, query selection, padding invariance, losses, checkpoints, layouts."""
from pathlib import Path

import pytest
import torch

from detr import (DETRConfig, InstanceMaskPostProcess, MaskHead, PanopticPostProcess, SetCriterion, build_model,
                  from_official, load_checkpoint, official_state_dict, pad_images, save_checkpoint)
from detr.segmentation import UNCOMPUTED_MASK_LOGIT, masks_to_image

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
SMALL = dict(backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=128,
             num_queries=6, num_classes=5)


def small_model(head: MaskHead = MaskHead(), **overrides):
    torch.manual_seed(0)
    return build_model(DETRConfig(**{**SMALL, **overrides}, mask_head=head)).eval()


def random_targets(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for h, w in sizes:
        n = 2
        masks = torch.zeros((n, h, w), dtype=torch.bool)
        boxes = []
        for i in range(n):
            y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            y1, x1 = y0 + h // 3, x0 + w // 3
            masks[i, y0:y1, x0:x1] = True
            boxes.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        targets.append({"labels": torch.tensor([1, 2]), "boxes": torch.tensor(boxes), "masks": masks})
    return targets


def test_masks_are_off_by_default_and_detection_models_are_unchanged():
    config = DETRConfig.preset("tiny", num_classes=5)
    assert not config.masks
    keys = build_model(config).state_dict().keys()
    assert not any(k.startswith(("bbox_attention.", "mask_head.")) for k in keys)
    with pytest.raises(ValueError, match="masks need hidden_dim a multiple of 128"):
        DETRConfig.preset("tiny", mask_head=MaskHead())
    assert DETRConfig.preset("detr_r50").fpn_dims == (1024, 512, 256)
    assert DETRConfig.preset("tiny").fpn_dims == (256, 128, 64)
    assert DETRConfig.preset("tiny", backbone_stages=2).fpn_dims == (128, 128, 64)  # stride 8, 8, 4


def test_forward_contract_and_query_selection():
    model = small_model()
    images, mask = pad_images([torch.randn(3, 64, 80), torch.randn(3, 72, 64)])
    with torch.no_grad():
        full = model(images, mask)
        selected = torch.zeros(2, 6, dtype=torch.bool)
        selected[0, [1, 4]] = True
        selected[1, 5] = True
        some = model(images, mask, mask_queries=selected)
        by_callable = model(images, mask, mask_queries=lambda out: out["pred_logits"].new_zeros((2, 6)).bool())
    assert full["pred_masks"].shape == (2, 6, 72 // 4, 80 // 4)
    assert torch.equal(some["mask_queries"], selected)
    torch.testing.assert_close(some["pred_masks"][selected], full["pred_masks"][selected], atol=1e-6, rtol=0)
    assert (some["pred_masks"][~selected] == UNCOMPUTED_MASK_LOGIT).all()
    assert (by_callable["pred_masks"] == UNCOMPUTED_MASK_LOGIT).all()
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(some[key], full[key])


@pytest.mark.parametrize("stages", [4, 3, 2])  # 3, 2: the transformer itself at stride 16, 8 (fast recipe)
def test_an_image_padded_in_a_batch_gets_the_masks_it_gets_alone(stages):
    model = small_model(backbone_stages=stages)
    with torch.no_grad():
        # At random initialisation the queries' masks differ by ~1e-5 (their attention maps are tiny next
        # to the shared features), so the panoptic winner would be rounding noise: make queries matter.
        model.mask_head.lay1.weight[:, SMALL["hidden_dim"]:] *= 1000
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    with torch.no_grad():
        alone = model(*pad_images([small]))
        batched = model(*pad_images([large, small]))
    cells = alone["pred_masks"].shape[-2:]
    assert cells == (18, 23)
    torch.testing.assert_close(batched["pred_masks"][1, :, :18, :23], alone["pred_masks"][0], atol=1e-4, rtol=0)
    post = PanopticPostProcess({i: i % 2 == 0 for i in range(6)}, threshold=0.0, crop_padding=True)
    one = post(alone, [(70, 90)], [(140, 180)])[0]
    two = post(batched, [(128, 100), (70, 90)], [(128, 100), (140, 180)])[1]
    # The masks agree to 1e-4 (above); at random initialisation the queries' masks cross almost tied, so
    # at the stride-8 transformer's finer grid that float noise can flip a few boundary pixels (8 of 25,200).
    flipped = (one["id_map"] != two["id_map"]).float().mean()
    assert flipped == 0 if stages > 2 else flipped < 1e-3
    assert [s["category_id"] for s in one["segments_info"]] == [s["category_id"] for s in two["segments_info"]]
    inst = InstanceMaskPostProcess(crop_padding=True)
    assert torch.equal(inst(alone, [(70, 90)])[0]["masks"], inst(batched, [(128, 100), (70, 90)])[1]["masks"])


def test_official_padding_mode_is_not_padding_invariant():
    model = small_model(padding_invariant=False)
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    with torch.no_grad():
        alone = model(*pad_images([small]))["pred_masks"][0]
        batched = model(*pad_images([large, small]))["pred_masks"][1, :, :18, :23]
    assert (alone - batched).abs().max() > 1e-3


def test_mask_losses_are_padding_invariant_and_need_only_matched_masks():
    model = small_model(MaskHead(freeze_detector=False))
    criterion = SetCriterion.from_config(model.config)
    assert {"loss_mask", "loss_dice"} <= set(criterion.weight_dict)
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    t_small, t_large = random_targets([(70, 90), (128, 100)])
    with torch.no_grad():
        alone = criterion(model(*pad_images([small])), [t_small])
        batched_out = model(*pad_images([small, large]))
        batched = criterion(batched_out, [t_small, t_large])
        large_alone = criterion(model(*pad_images([large])), [t_large])
        images, mask = pad_images([small, large])
        selected = model(images, mask, mask_queries=criterion.mask_query_selection([t_small, t_large]))
        sparse = criterion(selected, [t_small, t_large])
    # Both losses are sums over matched masks divided by the number of boxes (2 per image).
    for name in ("loss_mask", "loss_dice"):
        combined = (alone[name] * 2 + large_alone[name] * 2) / 4
        assert batched[name].item() == pytest.approx(combined.item(), rel=1e-4)
        assert sparse[name].item() == pytest.approx(batched[name].item(), rel=1e-5)
    assert selected["mask_queries"].sum() == 4


def test_freezing_the_detector_trains_only_the_mask_head():
    model = small_model().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bbox_attention.", "mask_head.")) for n in trainable)
    joint = small_model(MaskHead(freeze_detector=False))
    assert any(n.startswith("detr.transformer.") and p.requires_grad for n, p in joint.named_parameters())
    criterion = SetCriterion.from_config(model.config)
    images, mask = pad_images([torch.randn(3, 64, 64)])
    targets = random_targets([(64, 64)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = criterion(model(images, mask, mask_queries=criterion.mask_query_selection(targets)), targets)
    criterion.total(losses).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_mask_geometry_crops_the_image_cells():
    logits = torch.zeros(1, 5, 6)
    logits[0, :3, :4] = 1.0  # the 10x13 image owns 3x4 cells; the rest is padding
    logits[0, 3:, :] = -50.0
    out = masks_to_image(logits, (10, 13))
    assert out.shape == (1, 10, 13) and torch.equal(out, torch.ones(1, 10, 13))


def test_our_checkpoint_round_trips_with_masks(tmp_path):
    model = small_model(padding_invariant=False)
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert loaded.config == model.config and loaded.config.masks
    images, mask = pad_images([torch.randn(3, 64, 64)])
    with torch.no_grad():
        assert torch.equal(loaded(images, mask)["pred_masks"], model(images, mask)["pred_masks"])
    again = from_official({"model": official_state_dict(model)}, padding_invariant=False)
    assert again.config.nheads == 8 and again.config.masks  # the head count comes from the mask head
    with torch.no_grad():
        torch.testing.assert_close(again(images, mask)["pred_masks"], model(images, mask)["pred_masks"])


def test_official_panoptic_export_has_the_release_layout():
    rows = [line.split("\t") for line in (REFERENCE / "detr_r50_panoptic_keys.tsv").read_text().splitlines() if line]
    expected = {key: [int(x) for x in shape.strip("[]").split(",") if x.strip()] for key, shape, _ in rows}
    state = official_state_dict(build_model("detr_r50", mask_head=MaskHead(), num_classes=250))  # COCO panoptic ids
    assert {k: list(v.shape) for k, v in state.items()} == expected


def test_detection_checkpoint_starts_a_fresh_mask_head():
    detector = build_model("tiny_panoptic", num_classes=4, mask_head=None)
    model = from_official({"model": official_state_dict(detector)}, mask_head=MaskHead())
    assert model.config.masks and model.config.mask_head.freeze_detector
    torch.testing.assert_close(model.detr.query_embed.weight, detector.query_embed.weight)


def test_detection_inference_of_a_mask_model_skips_the_mask_head():
    """Box evaluation and detection labelling of a panoptic model pay nothing for masks, same detections."""
    import numpy as np

    from detr import boxes_only
    from pipelines.inference.detector import Detector
    from pipelines.training.transforms import TransformsConfig

    model = small_model()
    calls = []
    model.mask_head.register_forward_hook(lambda *args: calls.append(1))
    model.bbox_attention.register_forward_hook(lambda *args: calls.append(1))
    images, mask = pad_images([torch.randn(3, 64, 80), torch.randn(3, 72, 64)])
    with torch.no_grad():
        full = model(images, mask)
        assert len(calls) == 2
        light = model(images, mask, mask_queries=boxes_only)
    assert len(calls) == 2 and (light["pred_masks"] == UNCOMPUTED_MASK_LOGIT).all()
    assert torch.equal(light["pred_logits"], full["pred_logits"]) and torch.equal(light["pred_boxes"], full["pred_boxes"])
    detector = Detector(model, TransformsConfig.small(), device=torch.device("cpu"))
    detections = detector.detect([np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)])
    assert len(calls) == 2 and detections[0]["boxes"].shape == (6, 4)


def test_scaled_mask_attention_averages_one_per_query_and_stays_padding_invariant():
    """`MaskHead.scaled_attention` multiplies the official maps by the (head, unpadded position) count: the same
    maps, averaging 1 over each image instead of 1/cells, alone or padded in a batch; no new weights."""
    official, scaled = small_model(), small_model(MaskHead(scaled_attention=True))
    assert official.state_dict().keys() == scaled.state_dict().keys()
    scaled.load_state_dict(official.state_dict())
    torch.manual_seed(3)
    q, memory = torch.randn(2, 6, 128), torch.randn(2, 128, 5, 7)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True  # the second image owns 3x4 of the 5x7 cells
    with torch.no_grad():
        plain = official.bbox_attention(q, memory, mask)
        maps = scaled.bbox_attention(q, memory, mask)
    counts = torch.tensor([8 * 35, 8 * 12], dtype=torch.float32)
    torch.testing.assert_close(maps, plain * counts.view(2, 1, 1, 1, 1))
    torch.testing.assert_close(maps.sum((2, 3, 4)) / counts[:, None], torch.ones(2, 6))
    assert (maps[1][:, :, 3:, :] == 0).all() and (maps[1][:, :, :, 4:] == 0).all()
    small, large = torch.randn(3, 70, 90), torch.randn(3, 128, 100)
    with torch.no_grad():
        alone = scaled(*pad_images([small]))
        batched = scaled(*pad_images([large, small]))
    torch.testing.assert_close(batched["pred_masks"][1, :, :18, :23], alone["pred_masks"][0], atol=1e-4, rtol=0)
    # Scaled maps make the queries' masks differ from the start (the official ones differ by ~1e-5).
    spread = alone["pred_masks"][0].std(0).mean().item()
    official_spread = official(*pad_images([small]))["pred_masks"][0].std(0).mean().item()
    assert spread > 10 * official_spread  # measured: 75x
