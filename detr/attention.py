"""The attention a DETR computed in one forward pass, read through forward hooks (the paper's Figs. 3 and 6).

Why hooks and a second computation: the model calls its attention with `need_weights=False` (the fused,
faster path), so the weights are never formed. A forward hook on the last encoder layer's self-attention
and the last decoder layer's cross-attention receives each call's query, key and padding mask, and
`torch.nn.functional.multi_head_attention_forward` recomputes the head-averaged weights from the module's
own projections. What the forward pass computes and returns is untouched (a test holds its outputs
bit-identical with and without a recorder).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr.model import detector_of


@dataclass(frozen=True)
class AttentionMaps:
    """Head-averaged attention of one forward pass, over the cells of the transformer's feature map."""

    encoder: Tensor  # [B, h*w, h*w]: the last encoder layer's self-attention (row: the attending cell)
    decoder: Tensor  # [B, Q, h*w]: the last decoder layer's cross-attention of each query
    feature_size: tuple[int, int]  # (h, w) of the (padded) feature map; cell i is (i // w, i % w)

    def decoder_map(self, image: int, query: int) -> Tensor:
        """[h, w] attention of one query over the feature map."""
        return self.decoder[image, query].reshape(self.feature_size)

    def encoder_map(self, image: int, cell: tuple[int, int]) -> Tensor:
        """[h, w] self-attention of the cell (row, column) over the feature map."""
        h, w = self.feature_size
        return self.encoder[image, cell[0] * w + cell[1]].reshape(h, w)


def _weights(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor:
    """The head-averaged attention weights [B, L, S] of one call of a batch-first `module`."""
    names = ("query", "key", "value")
    query, key, value = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names))
    transpose = (lambda x: x.transpose(0, 1)) if module.batch_first else (lambda x: x)
    _, weights = F.multi_head_attention_forward(
        transpose(query), transpose(key), transpose(value), module.embed_dim, module.num_heads,
        module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v, module.add_zero_attn,
        0.0, module.out_proj.weight, module.out_proj.bias, training=False,
        key_padding_mask=kwargs.get("key_padding_mask"), need_weights=True, attn_mask=kwargs.get("attn_mask"),
        average_attn_weights=True)
    return weights.float()


class AttentionRecorder:
    """`with AttentionRecorder(model) as recorder: model(images, mask)`, then `recorder.maps()`.

    Works for every DETR this library builds (detection, inside a mask head, two-stage): each has one
    feature map that its encoder and decoder attend over."""

    def __init__(self, model: nn.Module) -> None:
        detector = detector_of(model)
        self._modules = {
            "encoder": detector.transformer.encoder.layers[-1].self_attn,
            "decoder": detector.transformer.decoder.layers[-1].multihead_attn,
        }
        self._projection = detector.input_proj
        self._recorded: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "AttentionRecorder":
        self._recorded.clear()
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._recorder(name), with_kwargs=True))
        self._handles.append(self._projection.register_forward_hook(
            lambda module, args, output: self._recorded.__setitem__("features", output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
            with torch.no_grad():
                self._recorded[name] = _weights(module, args, kwargs)
        return hook

    def maps(self) -> AttentionMaps:
        """The maps of the last forward pass run inside this recorder."""
        missing = [name for name in ("encoder", "decoder", "features") if name not in self._recorded]
        if missing:
            raise RuntimeError(f"no attention recorded ({', '.join(missing)}): run the model inside the recorder")
        h, w = self._recorded["features"].shape[-2:]
        return AttentionMaps(self._recorded["encoder"], self._recorded["decoder"], (int(h), int(w)))


__all__ = ["AttentionMaps", "AttentionRecorder"]
