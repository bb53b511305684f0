"""raydetr's model library: DETR in plain PyTorch (no Ray, no MLflow).

The pieces, one module each: `config` (DETRConfig and presets), `backbone`,
`position_encoding`, `transformer`, `model` (DETR and `build_model`), `matcher`
(HungarianMatcher), `criterion` (SetCriterion, the losses), `postprocess`
(PostProcess: detections in pixels), `segmentation` (the mask head and mask
losses), `panoptic` (PanopticPostProcess, instance masks, RLE), `batching`
(pad_images), `checkpoint` (our format), `official` (the official release layout) and
`inference_model` (fast inference-only copies: norms folded, channels-last, bfloat16).
"""

# Public names -> the module that defines them. Imported on first use (PEP 562), so that importing
# `detr.errors` or `detr.config` alone (the command line does, to answer `--help` at once) does not
# import torch.
_EXPORTS = {
    "image_sizes_from_mask": "batching", "pad_images": "batching",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "COCO_CATEGORIES": "coco_categories",
    "PRESETS": "config", "DenseHead": "config", "DETRConfig": "config", "FocalLoss": "config",
    "MaskHead": "config", "RoIRefine": "config", "SemanticHead": "config", "TwoStage": "config",
    "SetCriterion": "criterion", "loss_weights": "criterion",
    "RaydetrError": "errors",
    "HungarianMatcher": "matcher",
    "PRECISIONS": "fast_inference", "forward_inference": "fast_inference", "inference_model": "fast_inference",
    "DETR": "model", "boxes_only": "model", "build_detector": "model", "build_model": "model",
    "detector_of": "model",
    "from_official": "official", "official_state_dict": "official",
    "InstanceMaskPostProcess": "panoptic", "PanopticPostProcess": "panoptic",
    "mask_postprocess_options": "panoptic", "masks_to_rle": "panoptic", "rle_to_masks": "panoptic",
    "PostProcess": "postprocess", "scored_by_sigmoid": "postprocess", "default_score_threshold": "postprocess",
    "DETRsegm": "segmentation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'detr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
