"""DETR's encoder-decoder transformer.

It differs from `torch.nn.Transformer` in the ways the paper needs: positional
encodings are added to the queries and keys of every attention layer (object
queries in the decoder, the 2-D image encoding on the memory), values carry no
position, the decoder input starts at zero, and the decoder returns every
layer's (normalised) output so that each can be supervised (auxiliary losses).
Attention is `nn.MultiheadAttention` (torch's fused kernels); the parameter names
match the official checkpoints. Tensors are batch-first: [B, sequence, channels].
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _as_sequences(memory: Tensor, mask: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Memory [B,C,H,W], mask [B,H,W], positions [B,C,H,W] as the decoder takes them: [B,HW,C], [B,HW], [B,HW,C]."""
    return memory.flatten(2).transpose(1, 2), mask.flatten(1), pos_embed.flatten(2).transpose(1, 2)


class TransformerEncoderLayer(nn.Module):
    """Self-attention over image features, then a feed-forward block; post-norm or pre-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _attend(self, x: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        q = k = _with_pos(x, pos)
        return self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            src = src + self.dropout1(self._attend(self.norm1(src), key_padding_mask, pos))
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, key_padding_mask, pos)))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among object queries, cross-attention to the image memory, feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _self_attend(self, x: Tensor, query_pos: Tensor | None) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.self_attn(q, k, value=x, need_weights=False)[0]

    def _cross_attend(
        self, x: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None, pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        return self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        if self.pre_norm:
            tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), query_pos))
            tgt = tgt + self.dropout2(
                self._cross_attend(self.norm2(tgt), memory, memory_key_padding_mask, pos, query_pos)
            )
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, query_pos)))
        tgt = self.norm2(
            tgt + self.dropout2(self._cross_attend(tgt, memory, memory_key_padding_mask, pos, query_pos))
        )
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask=key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """Stack of decoder layers returning each layer's output passed through the final LayerNorm."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        """Returns [num_layers, B, Q, C]."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        # Pre-norm leaves the last encoder output un-normalised, so it gets a final LayerNorm.
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """src [B,C,H,W], mask [B,H,W], query_embed [Q,C], pos_embed [B,C,H,W].

        Returns the decoder outputs of every layer [L,B,Q,C] and the memory [B,C,H,W].
        """
        memory = self.encode(src, mask, pos_embed)
        return self.decode(memory, mask, query_embed, pos_embed), memory

    def encode(self, src: Tensor, mask: Tensor, pos_embed: Tensor) -> Tensor:
        """The encoder alone: src [B,C,H,W] -> memory [B,C,H,W]."""
        bs, c, h, w = src.shape
        memory = self.encoder(src.flatten(2).transpose(1, 2), key_padding_mask=mask.flatten(1),
                              pos=pos_embed.flatten(2).transpose(1, 2))
        return memory.transpose(1, 2).reshape(bs, c, h, w)

    def decode(self, memory: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
               tgt: Tensor | None = None) -> Tensor:
        """The decoder alone over memory [B,C,H,W]; `query_embed` [Q,C] shared by the batch or
        [B,Q,C] per image; `tgt` [B,Q,C] the queries' content (None: zeros, the paper's).
        Returns every layer's output [L,B,Q,C]."""
        bs = memory.shape[0]
        query_pos = query_embed if query_embed.dim() == 3 else query_embed.unsqueeze(0).expand(bs, -1, -1)
        memory_seq, key_mask, pos_seq = _as_sequences(memory, mask, pos_embed)
        return self.decoder(torch.zeros_like(query_pos) if tgt is None else tgt, memory_seq, key_mask, pos_seq,
                            query_pos)
