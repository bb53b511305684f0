"""Loading (and writing) checkpoints in the official DETR release layout.

An official checkpoint is a dict whose `"model"` entry is the state dict of
facebookresearch/detr's model (checkpoints saved by its `main.py` also carry
`"args"`, an `argparse.Namespace`, and optimiser state). Everything the shapes
reveal is inferred from them: backbone depth, hidden size, encoder and decoder
layer counts, feed-forward width, query count, class count, pre-norm (a final
encoder LayerNorm exists) and learned positional encodings (row/column
embeddings exist). What the shapes cannot reveal comes from `"args"` when the
file has it, else from the paper's defaults: 8 attention heads, no dilation
(DC5 checkpoints have exactly the keys of their base model, so pass
`dilation=True` for them).

Panoptic checkpoints (the official `DETRsegm`) hold the detector's keys under
`detr.`, then `bbox_attention.*` and `mask_head.*`, as our `DETRsegm` does; the head
count comes from the mask head's input width (hidden + heads).

Files are read with `torch.load(weights_only=True)`; the only class allowed
besides tensors and containers is `argparse.Namespace`, a plain attribute bag.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import DETRConfig, MaskHead
from .errors import RaydetrError
from .model import TRAINING_ONLY_PREFIXES, build_model
from .segmentation import DETECTOR_PREFIX, MASK_HEAD_PREFIXES
from .weights import load_weights

_RESNET_BY_BLOCKS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
}
# Official name prefix -> our name prefix. Everything else has the same name in both.
_KEY_MAP = (
    ("backbone.0.body.", "backbone.body."),
    ("backbone.1.", "position_encoding."),
)
# Fields that official `args` may carry and that shapes cannot reveal.
_ARGS_FIELDS = ("nheads", "dilation", "dropout", "aux_loss", "set_cost_class", "set_cost_bbox",
                "set_cost_giou", "bbox_loss_coef", "giou_loss_coef", "eos_coef", "mask_loss_coef", "dice_loss_coef")


def read_official_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read an official checkpoint file without executing pickled code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise RaydetrError(f"{path}: cannot be read as a weights-only DETR checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise RaydetrError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def is_panoptic_state(state: Mapping[str, Any]) -> bool:
    """Whether an official state dict is the panoptic layout (detector under `detr.`, then the mask head)."""
    return f"{DETECTOR_PREFIX}query_embed.weight" in state


def _state_dict_of(checkpoint: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    state = checkpoint.get("model", checkpoint)
    if isinstance(state, Mapping) and is_panoptic_state(state):
        missing = [p for p in MASK_HEAD_PREFIXES if not any(k.startswith(p) for k in state)]
        if missing:
            raise RaydetrError(f"{where}: a panoptic DETR checkpoint (keys under 'detr.') without its mask head: "
                             f"no {', '.join(repr(p + '*') for p in missing)} keys")
        return dict(state)
    if not isinstance(state, Mapping) or "query_embed.weight" not in state:
        if isinstance(state, Mapping) and any(k.startswith(DETECTOR_PREFIX) for k in state):
            raise RaydetrError(
                f"{where}: not a complete panoptic DETR checkpoint: keys start with 'detr.' but there is "
                "no 'detr.query_embed.weight'"
            )
        raise RaydetrError(
            f"{where}: not an official DETR checkpoint: expected a dict with a 'model' state dict "
            "holding 'query_embed.weight', 'class_embed.weight', 'backbone.0.body.*', 'transformer.*'"
        )
    return dict(state)


def _args_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return {}
    return {k: args[k] for k in _ARGS_FIELDS if k in args}


def _layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_config(state: Mapping[str, Tensor], **fields: Any) -> DETRConfig:
    """The `DETRConfig` an official state dict was built with; `fields` fill in or override (the mask losses'
    coefficients, which the official training arguments always carry, only for a state with a mask head)."""
    head = {k: fields.pop(k) for k in ("mask_loss_coef", "dice_loss_coef") if k in fields}
    if is_panoptic_state(state):
        detector = {k[len(DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
        hidden = int(detector["query_embed.weight"].shape[1])
        # The mask head's first layer reads hidden + nheads channels (features and one map per head).
        nheads = int(state["mask_head.lay1.weight"].shape[1]) - hidden
        config = infer_config(detector, **{"nheads": nheads, "mask_head": MaskHead(**head), **fields})
        fpn = tuple(int(state[f"mask_head.adapter{i}.weight"].shape[1]) for i in (1, 2, 3))
        if fpn != config.fpn_dims:
            raise RaydetrError(f"the mask head's FPN adapters read {fpn} channels, but a {config.backbone} "
                             f"backbone gives {config.fpn_dims}")
        return config
    blocks = tuple(_layer_count(state, f"backbone.0.body.layer{i}.") for i in range(1, 5))
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    backbone = _RESNET_BY_BLOCKS.get((blocks, bottleneck))
    if backbone is None:
        raise RaydetrError(f"unsupported backbone: {blocks} blocks per stage (bottleneck={bottleneck})")
    queries, hidden = state["query_embed.weight"].shape
    enc_layers = _layer_count(state, "transformer.encoder.layers.")
    dec_layers = _layer_count(state, "transformer.decoder.layers.")
    ffn_key = "transformer.decoder.layers.0.linear1.weight"
    inferred = dict(
        backbone=backbone,
        hidden_dim=int(hidden),
        num_queries=int(queries),
        enc_layers=enc_layers,
        dec_layers=dec_layers,
        dim_feedforward=int(state[ffn_key].shape[0]),
        pre_norm="transformer.encoder.norm.weight" in state,
        position_embedding="learned" if "backbone.1.row_embed.weight" in state else "sine",
        num_classes=int(state["class_embed.weight"].shape[0]) - 1,
    )
    inferred.update(fields)
    return DETRConfig(**inferred)


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`key` with the first matching prefix renamed, inside the panoptic `detr.` prefix if it has one."""
    prefix = DETECTOR_PREFIX if key.startswith(DETECTOR_PREFIX) else ""
    inner = key[len(prefix):]
    for old, new in renames:
        if inner.startswith(old):
            return prefix + new + inner[len(old):]
    return key


def detector_key(key: str) -> str:
    """A state-dict key without the panoptic `detr.` prefix (mask-head keys are returned as they are)."""
    return key[len(DETECTOR_PREFIX):] if key.startswith(DETECTOR_PREFIX) else key


def to_raydetr_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official state-dict keys (detection or panoptic layout) to this library's module names."""
    return {_rename(k, _KEY_MAP): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the official key names (for tools built on the official repository):
    the detection layout, or for a model with masks the panoptic one (detector under `detr.`);
    training-only weights (see `TRAINING_ONLY_PREFIXES`) are left out."""
    if model.config.two_stage is not None:
        raise RaydetrError("a two_stage model takes its queries from its encoder: the official layout cannot hold it")
    back = tuple((ours, official) for official, ours in _KEY_MAP)
    return {_rename(k, back): v.detach().cpu() for k, v in model.state_dict().items()
            if not detector_key(k).startswith(TRAINING_ONLY_PREFIXES)}


def from_official(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    dilation: bool | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a DETR from an official checkpoint (a path, or the already loaded dict).

    `dilation`: True for the DC5 checkpoints (their keys equal the base model's);
    None takes it from the file's `args` when present, else False.
    `num_classes`: when it differs from the checkpoint's, the class head is freshly
    initialised and everything else is loaded (the usual fine-tuning recipe).
    `overrides`: any other `DETRConfig` field the file cannot tell, e.g. `nheads`
    (default 8, the paper's; a panoptic file tells it) or `dropout` and loss settings
    for further training. A panoptic checkpoint gives a model with masks (its mask head
    loaded too; `freeze_detector` as in `DETRConfig`).
    The model treats padding as the official code does (`padding_invariant=False`)
    unless `padding_invariant=True` is passed, which makes each image of a batch
    come out exactly as it does alone.
    Returns the model in eval mode.
    """
    where = str(checkpoint) if not isinstance(checkpoint, Mapping) else "checkpoint dict"
    raw = read_official_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    state = _state_dict_of(raw, where)
    # The official model's treatment of padding, unless asked otherwise (see backbone.py).
    fields = {"padding_invariant": False, **_args_of(raw)}
    if dilation is not None:
        fields["dilation"] = dilation
    fields.update(overrides)
    config = infer_config(state, **fields)
    weights = to_raydetr_keys(state)
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)  # another count: the class head starts fresh
    return load_weights(build_model(config), weights, f"{where}: weights").eval()
