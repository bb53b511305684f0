"""detr.inference_model: folded norms and channels-last give the original's outputs; bfloat16 stays close."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import detr
from detr import forward_inference, inference_model, pad_images
from detr.checkpoint import checkpoint_dict
from detr.fast_inference import ClearPadding, fold_norms
from pipelines.inference.detector import Detector
from pipelines.labelling.options import PRECISIONS as LABEL_PRECISIONS
from pipelines.training.transforms import TransformsConfig

FAST_PANOPTIC = dict(backbone_norm="batch", train_backbone_stem=True, backbone_stages=2, focal=detr.FocalLoss(),
                     dense_head=detr.DenseHead(2), two_stage=detr.TwoStage(nms=0.5), num_classes=7)
CONFIGS = {
    "tiny": detr.DETRConfig.preset("tiny"),
    "tiny_official_padding": detr.DETRConfig.preset("tiny").replace(padding_invariant=False),
    "tiny_panoptic": detr.DETRConfig.preset("tiny_panoptic"),
    "fast_panoptic_stride8": detr.DETRConfig.preset("tiny_panoptic").replace(**FAST_PANOPTIC),
    "fast_refined_stride8": detr.DETRConfig.preset("tiny").replace(**FAST_PANOPTIC, roi_refine=detr.RoIRefine()),
}


def model_with_statistics(config: detr.DETRConfig, seed: int = 0) -> torch.nn.Module:
    """A random model whose norms are not the identity (as after pretraining) and whose box refiner (which
    starts at zero offsets) moves the boxes, in eval mode."""
    torch.manual_seed(seed)
    model = detr.build_model(config).eval()
    with torch.no_grad():
        refiner = detr.detector_of(model).refiner
        if refiner is not None:
            refiner.delta.layers[-1].weight.normal_(0.0, 0.1)
        for module in detr.detector_of(model).backbone.modules():
            if hasattr(module, "running_var"):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def padded_batch():
    torch.manual_seed(1)
    return pad_images([torch.randn(3, 64, 80), torch.randn(3, 72, 64)])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_inference_copy_gives_the_original_outputs(name):
    model = model_with_statistics(CONFIGS[name])
    images, mask = padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    fast = inference_model(model)
    out = forward_inference(fast, images, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        if key in expected:
            assert out[key].dtype == torch.float32
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=1e-4, msg=key)
    assert not any(isinstance(m, (detr.backbone.FrozenBatchNorm2d, detr.backbone.TrainableBatchNorm2d))
                   for m in detr.detector_of(fast).backbone.modules())
    conv = detr.detector_of(fast).backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_folded_model_stays_padding_invariant():
    model = inference_model(model_with_statistics(CONFIGS["tiny_panoptic"]))
    images, mask = padded_batch()
    together = forward_inference(model, images, mask)
    alone = forward_inference(model, images[1:, :, :72, :64], mask[1:, :72, :64])
    torch.testing.assert_close(together["pred_logits"][1:], alone["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(together["pred_boxes"][1:], alone["pred_boxes"], rtol=0, atol=1e-5)
    assert any(isinstance(m, ClearPadding) for m in model.modules())


def test_fold_count_matches_the_resnets_norms():
    for preset, expected in (("tiny", 1 + 8 * 2 + 3), ("detr_r50", 1 + 16 * 3 + 4)):
        body = detr.detector_of(detr.build_model(preset)).backbone.body
        assert fold_norms(body) == expected


def test_bfloat16_backbone_stays_close_to_float32():
    model = model_with_statistics(CONFIGS["tiny_panoptic"])
    images, mask = padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    fast = inference_model(model, "bfloat16")
    assert {p.dtype for p in detr.detector_of(fast).backbone.parameters()} == {torch.bfloat16}  # where the time goes
    assert {p.dtype for p in detr.detector_of(fast).transformer.parameters()} == {torch.float32}
    out = forward_inference(fast, images, mask)
    assert out["pred_logits"].dtype == torch.float32
    logit_error = (out["pred_logits"] - expected["pred_logits"]).abs().max().item()
    assert 0 < logit_error < 0.1  # really computed in bfloat16, and close
    assert (out["pred_boxes"] - expected["pred_boxes"]).abs().max().item() < 0.01
    masks_agree = ((out["pred_masks"] > 0) == (expected["pred_masks"] > 0)).float().mean().item()
    assert masks_agree > 0.99
    # The label job's CLI names the precisions without importing torch: the same ones.
    assert LABEL_PRECISIONS == tuple(detr.PRECISIONS)


def test_a_box_refiner_reads_the_bfloat16_backbones_features_in_float32():
    # Learned queries: a two-stage model's proposals, near-tied in a random model, may change with the rounding.
    model = model_with_statistics(CONFIGS["tiny"].replace(backbone_stages=2, roi_refine=detr.RoIRefine()))
    images, mask = padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    out = forward_inference(inference_model(model, "bfloat16"), images, mask)
    assert out["pred_boxes"].dtype == torch.float32
    assert 0 < (out["pred_boxes"] - expected["pred_boxes"]).abs().max().item() < 0.01


def test_original_is_untouched_and_the_copy_cannot_train_or_be_saved():
    model = model_with_statistics(CONFIGS["tiny"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()  # the original still trains
    with pytest.raises(RuntimeError, match="cannot train"):
        fast.train()
    with pytest.raises(ValueError, match="no checkpoint of its own"):
        checkpoint_dict(fast)
    with pytest.raises(ValueError, match="already an inference model"):
        inference_model(fast)
    with pytest.raises(ValueError, match="unknown precision"):
        inference_model(model, "float16")


def test_detector_runs_the_inference_copy_with_the_same_detections():
    model = model_with_statistics(CONFIGS["tiny"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8), rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)]
    plain = Detector(model, TransformsConfig.small(), optimize=False, score_threshold=None).detect(images)
    fast_detector = Detector(model, TransformsConfig.small(), score_threshold=None)
    assert fast_detector.model.inference_settings.precision == "float32"
    for a, b in zip(plain, fast_detector.detect(images)):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="optimize=True"):
        Detector(model, TransformsConfig.small(), optimize=False, precision="bfloat16")


def test_every_job_loads_an_official_checkpoint_the_same_way(tmp_path):
    """Evaluation's actors, the label job's actors, the pyfunc model and training's `init_from` all load
    through `Detector.from_checkpoint`: an official file runs padding-invariant everywhere (an image in a
    padded batch gets the detections it gets alone), with the COCO classes when it has 91."""
    from jobs.model_sources import load_model
    from jobs.train import _init_state
    from pipelines.evaluation.predictors import EvalPredictor
    from pipelines.labelling.predictor import LabelPredictor

    torch.manual_seed(0)
    official = detr.build_model("tiny", num_classes=91, padding_invariant=False).eval()
    path = tmp_path / "detr-official.pth"
    torch.save({"model": detr.official_state_dict(official)}, path)
    data = path.read_bytes()
    evaluation = EvalPredictor(data).detector
    labelling = LabelPredictor(data, score_threshold=None, top_k=None, classes=None).detector
    loaded = load_model(str(path))
    for detector in (evaluation, labelling):
        assert detector.model.config.padding_invariant and detector.model.inference_settings is not None
        assert detector.label_name(1) == "person" and len(detector.categories) == 80
    assert loaded.checkpoint == data and loaded.categories == evaluation.categories and not loaded.masks
    state = _init_state(str(path), tracking_uri="sqlite:///unused.db")
    torch.testing.assert_close(state["class_embed.weight"], official.class_embed.weight)
    images, mask = padded_batch()
    alone = evaluation.forward(images[1:2, :, :72, :64], mask[1:2, :72, :64])  # the second image, unpadded
    batched = evaluation.forward(images, mask)
    torch.testing.assert_close(batched["pred_boxes"][1], alone["pred_boxes"][0], atol=1e-4, rtol=0)
