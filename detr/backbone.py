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

Training from scratch. Frozen batch norm only makes sense with pretrained
statistics; with random weights it is the identity and the ResNet trains without
any normalisation, and a frozen random stem is a fixed random filter bank.
`norm="batch"` makes every normalisation layer a `TrainableBatchNorm2d` (batch
statistics over the real pixels in training, the frozen affine map in eval mode,
the same state-dict keys, so a checkpoint keeps the official layout and loads
into a frozen-norm model unchanged), and `train_stem=True` trains the stem and
stage 1 too. `num_stages=3` (or 2) stops after stage 3 (stride 16, half the
channels) or stage 2 (stride 8, a quarter): cheaper and finer for small images.
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

from .config import BACKBONE_NORMS, RESNET_CHANNELS
from .errors import RaydetrError

TRAINABLE_STAGES = ("layer2", "layer3", "layer4")
"""Stages that train when the backbone trains (the official recipe)."""

STEM_AND_STAGE1 = ("conv1", "bn1", "layer1")
"""What stays frozen in the paper's recipe, trained too with `train_stem=True`."""

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


class TrainableBatchNorm2d(nn.Module):
    """Batch norm that trains, and in eval mode is exactly `FrozenBatchNorm2d` (same keys, same output).

    Training normalises with the batch's statistics over the real pixels only (the
    padded area of a padded batch is left out, and zeroed in the output, as
    `PaddingAwareFrozenBatchNorm2d` does) and updates the running statistics; there
    is no `num_batches_tracked`, so the state dict has FrozenBatchNorm2d's four
    entries and the trained statistics are what a frozen-norm model loads.
    """

    def __init__(self, num_features: int, region: _ValidRegion | None = None, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.eps = eps
        self.momentum = momentum
        self._region = region

    def forward(self, x: Tensor) -> Tensor:
        valid = self._region.at(x.shape[-2:]) if self._region is not None else None
        if not self.training:
            mean, var = self.running_mean, self.running_var
        elif valid is None:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            self._update_running_stats(mean, var, x.numel() / x.shape[1])
        else:
            count = valid.sum() * 1.0
            mean = (x * valid).sum((0, 2, 3)) / count
            var = (((x - mean[:, None, None]) * valid) ** 2).sum((0, 2, 3)) / count
            self._update_running_stats(mean, var, float(count))
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        out = x * scale[:, None, None] + shift[:, None, None]
        return out if valid is None else out * valid

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_(unbiased.detach(), self.momentum)


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
        norm: str = "frozen",
        train_stem: bool = False,
        num_stages: int = 4,
    ) -> None:
        super().__init__()
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose one of {BACKBONE_NORMS}")
        if num_stages not in (2, 3, 4):
            raise ValueError(f"num_stages must be 2, 3 or 4, got {num_stages}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unsupported backbone {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        unknown = [s for s in return_stages if s not in STAGES[:num_stages]]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES[:num_stages]}")
        self.padding_invariant = padding_invariant
        self._region = _ValidRegion()
        region = self._region if padding_invariant else None
        if norm == "batch":
            norm_layer = functools.partial(TrainableBatchNorm2d, region=region)
        elif padding_invariant:
            norm_layer = functools.partial(PaddingAwareFrozenBatchNorm2d, region=self._region)
        else:
            norm_layer = FrozenBatchNorm2d
        body = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=norm_layer,
        )
        # The classifier is not part of a detection backbone, nor are the stages after the last one used.
        del body.fc, body.avgpool
        self.num_stages = num_stages
        for stage in STAGES[num_stages:]:
            delattr(body, stage)
        self.body = body
        self.return_stages = tuple(return_stages)
        self.num_channels = RESNET_CHANNELS[name] // 2 ** (4 - num_stages)
        self.stride = stage_stride(num_stages, dilation)  # input pixels per cell of the last stage
        self.set_trainable(train_backbone, train_stem)

    def set_trainable(self, train_backbone: bool, train_stem: bool = False) -> None:
        """Freeze everything, or train stages 2-4 (and the stem and stage 1 too with `train_stem`)."""
        stages = TRAINABLE_STAGES + (STEM_AND_STAGE1 if train_stem else ())
        for param_name, param in self.body.named_parameters():
            trainable = train_backbone and param_name.split(".", 1)[0] in stages
            param.requires_grad_(trainable)

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict (such as ImageNet weights saved from torchvision).

        The classifier (`fc.*`) and stages this backbone does not use are ignored; every
        other tensor must match, so a file for
        the wrong depth fails loudly instead of half-loading.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise RaydetrError(f"{path}: expected a ResNet state dict, found {type(state).__name__}")
        unused = ("fc.",) + tuple(f"{stage}." for stage in STAGES[self.num_stages:])
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RaydetrError(
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
        for stage in STAGES[: STAGES.index(self.return_stages[-1]) + 1]:
            x = getattr(b, stage)(x)
            if stage in self.return_stages:
                features.append(x)
        return features


def stage_stride(stage: int, dilation: bool = False) -> int:
    """Input pixels per cell of ResNet stage `stage` (1-4): 4 after the stem, doubled by each later stage but a
    dilated stage 4 (DC5), which keeps its input's stride."""
    return 2 ** (stage + 1) // (2 if dilation and stage == 4 else 1)


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
