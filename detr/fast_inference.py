"""Inference-only copies of a DETR: backbone norms folded into the convolutions, channels-last
tensors, and optionally bfloat16 weights.

Why: a frozen norm is a per-channel affine map, so it can live in the convolution in front of it
(weights scaled, a bias added) instead of costing one more pass over every activation; and oneDNN
on CPUs and cuDNN on GPUs run convolutions fastest on channels-last tensors (the gain:
`bench/label_speed.py`, figures in bench/RESULTS.md), and the outputs stay those of the original
model up to float32 rounding (1e-5). A bfloat16 backbone runs faster again on CPUs with AMX or
AVX512-BF16 (and on tensor-core GPUs), at the cost of about 1e-2 in the logits, so it is an option
(`precision="bfloat16"`), never the default; the transformer stays in float32 (see `LowPrecision`).

Padding invariance is kept: where a norm cleared the padded area of a padded batch, a
`ClearPadding` layer still does. An inference model cannot train and has no checkpoint of its own
(its state dict no longer has the norms): keep the original for that.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbone import TrainableBatchNorm2d, _ValidRegion
from .errors import RaydetrError
from .model import detector_of

PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The weight and activation precisions an inference model can run in."""

_NORMS = (FrozenBatchNorm2d, TrainableBatchNorm2d)  # PaddingAwareFrozenBatchNorm2d is a FrozenBatchNorm2d


@dataclass(frozen=True)
class InferenceSettings:
    """How an inference model was made; `forward_inference` prepares its inputs accordingly."""

    precision: str = "float32"
    channels_last: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


class ClearPadding(nn.Module):
    """What is left of a padding-aware norm once its affine map moved into the convolution: the padded
    area of a padded batch is zeroed (nothing happens outside a padded forward pass)."""

    def __init__(self, region: _ValidRegion) -> None:
        super().__init__()
        self._region = region

    def forward(self, x: Tensor) -> Tensor:
        valid = self._region.at(x.shape[-2:])
        return x if valid is None else x * valid.to(x.dtype)


def inference_model(model: nn.Module, precision: str = "float32", channels_last: bool = True,
                    inplace: bool = False) -> nn.Module:
    """A copy of `model` for inference: eval mode, norms folded, channels-last, weights in `precision`
    (`inplace=True`: `model` itself is converted, for a caller that owns it, such as a loader).

    The copy's outputs equal the original's to float32 rounding (`precision="float32"`); run it with
    `forward_inference`, which moves the inputs to its device, precision and memory format."""
    if precision not in PRECISIONS:
        raise RaydetrError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if getattr(model, "inference_settings", None) is not None:
        raise ValueError("the model is already an inference model")
    fast = (model if inplace else copy.deepcopy(model)).eval()
    for param in fast.parameters():
        param.requires_grad_(False)
    detector = detector_of(fast)
    fold_norms(detector.backbone.body)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if precision != "float32":
        detector.backbone = LowPrecision(detector.backbone.to(PRECISIONS[precision]), PRECISIONS[precision])
    fast.inference_settings = InferenceSettings(precision, channels_last)
    return fast


class LowPrecision(nn.Module):
    """A backbone run in a lower precision: images cast in, features cast back to float32.

    Only the backbone: it is where the time goes, while the transformer's matrix products on CPUs ran
    slower in bfloat16 than in float32 (weights copied per sequence position)."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.backbone, self.dtype = backbone, dtype

    @property
    def stride(self) -> int:
        """The wrapped backbone's (input pixels per feature cell)."""
        return self.backbone.stride

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        features, masks = self.backbone(images.to(self.dtype), mask)
        return [f.float() for f in features], masks


def fold_norms(module: nn.Module) -> int:
    """Fold every norm that directly follows a convolution into it, in place (torchvision ResNets:
    `convN` then `bnN` in a block or the stem, `[conv, norm]` in a downsample). Returns how many."""
    folded = 0
    children = dict(module.named_children())
    for name, child in children.items():
        if isinstance(child, _NORMS):
            conv_name = _conv_before(name, children)
            if conv_name is not None:
                conv, norm_replacement = _fold(children[conv_name], child)
                _set_child(module, conv_name, conv)
                _set_child(module, name, norm_replacement)
                folded += 1
                continue
        folded += fold_norms(child)
    return folded


def _conv_before(norm_name: str, children: dict[str, nn.Module]) -> str | None:
    """The convolution a norm normalises: `bnN` follows `convN`; in a Sequential, the previous entry."""
    if norm_name.startswith("bn") and isinstance(children.get("conv" + norm_name[2:]), nn.Conv2d):
        return "conv" + norm_name[2:]
    if norm_name.isdigit() and isinstance(children.get(str(int(norm_name) - 1)), nn.Conv2d):
        return str(int(norm_name) - 1)
    return None


def _fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    region = getattr(norm, "_region", None)
    return fused, (ClearPadding(region) if region is not None else nn.Identity())


def _set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    if isinstance(module, nn.Sequential) and name.isdigit():
        module[int(name)] = child
    else:
        setattr(module, name, child)


def forward_inference(model: nn.Module, images: Tensor, mask: Tensor, **kwargs: Any) -> dict:
    """`model(images, mask, **kwargs)` under `torch.inference_mode`, with the inputs moved to the model's
    device, precision and memory format, and the main outputs (`pred_logits`, `pred_boxes`, `pred_masks`)
    returned in float32 (post-processing expects it). Works for plain models too."""
    settings: InferenceSettings | None = getattr(model, "inference_settings", None)
    device = next(model.parameters()).device
    images = images.to(device)
    if settings is not None and settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        outputs = model(images, mask.to(device), **kwargs)
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        if name in outputs and outputs[name].dtype != torch.float32:
            outputs[name] = outputs[name].float()
    return outputs


__all__ = ["ClearPadding", "InferenceSettings", "LowPrecision", "PRECISIONS", "fold_norms", "forward_inference", "inference_model"]
