"""The dense one-to-many encoder head: training-only, cell-relative boxes, k cells per target."""
import pytest
import torch

from detr import (DenseHead, DETRConfig, FocalLoss, SetCriterion, TwoStage, build_model, loss_weights,
                  official_state_dict, pad_images)

K = 2


def dense_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, focal=FocalLoss(), dense_head=DenseHead(K), dropout=0.0)


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
    assert model.dense_head.bbox_embed.layers[-1].weight.grad.abs().sum() > 0
    assert "enc_outputs" not in model.eval()(images, mask)
    assert not any(k.startswith("dense_head.") for k in official_state_dict(model))


def test_the_dense_head_needs_the_focal_loss_and_an_encoder():
    with pytest.raises(ValueError, match="dense_head needs focal"):
        DETRConfig(dense_head=DenseHead(2))
    with pytest.raises(ValueError, match="dense_head needs an encoder"):
        DETRConfig(focal=FocalLoss(), dense_head=DenseHead(2), enc_layers=0)
    with pytest.raises(ValueError, match="dense_head.matches must be >= 1"):
        DETRConfig(focal=FocalLoss(), dense_head=DenseHead(0))


def two_stage_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, focal=FocalLoss(), dense_head=DenseHead(K), two_stage=TwoStage(),
                       num_queries=4, dropout=0.0)


def test_two_stage_queries_are_the_best_cells_and_start_at_their_boxes():
    model = two_stage_model().eval()
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 64, 64)])  # 3x4 and 2x2 cells
    with torch.no_grad():
        out = model(images, mask)
        features, masks = model.backbone(images, mask)
        src, src_mask = model.input_proj(features[-1]), masks[-1]
        memory = model.transformer.encode(src, src_mask, model.position_encoding(src_mask))
        enc = model.dense_head(memory, src_mask)
    scores = enc["pred_logits"][..., :-1].max(-1).values
    for i in range(2):
        best = scores[i].topk(4).indices
        # The decoder's box head starts at zero: each query's box is its proposal's.
        torch.testing.assert_close(out["pred_boxes"][i], enc["pred_boxes"][i, best], atol=1e-3, rtol=0)
    valid_cells = enc["pred_boxes"][1].view(3, 4, 4)[:2, :2]  # the small image's own 2x2 cells
    assert set(map(tuple, out["pred_boxes"][1].round(decimals=3).tolist())) == set(
        map(tuple, valid_cells.reshape(-1, 4).round(decimals=3).tolist()))
    with pytest.raises(ValueError, match="official layout"):
        official_state_dict(model)


def test_two_stage_trains_end_to_end():
    model = two_stage_model().train()
    criterion = SetCriterion.from_config(model.config)
    images, mask = pad_images([torch.randn(3, 96, 96)])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])}]
    losses = criterion(model(images, mask), targets)
    criterion.total(losses).backward()
    assert model.proposals.query_pos.layers[0].weight.grad.abs().sum() > 0
    assert model.dense_head.class_embed.weight.grad.abs().sum() > 0
    # DDP waits for a gradient of every trainable parameter: none may be left out.
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not model.query_embed.weight.requires_grad
    with pytest.raises(ValueError, match="it needs dense_head"):
        DETRConfig(focal=FocalLoss(), two_stage=TwoStage())


def test_proposal_nms_selects_distinct_cells_first_and_fills_with_suppressed_ones():
    from torchvision.ops import box_convert, box_iou

    from detr.proposals import select_proposals

    # Cells: A (best), A' (IoU 0.82 with A), B (apart), padding (its box would survive NMS), C (inside A).
    boxes = torch.tensor([[[0.30, 0.30, 0.20, 0.20], [0.31, 0.31, 0.20, 0.20], [0.70, 0.70, 0.20, 0.20],
                           [0.90, 0.10, 0.10, 0.10], [0.30, 0.30, 0.05, 0.05]]])
    scores = torch.tensor([[3.0, 2.0, 1.0, -1e4, 0.5]])
    valid = torch.tensor([[True, True, True, False, True]])
    assert select_proposals(scores, boxes, valid, 3).tolist() == [[0, 1, 2]]
    # A' is suppressed; C survives (IoU with A 1/16); A' fills the last query, before padding.
    assert select_proposals(scores, boxes, valid, 4, nms_iou=0.5).tolist() == [[0, 2, 4, 1]]
    assert select_proposals(scores, boxes, valid, 5, nms_iou=0.5).tolist() == [[0, 2, 4, 1, 3]]
    # Per class: A' (another class than A) survives; C (A's class, but apart) too.
    classes = torch.tensor([[1, 2, 1, 0, 1]])
    assert select_proposals(scores, boxes, valid, 4, nms_iou=0.5, classes=classes).tolist() == [[0, 1, 2, 4]]
    classes = torch.tensor([[1, 1, 2, 0, 2]])
    assert select_proposals(scores, boxes, valid, 4, nms_iou=0.5, classes=classes).tolist() == [[0, 2, 4, 1]]

    # In a model: 4x4 cells whose boxes start two cells wide, so side neighbours overlap by IoU 1/3
    # and diagonal ones by 1/7. With proposal NMS at 0.3 no two queries start on side neighbours.
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, focal=FocalLoss(), dense_head=DenseHead(K), two_stage=TwoStage(nms=0.3),
                        num_queries=4, dropout=0.0).eval()
    images, mask = pad_images([torch.randn(3, 128, 128), torch.randn(3, 128, 128)])
    with torch.no_grad():
        boxes = model(images, mask)["pred_boxes"]  # the decoder's box head starts at its proposals
    for image_boxes in boxes:
        xyxy = box_convert(image_boxes, "cxcywh", "xyxy")
        assert (box_iou(xyxy, xyxy).triu(1) <= 0.3 + 1e-4).all()
    with pytest.raises(ValueError, match=r"two_stage.nms is an IoU threshold in \[0, 1\)"):
        DETRConfig(focal=FocalLoss(), dense_head=DenseHead(K), two_stage=TwoStage(nms=1.0))
    with pytest.raises(ValueError, match="it needs nms > 0"):
        DETRConfig(focal=FocalLoss(), dense_head=DenseHead(K), two_stage=TwoStage(nms_per_class=True))


def test_official_weights_load_into_a_two_stage_model_whose_new_heads_start_fresh(tmp_path):
    from detr import from_official

    torch.manual_seed(0)
    plain = build_model("tiny", num_classes=4, dropout=0.0)
    path = tmp_path / "official.pth"
    torch.save({"model": official_state_dict(plain)}, path)
    model = from_official(path, focal=FocalLoss(), dense_head=DenseHead(K), two_stage=TwoStage())
    assert model.config.two_stage == TwoStage() and model.config.hidden_dim == plain.config.hidden_dim
    torch.testing.assert_close(model.transformer.state_dict(), plain.transformer.state_dict())
    torch.testing.assert_close(model.backbone.state_dict(), plain.backbone.state_dict())


def test_proposal_content_starts_each_query_with_its_cells_encoder_feature():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, focal=FocalLoss(), dense_head=DenseHead(K),
                        two_stage=TwoStage(content=True), num_queries=4, dropout=0.0).train()
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 64, 64)])
    seen = {}

    def capture(module, args, kwargs):
        seen["tgt"] = args[0] if args else kwargs["tgt"]

    hook = model.transformer.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    out = model(images, mask)
    hook.remove()
    with torch.no_grad():
        features, masks = model.backbone(images, mask)
        src, src_mask = model.input_proj(features[-1]), masks[-1]
        memory = model.transformer.encode(src, src_mask, model.position_encoding(src_mask))
        scores = model.dense_head(memory, src_mask)["pred_logits"][..., :-1].max(-1).values
    tokens = memory.flatten(2).transpose(1, 2)
    for i in range(2):
        best = scores[i].topk(4).indices  # no proposal NMS: the best cells, best first
        torch.testing.assert_close(seen["tgt"][i], tokens[i, best], atol=1e-5, rtol=0)
    assert not seen["tgt"].requires_grad  # detached: the queries do not train the encoder through it
    criterion = SetCriterion.from_config(model.config)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    criterion.total(criterion(out, targets)).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
