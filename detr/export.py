"""A DETR as an ONNX graph: images and padding mask in, the set of predictions out, any batch and image size.

Why: CPU fleets run exported models in ONNX Runtime or OpenVINO, which fuse and schedule the graph better
than eager PyTorch on a few cores. The graph is traced from the inference copy (`inference_model`: norms
folded into the convolutions) with TorchScript's exporter, which keeps the image size dynamic where
`torch.export` specialises it (the backbone computes each feature map's stride from its size). The example
batch is padded, so the traced graph is the padding-invariant path: on an unpadded batch it multiplies by
ones, and an image gives the same detections alone and inside a padded batch, as in PyTorch.

Inputs: `images` float32 [B, 3, H, W] (normalised, zero-padded), `mask` bool [B, H, W] (True on padding).
Outputs: `pred_logits` [B, Q, C + 1], `pred_boxes` [B, Q, 4] and, for a model with masks, `pred_masks`
[B, Q, H/4, W/4] for every query (the graph has no query selection).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from .batching import pad_images
from .errors import RaydetrError
from .fast_inference import inference_model
from .model import detector_of

OPSET = 17
INPUTS = ("images", "mask")
"""The graph's inputs, in order."""


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The graph's outputs for this model: boxes and classes, and masks when it has a mask head."""
    masks = bool(getattr(model, "config", None) is not None and model.config.masks)
    return ("pred_logits", "pred_boxes") + (("pred_masks",) if masks else ())


class _Outputs(nn.Module):
    """The model's main outputs as a tuple (an exporter traces tensors, not dicts)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, mask)
        return tuple(outputs[name] for name in self.names)


def example_batch(sizes: tuple[tuple[int, int], ...] = ((96, 128), (128, 96))) -> tuple[Tensor, Tensor]:
    """A padded batch of two sizes (each image is padded along one side) to trace with."""
    generator = torch.Generator().manual_seed(0)
    return pad_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = OPSET, padded: bool = True) -> tuple[str, ...]:
    """Write `model` (a DETR or a DETR with masks, ours or loaded from an official file) to an ONNX file with
    dynamic batch, height and width; returns the output names. The model itself is left as it is.
    `padded=False` writes the graph for unpadded batches only (every mask False): traced without padding, it
    leaves out the multiplications that keep the padded area at zero, as eager PyTorch skips them when
    nothing is padded (what a runtime runs when a batch is one image, or images of one size)."""
    if getattr(model, "inference_settings", None) is not None:
        if model.inference_settings.precision != "float32":
            raise RaydetrError("only a float32 model can be exported (int8 comes from quantising the export)")
        fast = model
    else:
        fast = inference_model(model, "float32", channels_last=False)
    if not detector_of(fast).backbone.padding_invariant:
        raise RaydetrError("the model is not padding-invariant (an official model loaded with "
                           "padding_invariant=False): its graph would depend on how images are batched")
    names = output_names(fast)
    images, mask = example_batch() if padded else example_batch(((96, 128), (96, 128)))
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"},
            "pred_logits": {0: "batch"}, "pred_boxes": {0: "batch"}}
    if "pred_masks" in names:
        axes["pred_masks"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic: the sizes stay dynamic (tested)
        warnings.simplefilter("ignore")
        torch.onnx.export(_Outputs(fast, names).eval(), (images, mask), str(path), dynamo=False,
                          input_names=list(INPUTS), output_names=list(names), opset_version=opset,
                          dynamic_axes=axes, do_constant_folding=True)
    return names


__all__ = ["INPUTS", "OPSET", "example_batch", "export_onnx", "output_names"]
