"""The semantic head: every encoder cell trains on the class of the segment under it, by hand and in a model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detr import DETRConfig, MaskHead, SemanticHead, SetCriterion, build_model, official_state_dict, pad_images
from detr.semantic_cells import cell_labels, semantic_cell_loss


def halves_and_square():
    """Image 0 (16x16, a 2x2 grid at stride 8): left half class 1, right half class 3, and a small
    square of class 2 over the top-right cell's centre (12, 4); image 1 (8x16): one segment, class 0."""
    left, right, square = (torch.zeros(16, 16, dtype=torch.bool) for _ in range(3))
    left[:, :8] = True
    right[:, 8:] = True
    square[2:7, 10:15] = True
    whole = torch.ones(1, 8, 16, dtype=torch.bool)
    return [{"labels": torch.tensor([1, 3, 2]), "masks": torch.stack([left, right, square])},
            {"labels": torch.tensor([0]), "masks": whole}]


def test_each_cell_takes_the_class_of_the_smallest_segment_over_its_centre():
    images, cells, labels = cell_labels(halves_and_square(), (2, 2), 8)
    got = sorted(zip(images.tolist(), cells.tolist(), labels.tolist()))
    # Image 0: cells 0, 2 left (1); cell 1 under the square (2) rather than the right half; cell 3 right (3).
    # Image 1 is one row high: its second row's centres (y = 12) lie outside its 8 pixels.
    assert got == [(0, 0, 1), (0, 1, 2), (0, 2, 1), (0, 3, 3), (1, 0, 0), (1, 1, 0)]


def test_loss_is_the_mean_cross_entropy_over_labelled_cells():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = semantic_cell_loss({"logits": logits, "grid": (2, 2), "stride": 8}, halves_and_square())
    rows = torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[0, 3], logits[1, 0], logits[1, 1]])
    expected = F.cross_entropy(rows, torch.tensor([1, 2, 1, 3, 0, 0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[1, 2:].abs().sum() == 0  # the unlabelled cells of image 1 get no gradient
    # Without masks it is zero, yet still part of the graph (DDP waits for every parameter's gradient).
    zero = semantic_cell_loss({"logits": logits, "grid": (2, 2), "stride": 8}, [{"labels": torch.tensor([1])}] * 2)
    assert zero.item() == 0.0 and zero.requires_grad


def test_model_trains_its_semantic_head_only_in_training_and_never_exports_it():
    with pytest.raises(ValueError, match="semantic_head.loss_coef must be > 0"):
        DETRConfig(semantic_head=SemanticHead(loss_coef=0.0))
    config = DETRConfig.preset("tiny_panoptic", num_classes=4, enc_layers=1, dec_layers=1, num_queries=5,
                               mask_head=MaskHead(freeze_detector=False), backbone_stages=2,
                               semantic_head=SemanticHead(2.0))
    torch.manual_seed(0)
    model = build_model(config).train()
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    top = torch.zeros(1, 64, 64, dtype=torch.bool)
    top[0, :32] = True
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.25, 1.0, 0.5]]), "masks": top},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
                "masks": torch.ones(1, 48, 64, dtype=torch.bool)}]
    criterion = SetCriterion.from_config(config)
    assert criterion.weight_dict["loss_semantic"] == 2.0
    out = model(images, mask, mask_queries=criterion.mask_query_selection(targets))
    semantic = out["semantic_outputs"]
    assert semantic["logits"].shape == (2, 64, 4) and semantic["grid"] == (8, 8) and semantic["stride"] == 8
    losses = criterion(out, targets)
    # A fresh linear head over 4 classes starts near the uniform cross-entropy, ln 4.
    assert losses["loss_semantic"].item() == pytest.approx(math.log(4), rel=0.5)
    criterion.total(losses).backward()
    assert model.detr.semantic_head.classifier.weight.grad.abs().sum() > 0
    assert model.detr.backbone.body.layer2[0].conv1.weight.grad.abs().sum() > 0  # it reaches the backbone
    assert "semantic_outputs" not in model.eval()(images, mask)
    assert not any("semantic_head." in k for k in official_state_dict(model))


def _half_batch_worker(rank, world, init_file, out_dir):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        logits = torch.randn(2, 4, 5)
        loss = semantic_cell_loss({"logits": logits[rank:rank + 1], "grid": (2, 2), "stride": 8},
                                  halves_and_square()[rank:rank + 1])
        torch.save(loss, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_workers_normalise_by_the_whole_batch_of_cells(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    whole = semantic_cell_loss({"logits": logits, "grid": (2, 2), "stride": 8}, halves_and_square())
    mp.spawn(_half_batch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    halves = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # 4 and 2 labelled cells: each worker divides by the mean count (3), so DDP's mean is the whole loss.
    assert torch.stack(halves).mean().item() == pytest.approx(whole.item(), rel=1e-6)
