"""A tiny random-weight panoptic model whose segments are decided by the model, not by rounding.

Two things a random `tiny_panoptic` lacks: its queries all call "no object" (the
panoptic merge would keep none), and its queries' masks differ by ~1e-5 (the
attention maps are tiny next to the shared features), so which query wins a
pixel would be rounding noise. The class head is fitted to give query q the
class q % 4 + 1 (classes 1-2 things, 3-4 stuff), and the mask head's attention
inputs are scaled up (as tests/test_segmentation.py does), so every image gets
things and stuff with clear masks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import detr
from jobs.synthetic_data import SyntheticConfig, write_dataset
from pipelines.inference.detector import transforms_to_metadata
from pipelines.training.transforms import TransformsConfig
from query_classes import fit_query_classes

PANOPTIC_SHAPES = SyntheticConfig(images=6, classes=2, min_image_size=80, max_image_size=80, max_object_size=32,
                                  max_objects=2, val_fraction=0.0, seed=6, panoptic=True, stuff_classes=2)
"""Images all 80x80: a batch of them carries no padding, so batched results equal single-image ones bit for
bit (padded batches agree only to float rounding, which can move a boundary pixel between two segments)."""
CATEGORIES = PANOPTIC_SHAPES.panoptic_categories()  # 1-2 things (isthing 1), 3-4 stuff (isthing 0)


def save_tiny_panoptic(path: Path, transforms: TransformsConfig, masks: bool = True) -> str:
    """The model described above, saved with `detr.save_checkpoint` (categories with isthing, transforms)."""
    torch.manual_seed(0)
    model = detr.build_model("tiny_panoptic", num_classes=5, num_queries=8, enc_layers=1, dim_feedforward=128,
                             mask_head=detr.MaskHead(freeze_detector=False) if masks else None).eval()
    drawn = panoptic_images(Path(path).parent / f".{Path(path).stem}-fit")  # images like those the tests label
    fit_query_classes(model, transforms, (80, 80), [np.asarray(Image.open(f).convert("RGB")) for f in drawn])
    if masks:
        with torch.no_grad():
            model.mask_head.lay1.weight[:, model.config.hidden_dim:] *= 1000
    detr.save_checkpoint(model, path, {"categories": CATEGORIES, "transforms": transforms_to_metadata(transforms)})
    return str(path)


def panoptic_images(folder: Path) -> list[Path]:
    """The PANOPTIC_SHAPES images (PNGs), written by the synthetic panoptic generator."""
    write_dataset(str(folder), PANOPTIC_SHAPES)
    return sorted((folder / "images").iterdir())
