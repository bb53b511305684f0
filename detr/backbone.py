"""The convolutional backbone: a torchvision ResNet with frozen batch norm.

As in the paper, batch-norm statistics and affine parameters are frozen
(`FrozenBatchNorm2d`), because detection batches are too small to estimate them;
the stem and the first stage never train; the last stage can be dilated instead
of strided (DC5), doubling the feature resolution.

Padding. In the official implementation an image padded inside a batch is not
computed as it would be alone: after the first normalisation the padded area
holds non-zero activations that leak into the features near the bottom and
right edges, and the nearest-neighbour downsampled mask can disagree with the
image's own feature size. With `padding_invariant=True` every normalisation
layer zeroes the padded area of its output, so each convolution sees exactly the
zero padding it would see on the image alone, and the mask is downsampled by
striding (feature cell i covers input pixel stride*i, which is exactly how the
ResNet's strided convolutions and pooling place their outputs). A batch then
gives each image the detections it gets alone. `padding_invariant=False`
reproduces the official behaviour bit for bit (for official numbers).
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import RESNET_CHANNELS

TRAINABLE_STAGES = ("layer2", "layer3", "layer4")
"""Stages that train when the backbone trains (the official recipe)."""

STAGES = ("layer1", "layer2", "layer3", "layer4")
MAX_STRIDE = 64


class _ValidRegion(threading.local):
    """Where the real image is, per batch element, at every resolution of the forward pass in progress.

    Thread-local so that concurrent forwards through one model do not mix batches.
    """

    def __init__(self) -> None:
        self.valid: Tensor | None = None
        self.by_size: dict[tuple[int, int], Tensor] = {}

    def __reduce__(self):  # pickling/deepcopy: a fresh, empty region
        return (_ValidRegion, ())

    def at(self, size: torch.Size) -> Tensor | None:
        """[B,1,h,w] float mask (1 inside each image) at a feature map's size, or None outside a forward."""
        if self.valid is None:
            return None
        key = (int(size[0]), int(size[1]))
        if key not in self.by_size:
            stride = stride_for(self.valid.shape[-2:], key)
            self.by_size[key] = self.valid[..., ::stride, ::stride]
        return self.by_size[key]


class PaddingAwareFrozenBatchNorm2d(FrozenBatchNorm2d):
    """`FrozenBatchNorm2d` that zeroes the padded area of its output while its backbone runs a padded batch."""

    def __init__(self, num_features: int, region: _ValidRegion, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        self._region = region

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        valid = self._region.at(out.shape[-2:])
        return out if valid is None else out * valid


class Backbone(nn.Module):
    """ResNet trunk returning the stage outputs it is asked for, each with its padding mask.

    `return_stages` names the stages whose outputs `forward` returns, in order
    (the detector needs only `layer4`; the mask head also needs layer1-3).
    """

    def __init__(
        self,
        name: str = "resnet50",
        dilation: bool = False,
        train_backbone: bool = True,
        return_stages: tuple[str, ...] = ("layer4",),
        padding_invariant: bool = True,
    ) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unsupported backbone {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        unknown = [s for s in return_stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
        self.padding_invariant = padding_invariant
        self._region = _ValidRegion()
        norm_layer = (
            functools.partial(PaddingAwareFrozenBatchNorm2d, region=self._region)
            if padding_invariant
            else FrozenBatchNorm2d
        )
        body = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=norm_layer,
        )
        # The classifier is not part of a detection backbone.
        del body.fc, body.avgpool
        self.body = body
        self.return_stages = tuple(return_stages)
        self.num_channels = RESNET_CHANNELS[name]
        self.set_trainable(train_backbone)

    def set_trainable(self, train_backbone: bool) -> None:
        """Freeze everything, or everything but stages 2-4 (the stem and stage 1 always stay frozen)."""
        for param_name, param in self.body.named_parameters():
            trainable = train_backbone and param_name.split(".", 1)[0] in TRAINABLE_STAGES
            param.requires_grad_(trainable)

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict (such as ImageNet weights saved from torchvision).

        The classifier (`fc.*`) is ignored; every other tensor must match, so a file for
        the wrong depth fails loudly instead of half-loading.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a ResNet state dict, found {type(state).__name__}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not a state dict for this backbone; missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Return the requested stage outputs and their padding masks (True on padding)."""
        masked = self.padding_invariant and bool(mask.any())
        if masked:
            self._region.valid = (~mask)[:, None].to(images.dtype)
            self._region.by_size = {}
        try:
            features = self._run_stages(images)
        finally:
            self._region.valid = None
            self._region.by_size = {}
        if self.padding_invariant:
            masks = [exact_downsample_mask(mask, f.shape[-2:]) for f in features]
        else:
            masks = [downsample_mask(mask, f.shape[-2:]) for f in features]
        return features, masks

    def _run_stages(self, images: Tensor) -> list[Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        # Pooling windows that straddle an image's edge write into the padding: clear it again.
        valid = self._region.at(x.shape[-2:])
        if valid is not None:
            x = x * valid
        features = []
        for stage in STAGES:
            x = getattr(b, stage)(x)
            if stage in self.return_stages:
                features.append(x)
            if stage == self.return_stages[-1]:
                break
        return features


def downsample_mask(mask: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a [B,H,W] padding mask to a feature map's size."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def stride_for(full_size: tuple[int, int] | torch.Size, size: tuple[int, int]) -> int:
    """The power-of-two stride s at which a (H, W) input becomes a (ceil(H/s), ceil(W/s)) feature map."""
    full_h, full_w = int(full_size[0]), int(full_size[1])
    stride = 1
    while stride <= MAX_STRIDE:
        if -(-full_h // stride) == size[0] and -(-full_w // stride) == size[1]:
            return stride
        stride *= 2
    raise ValueError(f"a {size} feature map is not a power-of-two downsampling of a {full_h}x{full_w} input")


def exact_downsample_mask(mask: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Padding mask at a feature map's resolution: cell i is padding iff input pixel stride*i is."""
    stride = stride_for(mask.shape[-2:], (int(size[0]), int(size[1])))
    return mask[:, ::stride, ::stride]
