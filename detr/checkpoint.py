"""raydetr's own checkpoint format: config and weights in one file, loadable without pickled code.

A checkpoint is a plain dict, saved with `torch.save` and always loaded with
`torch.load(weights_only=True)`, so opening a checkpoint never executes code:

    {"format": "raydetr.detr", "format_version": 1,
     "config": DETRConfig.to_dict(), "model": state_dict,
     "metadata": {...}}   # e.g. {"categories": [{"id": 1, "name": "circle"}, ...]}

Metadata holds only plain values (str, int, float, bool, None, lists and dicts of
them, tensors); anything else is refused at save time rather than at load time.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import DETRConfig
from .errors import RaydetrError
from .model import InferenceGuard, build_model
from .segmentation import DETECTOR_PREFIX, MASK_HEAD_PREFIXES

LEGACY_KEYS = (("encoder_class_embed.", "dense_head.class_embed."), ("encoder_bbox_embed.", "dense_head.bbox_embed."),
               ("proposal_pos.", "proposals.query_pos."), ("semantic_embed.", "semantic_head.classifier."))
"""Weights of our parts under the names they had before the model was assembled from parts."""


def upgrade_state_dict(state: Mapping[str, Any], config: DETRConfig) -> dict[str, Any]:
    """A state dict saved before the parts (our own layout until then) under today's names: the parts' old
    names, and for a model with masks the detector's keys under `detr.` (`DETRsegm`). Today's pass as is."""
    if config.masks and any(k.startswith(DETECTOR_PREFIX) for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_KEYS:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[DETECTOR_PREFIX + key if config.masks and not key.startswith(MASK_HEAD_PREFIXES) else key] = value
    return out

FORMAT = "raydetr.detr"
FORMAT_VERSION = 1

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint")


def checkpoint_dict(model: nn.Module, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of `model` (a DETR, or one inside `DETRsegm`) as a dict (tensors on the CPU)."""
    unwrapped = unwrap_model(model)
    if not isinstance(unwrapped, InferenceGuard):
        raise TypeError(f"expected a DETR model, got {type(unwrapped).__name__}")
    if unwrapped.inference_settings is not None:
        raise RaydetrError("an inference model (detr.inference_model: norms folded) has no checkpoint of its own; "
                         "save the model it was made from")
    metadata = dict(metadata or {})
    _check_plain(metadata, "metadata")
    state = {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": unwrapped.config.to_dict(),
        "model": state,
        "metadata": metadata,
    }


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint atomically (a crash mid-write never leaves a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = checkpoint_dict(model, metadata)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_raydetr_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def read_checkpoint_file(source: str | os.PathLike | bytes | io.IOBase, name: str | None = None) -> Any:
    """`torch.load(..., weights_only=True)` on a path, bytes or file object, with a clear error naming `name`
    (default: the path)."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint bytes")
    try:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise RaydetrError(f"{label}: not a loadable weights-only checkpoint ({exc})") from exc


def load_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Load one of our checkpoints (path or dict) -> (model in eval mode, metadata)."""
    ckpt = read_checkpoint_file(source) if not isinstance(source, Mapping) else source
    if not is_raydetr_checkpoint(ckpt):
        raise RaydetrError(f"{source}: not a raydetr checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise RaydetrError(
            f"{source}: checkpoint format version {ckpt['format_version']} is newer than this "
            f"raydetr understands ({FORMAT_VERSION}); upgrade raydetr"
        )
    config = DETRConfig.from_dict(ckpt["config"])
    # The weights come from the checkpoint: never fetch backbone weights again, and build the modules
    # without storage (no random initialisation to overwrite: a ResNet-50 DETR loads in a tenth of the time).
    with torch.device("meta"):
        model = build_model(config.replace(backbone_weights=None))
    model.config = config
    model.load_state_dict(upgrade_state_dict(ckpt["model"], config), assign=True)
    unloaded = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise RaydetrError(f"{source}: the checkpoint does not hold {unloaded[:5]}")
    return model.eval(), dict(ckpt.get("metadata") or {})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
