"""One training step and batched prediction, in plain PyTorch.

These are the inner loops every caller shares: the Ray Train worker, the
benchmarks and the tests. A training step takes one or more micro-batches
(gradient accumulation), runs them under optional autocast, back-propagates the
weighted loss, clips the global gradient norm and steps the optimiser; with DDP
the gradients are synchronised only on the last micro-batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import unwrap_model
from .criterion import SetCriterion
from .model import boxes_only
from .optim import clip_gradients
from .panoptic import PanopticPostProcess
from .postprocess import Detections, PostProcess, scored_by_sigmoid

Batch = tuple[Tensor, Tensor, Sequence[Mapping[str, Tensor]]]
"""(images [B,3,H,W], mask [B,H,W], targets) as the data pipeline's collate function produces."""


def move_batch(batch: Batch, device: torch.device) -> Batch:
    images, mask, targets = batch
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    clip_max_norm: float = 0.1,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimiser step over `micro_batches`; returns the mean of every loss term, `loss` and `grad_norm`.

    Raises FloatingPointError (naming the terms) when the loss is not finite, rather
    than letting NaN weights spread into checkpoints.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        images, mask, targets = move_batch(batch, device)
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, autocast_dtype):
                if criterion.computes_masks:
                    # The mask losses read only the matched queries' masks: compute only those.
                    outputs = model(images, mask, mask_queries=criterion.mask_query_selection(targets))
                else:
                    outputs = model(images, mask)
            losses = criterion(outputs, targets)
            total = criterion.total(losses)
            if not math.isfinite(total.item()):
                terms = {k: round(v.item(), 4) for k, v in losses.items()}
                raise FloatingPointError(f"loss is {total.item()}; terms: {terms}")
            (total / n).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item() / n
        sums["loss"] = sums.get("loss", 0.0) + total.item() / n
    sums["grad_norm"] = float(clip_gradients(model, clip_max_norm))
    optimizer.step()
    return sums


@torch.inference_mode()
def default_postprocess(model: nn.Module) -> PostProcess:
    """Every detection of `model`'s outputs, scored as the model was trained (sigmoids after the focal loss)."""
    return PostProcess(sigmoid=scored_by_sigmoid(getattr(unwrap_model(model), "config", None)))


def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    postprocess: PostProcess | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[int, Detections]:
    """Detections for every image of `batches`, in the original image's pixels, keyed by image id.

    Each target must carry "image_id" and "orig_size" (height, width), as the data
    pipeline's evaluation batches do.
    """
    postprocess = postprocess or default_postprocess(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[int, Detections] = {}
    try:
        for batch in batches:
            images, mask, targets = move_batch(batch, device)
            with _autocast(device, autocast_dtype):
                outputs = model(images, mask, mask_queries=boxes_only)
            sizes = torch.stack([torch.as_tensor(t["orig_size"], device=device) for t in targets])
            for t, det in zip(targets, postprocess(outputs, sizes)):
                results[int(t["image_id"])] = {k: v.cpu() for k, v in det.items()}
    finally:
        model.train(was_training)
    return results


@torch.inference_mode()
def predict_panoptic(
    model: nn.Module,
    batches: Iterable[Batch],
    panoptic: PanopticPostProcess,
    postprocess: PostProcess | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[int, Detections], dict[int, dict]]:
    """Detections (original pixels) and panoptic segmentations (at each image's processed "size") of a
    model with masks, keyed by image id; masks are computed only for the queries the merge can keep."""
    postprocess = postprocess or default_postprocess(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    detections: dict[int, Detections] = {}
    segmentations: dict[int, dict] = {}
    try:
        for batch in batches:
            images, mask, targets = move_batch(batch, device)
            with _autocast(device, autocast_dtype):
                outputs = model(images, mask, mask_queries=panoptic.queries_to_keep)
            sizes = torch.stack([torch.as_tensor(t["orig_size"], device=device) for t in targets])
            processed = [tuple(int(v) for v in t["size"]) for t in targets]
            for t, det, seg in zip(targets, postprocess(outputs, sizes), panoptic(outputs, processed)):
                detections[int(t["image_id"])] = {k: v.cpu() for k, v in det.items()}
                segmentations[int(t["image_id"])] = {**seg, "id_map": seg["id_map"].cpu()}
    finally:
        model.train(was_training)
    return detections, segmentations
