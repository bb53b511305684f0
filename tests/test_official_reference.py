"""Fidelity to the official implementation (facebookresearch/detr), on outputs it computed itself.

`../shared/reference/official_tiny_r18.pt` holds a random-weight DETR in the official
layout, a padded batch, targets, and the official model's outputs, Hungarian
indices, losses and post-processed detections for them.
"""
from pathlib import Path

import pytest
import torch

from detr import PostProcess, SetCriterion, from_official

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="module")
def reference():
    return torch.load(SHARED / "official_tiny_r18.pt", weights_only=True)


def config_overrides(config: dict) -> dict:
    """What the official args say that the weights' shapes cannot (heads, dilation, loss settings)."""
    return {
        "nheads": config["nheads"],
        "dilation": config["dilation"],
        "aux_loss": config["aux_loss"],
        "set_cost_class": config["set_cost_class"],
        "set_cost_bbox": config["set_cost_bbox"],
        "set_cost_giou": config["set_cost_giou"],
        "bbox_loss_coef": config["bbox_loss_coef"],
        "giou_loss_coef": config["giou_loss_coef"],
        "eos_coef": config["eos_coef"],
    }


def check_against_reference(model, ref):
    with torch.no_grad():
        out = model(ref["batch"]["tensors"], ref["batch"]["mask"])
    expected = ref["expected_outputs"]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], expected[key], atol=1e-4, rtol=0, msg=key)
    assert len(out.get("aux_outputs", [])) == len(expected.get("aux_outputs", []))
    for ours, theirs in zip(out.get("aux_outputs", []), expected.get("aux_outputs", [])):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0, msg=f"aux {key}")

    criterion = SetCriterion.from_config(model.config)
    indices = criterion.matcher(out, ref["targets"])
    for (rows, cols), (exp_rows, exp_cols) in zip(indices, ref["expected_indices"]):
        assert rows.tolist() == exp_rows.tolist() and cols.tolist() == exp_cols.tolist()

    losses = criterion(out, ref["targets"])
    assert set(losses) == set(ref["expected_losses"])
    for name, value in ref["expected_losses"].items():
        assert losses[name].item() == pytest.approx(float(value), abs=1e-4), name

    sizes = ref.get("target_sizes", torch.as_tensor(ref["image_sizes"]))
    results = PostProcess()(out, sizes)
    for ours, theirs in zip(results, ref["expected_postprocess"]):
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-3, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(ours["labels"], theirs["labels"])


def test_shared_official_tiny_r18(reference):
    model = from_official(reference["checkpoint"], **config_overrides(reference["config"]))
    assert model.config.backbone == reference["config"]["backbone"]
    assert model.config.num_classes == reference["config"]["num_classes"]
    assert model.config.num_queries == reference["config"]["num_queries"]
    assert model.config.hidden_dim == reference["config"]["hidden_dim"]
    check_against_reference(model, reference)
