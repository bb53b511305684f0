"""From mask outputs to instance masks and panoptic segmentations, in tensor operations.

`PanopticPostProcess(is_thing, threshold=PANOPTIC_THRESHOLD)` (the paper's 0.85) applies the paper's merge rules
(the official `PostProcessPanoptic`): drop "no object" and queries whose top
probability (no-object included) is at most `threshold`; assign each pixel to the
query whose mask wins the per-pixel softmax over the kept queries; merge the
queries of one stuff class into one segment; remove segments of 4 pixels or fewer
at the target size and assign their pixels again, until none is that small.
The official code does this through PIL images and a PNG round trip; here it is
argmax, index arithmetic and `bincount` on tensors, with the same result
(nearest-neighbour resizing with PIL's pixel-centre rule).

Segment ids start at 1, in the order of the kept queries; 0 marks pixels of no
segment (only when nothing is kept), as COCO panoptic PNGs reserve id 0 for
"unlabelled". `segments_info` holds COCO's `{"id", "category_id", "isthing",
"area"}`; each result also carries `"scores"` and `"queries"` (the query of each
segment; for a merged stuff segment, its first query) aligned with it.

`InstanceMaskPostProcess` gives each detection a binary mask at the target
(original) size; `masks_to_rle` encodes masks as COCO RLE with pycocotools.

Padding. The official post-processing stretches the whole padded mask grid
over each image, which misplaces the masks of images padded in a batch. When
the outputs come from a padding-invariant model (`crop_padding=True`, see `mask_postprocess_options`)
each image's own mask cells are used instead (`detr.segmentation.masks_to_image`);
for an official-mode model (`crop_padding=False`) the official geometry is kept.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .config import PANOPTIC_THRESHOLD
from .postprocess import class_probabilities, scored_by_sigmoid
from .segmentation import masks_to_image

SMALL_SEGMENT_AREA = 4
"""Segments of at most this many pixels (at the target size) are removed."""


def _size_tuple(size: Any) -> tuple[int, int]:
    values = size.tolist() if torch.is_tensor(size) else list(size)
    if len(values) != 2:
        raise ValueError(f"sizes must be (height, width) pairs, got {size!r}")
    return int(values[0]), int(values[1])


def mask_postprocess_options(config: Any) -> dict[str, bool]:
    """How a model's mask outputs are read, from its config: scores by sigmoid (focal loss) or softmax, and
    whether its masks ignore padding (a padding-invariant model: crop each image's own cells)."""
    return {"sigmoid": scored_by_sigmoid(config), "crop_padding": bool(config.padding_invariant)}


def nearest_indices(in_size: int, out_size: int, device: torch.device | None = None) -> Tensor:
    """Source index of every output index for a nearest-neighbour resize, exactly as PIL's NEAREST resize
    picks them: pixel centres, the position accumulated in double precision step by step."""
    steps = np.full(out_size, in_size / out_size, dtype=np.float64)
    steps[0] = 0.5 * (in_size / out_size)
    idx = np.minimum(np.floor(np.add.accumulate(steps)).astype(np.int64), in_size - 1)
    return torch.from_numpy(idx).to(device)


def resize_nearest(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Resize an integer map [h, w] to `size` (height, width) with nearest neighbours (pixel centres)."""
    h, w = labels.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return labels
    rows = nearest_indices(h, out_h, labels.device)
    cols = nearest_indices(w, out_w, labels.device)
    return labels[..., rows[:, None], cols[None, :]]


class PanopticPostProcess(nn.Module):
    """Model outputs with `pred_masks` -> per image `{"id_map", "segments_info", "scores", "queries"}`."""

    def __init__(self, is_thing: Mapping[int, bool], threshold: float = PANOPTIC_THRESHOLD, crop_padding: bool = False,
                 sigmoid: bool = False):
        super().__init__()
        self.sigmoid = sigmoid
        self.is_thing = {int(k): bool(v) for k, v in dict(is_thing).items()}
        self.threshold = float(threshold)
        self.crop_padding = crop_padding

    def thing(self, category_id: int) -> bool:
        """Whether a class is a thing; a class the map does not name counts as a thing (countable)."""
        return self.is_thing.get(int(category_id), True)

    @torch.no_grad()
    def queries_to_keep(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """bool [B, Q]: the queries the merge can use (pass as the model's `mask_queries` to compute only them)."""
        logits = outputs["pred_logits"]
        if self.sigmoid:
            return class_probabilities(outputs, True).max(-1).values > self.threshold
        scores, labels = logits.float().softmax(-1).max(-1)
        return labels.ne(logits.shape[-1] - 1) & (scores > self.threshold)

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, Any],
        processed_sizes: Sequence[Sequence[int]] | Tensor,
        target_sizes: Sequence[Sequence[int]] | Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """`processed_sizes`: each image's (height, width) as the model saw it (before padding);
        `target_sizes`: the (height, width) to return the segmentation at (default: processed)."""
        if target_sizes is None:
            target_sizes = processed_sizes
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if not (len(logits) == len(masks) == len(processed_sizes) == len(target_sizes)):
            raise ValueError(f"{len(processed_sizes)} processed and {len(target_sizes)} target sizes for a batch "
                             f"of {len(logits)} images")
        crop = self.crop_padding
        keep_all = self.queries_to_keep(outputs)
        probabilities = class_probabilities(outputs, self.sigmoid)
        return [
            self._one(prob, mk, keep, _size_tuple(size), _size_tuple(target), crop)
            for prob, mk, keep, size, target in zip(probabilities, masks, keep_all, processed_sizes, target_sizes)
        ]

    def _one(self, prob: Tensor, masks: Tensor, keep: Tensor, size: tuple[int, int],
             target: tuple[int, int], crop: bool) -> dict[str, Any]:
        scores, labels = prob.max(-1)  # kept queries have a real class as their most probable
        queries = keep.nonzero(as_tuple=True)[0]
        scores, labels = scores[queries], labels[queries]
        kept = masks[queries].float()
        if crop:
            kept = masks_to_image(kept, size)
        elif len(queries):
            kept = F.interpolate(kept[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        else:
            kept = kept.new_zeros((0, *size))
        kept = kept.flatten(1)
        thing = torch.tensor([self.thing(c) for c in labels.tolist()], dtype=torch.bool, device=labels.device)
        while True:
            n = len(labels)
            if n == 0:
                id_map = torch.full(target, -1, dtype=torch.long, device=prob.device)
                area = torch.zeros(0, dtype=torch.long, device=prob.device)
                break
            # The per-pixel winner among the kept queries (softmax first, like the official code: same ties).
            winner = kept.transpose(0, 1).softmax(-1).argmax(-1)
            # Queries of one stuff class become one segment, represented by the first of them.
            representative = torch.arange(n, device=labels.device)
            for c in labels[~thing].unique().tolist():
                members = ((labels == c) & ~thing).nonzero(as_tuple=True)[0]
                representative[members] = members[0]
            id_map = resize_nearest(representative[winner].view(size), target)
            area = torch.bincount(id_map.flatten(), minlength=n)
            small = area <= SMALL_SEGMENT_AREA
            if not bool(small.any()):
                break
            big = ~small
            kept, labels, scores, queries, thing = kept[big], labels[big], scores[big], queries[big], thing[big]
        segments_info = [
            {"id": i + 1, "category_id": int(c), "isthing": bool(t), "area": int(a)}
            for i, (c, t, a) in enumerate(zip(labels.tolist(), thing.tolist(), area.tolist()))
        ]
        return {"id_map": id_map + 1, "segments_info": segments_info, "scores": scores.cpu(), "queries": queries.cpu()}


class InstanceMaskPostProcess(nn.Module):
    """Detections with binary masks at the target size: `scores`, `labels`, `boxes` (xyxy pixels),
    `masks` (bool [N, H, W]) and `queries`, per image.

    Scores and labels are `PostProcess`'s (softmax without "no object"); without
    `score_threshold`/`top_k` every query is returned, as the official `PostProcessSegm`
    does. Masks are the sigmoid of the logits above `mask_threshold`.
    """

    def __init__(self, mask_threshold: float = 0.5, score_threshold: float | None = None, top_k: int | None = None,
                 crop_padding: bool = False, sigmoid: bool = False):
        super().__init__()
        self.sigmoid = sigmoid
        self.mask_threshold = float(mask_threshold)
        self.score_threshold = score_threshold
        self.top_k = top_k
        self.crop_padding = crop_padding

    @torch.no_grad()
    def queries_to_keep(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """bool [B, Q]: the queries this post-processing returns (the model's `mask_queries`)."""
        scores = class_probabilities(outputs, self.sigmoid).max(-1).values
        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.score_threshold is not None:
            keep &= scores > self.score_threshold
        if self.top_k is not None and self.top_k < scores.shape[1]:
            top = scores.topk(self.top_k, dim=1).indices
            in_top = torch.zeros_like(keep)
            in_top.scatter_(1, top, True)
            keep &= in_top
        return keep

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, Any],
        processed_sizes: Sequence[Sequence[int]] | Tensor,
        target_sizes: Sequence[Sequence[int]] | Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        if target_sizes is None:
            target_sizes = processed_sizes
        logits, boxes, masks = outputs["pred_logits"], outputs["pred_boxes"], outputs["pred_masks"]
        sizes = [_size_tuple(s) for s in processed_sizes]
        targets = [_size_tuple(s) for s in target_sizes]
        if not (len(logits) == len(sizes) == len(targets)):
            raise ValueError(f"{len(sizes)} processed and {len(targets)} target sizes for a batch of {len(logits)}")
        crop = self.crop_padding
        scores, labels = class_probabilities(outputs, self.sigmoid).max(-1)
        keep = self.queries_to_keep(outputs)
        max_size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        results = []
        for i, (size, target) in enumerate(zip(sizes, targets)):
            queries = keep[i].nonzero(as_tuple=True)[0]
            order = scores[i, queries].argsort(descending=True)
            if self.score_threshold is not None or self.top_k is not None:
                queries = queries[order]  # like PostProcess: best first when trimming
            h, w = target
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
            result = {
                "scores": scores[i, queries],
                "labels": labels[i, queries],
                "boxes": box_convert(boxes[i, queries].float(), "cxcywh", "xyxy") * scale,
                "masks": self._masks(masks[i, queries].float(), size, target, max_size, crop),
                "queries": queries,
            }
            results.append(result)
        return results

    def _masks(self, logits: Tensor, size: tuple[int, int], target: tuple[int, int], max_size: tuple[int, int],
               crop: bool) -> Tensor:
        out = torch.zeros((len(logits), *target), dtype=torch.bool, device=logits.device)
        for start in range(0, len(logits), 8):  # bounded memory for large originals
            chunk = logits[start:start + 8]
            if crop:
                at_size = masks_to_image(chunk, size)
                full = F.interpolate(at_size[:, None], size=target, mode="bilinear", align_corners=False)[:, 0]
                out[start:start + 8] = full.sigmoid() > self.mask_threshold
            else:
                # The official PostProcessSegm: upsample to the batch's largest processed size,
                # threshold, crop the image, nearest-neighbour resize to the target.
                up = F.interpolate(chunk[:, None], size=max_size, mode="bilinear", align_corners=False)
                binary = (up.sigmoid() > self.mask_threshold)[:, :, : size[0], : size[1]]
                out[start:start + 8] = F.interpolate(binary.float(), size=target, mode="nearest")[:, 0] > 0.5
        return out


def masks_to_rle(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, H, W] -> COCO RLE dicts `{"size": [H, W], "counts": str}` (pycocotools)."""
    from pycocotools import mask as mask_utils

    array = masks.cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    if array.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {array.shape}")
    if len(array) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in e["size"]], "counts": e["counts"].decode("ascii")} for e in encoded]


def rle_to_masks(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """COCO RLE dicts (counts as str or bytes) -> bool [N, H, W]."""
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    fixed = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
              else r["counts"]} for r in rles]
    return mask_utils.decode(fixed).transpose(2, 0, 1).astype(bool)


__all__ = [
    "InstanceMaskPostProcess",
    "PanopticPostProcess",
    "SMALL_SEGMENT_AREA",
    "masks_to_rle",
    "nearest_indices",
    "resize_nearest",
    "rle_to_masks",
]
