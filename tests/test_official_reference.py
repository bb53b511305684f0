"""Fidelity to the official implementation (facebookresearch/detr), on outputs it computed itself.

`../shared/reference/official_tiny_r18.pt` holds a random-weight DETR in the official
layout, a padded batch, targets, and the official model's outputs, Hungarian
indices, losses and post-processed detections for them. `fixtures/official/*.pt`
hold the same for other configurations (DC5, pre-norm, learned positions,
ResNet-34/101, no auxiliary loss, an image without targets) and three official
training steps; their weights are regenerated from a seed (see their README).
"""
from pathlib import Path

import pytest
import torch
from reference.seeded_weights import state_dict_from_fixture

from detr import PostProcess, SetCriterion, from_official
from detr.optim import OptimizerConfig, build_optimizer, clip_gradients

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
CONFIG_FIXTURES = ["r50_dc5_postnorm_sine.pt", "r34_prenorm_learned.pt", "r101_noaux.pt", "r18_train_steps.pt"]


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
        out = model(ref["batch"]["tensors"].float(), ref["batch"]["mask"])
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
    for aux, expected_aux in zip(out.get("aux_outputs", []), ref.get("expected_aux_indices", [])):
        for (rows, cols), (exp_rows, exp_cols) in zip(criterion.matcher(aux, ref["targets"]), expected_aux):
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


def load_fixture(name):
    ref = torch.load(FIXTURES / name, weights_only=True)
    state = state_dict_from_fixture(ref["weights"])  # raises if the generator ever drifts
    model = from_official({"model": state}, **config_overrides(ref["config"]), dropout=ref["config"]["dropout"])
    return model, ref


@pytest.mark.parametrize("name", CONFIG_FIXTURES)
def test_official_configurations(name):
    model, ref = load_fixture(name)
    cfg = ref["config"]
    assert (model.config.backbone, model.config.pre_norm, model.config.position_embedding) == (
        cfg["backbone"], cfg["pre_norm"], cfg["position_embedding"])
    assert (model.config.enc_layers, model.config.dec_layers, model.config.dim_feedforward) == (
        cfg["enc_layers"], cfg["dec_layers"], cfg["dim_feedforward"])
    assert model.config.dilation == cfg["dilation"]
    check_against_reference(model, ref)


def test_official_training_steps():
    """Three AdamW steps with the paper's recipe reproduce the official losses, gradient norms and weights."""
    model, ref = load_fixture("r18_train_steps.pt")
    train = ref["train"]
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(train["trainable_keys"])
    optim_config = OptimizerConfig(lr=train["lr"], lr_backbone=train["lr_backbone"],
                                   weight_decay=train["weight_decay"], clip_max_norm=train["clip_max_norm"])
    optimizer = build_optimizer(model, optim_config)
    criterion = SetCriterion.from_config(model.config)
    images, mask = ref["batch"]["tensors"].float(), ref["batch"]["mask"]
    frozen_before = model.backbone.body.conv1.weight.clone()
    for step in range(train["steps"]):
        losses = criterion(model(images, mask), ref["targets"])
        total = criterion.total(losses)
        optimizer.zero_grad()
        total.backward()
        norm = clip_gradients(model, optim_config.clip_max_norm)
        optimizer.step()
        # Tolerances follow the official code's own run-to-run spread (the fixture's `sensitivity`).
        tolerance = 1e-4 * 10 ** step
        for name, value in train["step_losses"][step].items():
            assert losses[name].item() == pytest.approx(float(value), abs=tolerance, rel=1e-4), (step, name)
        assert total.item() == pytest.approx(train["step_total_loss"][step], abs=tolerance, rel=1e-4)
        assert norm.item() == pytest.approx(train["grad_norms"][step], rel=1e-3 * 10 ** step)
        with torch.no_grad():
            after = model.eval()(images, mask)
        model.train()
        expected = train["outputs_after_step"][step]
        torch.testing.assert_close(after["pred_logits"], expected["pred_logits"], atol=3e-4 * 10 ** step, rtol=0)
        torch.testing.assert_close(after["pred_boxes"], expected["pred_boxes"], atol=1e-4 * 10 ** step, rtol=0)
    assert torch.equal(model.backbone.body.conv1.weight, frozen_before)  # the stem never trains
