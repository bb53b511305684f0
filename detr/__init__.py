"""raydetr's model library: DETR in plain PyTorch (no Ray, no MLflow).

The pieces, one module each: `config` (DETRConfig and presets), `backbone`,
`position_encoding`, `transformer`, `model` (DETR and `build_model`), `matcher`
(HungarianMatcher), `criterion` (SetCriterion, the losses), `postprocess`
(PostProcess: detections in pixels), `segmentation` (the mask head and mask
losses), `panoptic` (PanopticPostProcess, instance masks, RLE), `batching`
(pad_images), `checkpoint` (our format), `official` (the official release layout) and
`inference_model` (fast inference-only copies: norms folded, channels-last, bfloat16).
"""
from .batching import image_sizes_from_mask, pad_images
from .checkpoint import load_checkpoint, save_checkpoint
from .coco_categories import COCO_CATEGORIES
from .config import PRESETS, DETRConfig
from .criterion import SetCriterion, loss_weights
from .matcher import HungarianMatcher
from .inference_model import PRECISIONS, forward_inference, inference_model
from .model import DETR, boxes_only, build_model
from .official import from_official, official_state_dict
from .panoptic import InstanceMaskPostProcess, PanopticPostProcess, masks_to_rle, rle_to_masks
from .postprocess import PostProcess

__all__ = [
    "COCO_CATEGORIES",
    "DETR",
    "DETRConfig",
    "HungarianMatcher",
    "InstanceMaskPostProcess",
    "PRESETS",
    "PRECISIONS",
    "PanopticPostProcess",
    "PostProcess",
    "SetCriterion",
    "boxes_only",
    "build_model",
    "forward_inference",
    "from_official",
    "image_sizes_from_mask",
    "inference_model",
    "load_checkpoint",
    "loss_weights",
    "masks_to_rle",
    "official_state_dict",
    "pad_images",
    "rle_to_masks",
    "save_checkpoint",
]
