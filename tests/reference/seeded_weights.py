"""Deterministic, seed-defined weights for reference fixtures.

The fixtures under ``tests/fixtures/official/`` do not contain network weights. Each stores
an integer seed and the ordered list of state-dict keys with their shapes; the weights are
regenerated here, bit for bit, and the fixture's per-tensor checksums guard against drift.

Generation rule (the contract; changing it invalidates every fixture):

* one ``numpy.random.Generator(numpy.random.PCG64(seed))``; the keys are visited in the given
  order and every floating tensor consumes exactly ``prod(shape)`` draws of
  ``rng.uniform(low, high, size=n)`` (C order), nothing else is drawn;
* values are rounded to float16 and stored as float32, so a float16 round trip is exact;
* integer buffers (``num_batches_tracked``) are zeros of dtype int64 and consume no draws;
* ``(low, high)`` depends on the kind of parameter, read from its key (see ``bounds_for`` and
  ``segments_for``; ``in_proj_weight`` is drawn as two consecutive pieces, query+key rows then
  value rows):

  ==============================================  =======================================
  kind                                            range
  ==============================================  =======================================
  conv / linear weight (ndim >= 2)                +-gain*sqrt(3/fan_in), fan_in=prod(shape[1:])
    - backbone convolutions (``backbone.`` 4-D)   gain ``BACKBONE_CONV_GAIN``
    - ``class_embed`` weight                      gain ``CLASS_EMBED_GAIN``
    - ``bbox_embed`` weights                      gain ``BBOX_EMBED_GAIN``
    - query/key rows of ``in_proj_weight``        gain ``ATTENTION_QK_GAIN`` (value rows: ``LINEAR_GAIN``)
    - everything else                             gain ``LINEAR_GAIN``
  batch-norm weight / bias                        [0.5, 1.5] / +-0.1
  batch-norm running_mean / running_var           +-0.1 / [0.5, 1.5]
  layer-norm weight / bias                        [0.8, 1.2] / +-0.1
  group-norm weight / bias (module ``gn<digits>``)  [0.8, 1.2] / +-0.1
  ``query_embed`` weight                          +-1.7
  ``row_embed`` / ``col_embed`` weight            [0, 1]
  any other bias or 1-D tensor                    +-0.1
  ==============================================  =======================================

  A module is a batch norm when the key list also holds ``<module>.running_var``; it is a
  layer norm when its last name component contains ``norm`` and it is not a batch norm; it is
  a group norm (the panoptic mask head's ``mask_head.gn1`` ... ``gn5``) when its last name
  component is ``gn`` followed by digits. (The group-norm rule was added with the panoptic
  fixtures; no earlier fixture has such keys, so their weights are unchanged.)

These ranges keep a random DETR non-degenerate: activations neither explode nor vanish through
a ResNet-18/34/50/101, and the per-query class scores and boxes differ clearly.

Checksums are the float64 sum of a tensor and of its absolute values. For generated tensors
(float16 values) both sums are exact in float64, so they do not depend on summation order.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "BACKBONE_CONV_GAIN",
    "LINEAR_GAIN",
    "CLASS_EMBED_GAIN",
    "BBOX_EMBED_GAIN",
    "ATTENTION_QK_GAIN",
    "bounds_for",
    "segments_for",
    "generate_state_dict",
    "checksums",
    "state_dict_from_fixture",
]

BACKBONE_CONV_GAIN = 0.9
LINEAR_GAIN = 1.0
ATTENTION_QK_GAIN = 4.0
CLASS_EMBED_GAIN = 3.0
BBOX_EMBED_GAIN = 2.0


def _module_and_leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def bounds_for(key: str, shape: Sequence[int], all_keys: Iterable[str] = ()) -> tuple[float, float] | None:
    """The uniform range ``(low, high)`` used for ``key``, or None for an integer buffer.

    ``all_keys`` is the full key list (used to recognise batch-norm modules by their
    ``running_var`` sibling)."""
    shape = [int(s) for s in shape]
    module, leaf = _module_and_leaf(key)
    if leaf == "num_batches_tracked":
        return None
    keys = all_keys if isinstance(all_keys, (set, frozenset)) else set(all_keys)
    is_bn = leaf in ("running_mean", "running_var") or f"{module}.running_var" in keys
    last = module.rpartition(".")[2]

    if is_bn:
        return {
            "weight": (0.5, 1.5),
            "bias": (-0.1, 0.1),
            "running_mean": (-0.1, 0.1),
            "running_var": (0.5, 1.5),
        }.get(leaf, (-0.1, 0.1))
    if ("norm" in last or re.fullmatch(r"gn\d+", last)) and len(shape) == 1:
        return (0.8, 1.2) if leaf == "weight" else (-0.1, 0.1)
    if last == "query_embed" or module.endswith("query_embed"):
        return (-1.7, 1.7)
    if last in ("row_embed", "col_embed"):
        return (0.0, 1.0)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        if key.startswith("backbone.") and len(shape) == 4:
            gain = BACKBONE_CONV_GAIN
        elif module == "class_embed" or module.endswith(".class_embed"):
            gain = CLASS_EMBED_GAIN
        elif module.startswith("bbox_embed.") or ".bbox_embed." in module:
            gain = BBOX_EMBED_GAIN
        else:
            gain = LINEAR_GAIN
        bound = gain * math.sqrt(3.0 / fan_in)
        return (-bound, bound)
    return (-0.1, 0.1)


def segments_for(key: str, shape: Sequence[int], all_keys: Iterable[str] = ()) -> list[tuple[int, float, float]]:
    """How ``key`` is drawn: consecutive ``(count, low, high)`` pieces in C order (their counts
    add up to ``prod(shape)``); empty for an integer buffer. Only the packed attention
    projection ``in_proj_weight`` (rows: query, key, value) has more than one piece: its query
    and key rows use gain ``ATTENTION_QK_GAIN`` (sharper attention, so different object queries
    look at different places), its value rows ``LINEAR_GAIN``."""
    shape = [int(s) for s in shape]
    bounds = bounds_for(key, shape, all_keys)
    if bounds is None:
        return []
    n = math.prod(shape)
    _, leaf = _module_and_leaf(key)
    if leaf == "in_proj_weight" and len(shape) == 2 and shape[0] % 3 == 0:
        per_row = shape[1]
        qk_bound = ATTENTION_QK_GAIN * math.sqrt(3.0 / per_row)
        qk = 2 * (shape[0] // 3) * per_row
        return [(qk, -qk_bound, qk_bound), (n - qk, bounds[0], bounds[1])]
    return [(n, bounds[0], bounds[1])]


def generate_state_dict(keys_and_shapes: list[tuple[str, list[int]]], seed: int) -> dict[str, torch.Tensor]:
    """Regenerate the state dict for ``keys_and_shapes`` (ordered ``(key, shape)`` pairs) and
    ``seed``. Floating tensors are float32 holding float16-representable values; integer
    buffers are int64 zeros. The result is an ordinary dict in the given key order."""
    pairs = [(str(k), [int(s) for s in shape]) for k, shape in keys_and_shapes]
    all_keys = frozenset(k for k, _ in pairs)
    if len(all_keys) != len(pairs):
        raise ValueError("duplicate keys")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    out: dict[str, torch.Tensor] = {}
    for key, shape in pairs:
        pieces = segments_for(key, shape, all_keys)
        if not pieces:
            out[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        values = np.concatenate([rng.uniform(low, high, size=count) for count, low, high in pieces])
        values = values.astype(np.float16).astype(np.float32).reshape(shape)
        out[key] = torch.from_numpy(np.ascontiguousarray(values))
    return out


def checksums(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """``{key: (float64 sum, float64 sum of absolute values)}`` for every tensor."""
    result = {}
    for key, tensor in state_dict.items():
        t = tensor.detach().to(torch.float64)
        result[key] = (float(t.sum()), float(t.abs().sum()))
    return result


def state_dict_from_fixture(weights: dict, check: bool = True) -> dict[str, torch.Tensor]:
    """Regenerate the weights described by a fixture's ``weights`` entry
    (``{"seed", "keys", "shapes", "checksums"}``) and, with ``check``, raise if any checksum
    differs from the stored one."""
    pairs = list(zip(weights["keys"], weights["shapes"]))
    state_dict = generate_state_dict(pairs, weights["seed"])
    if check:
        expected = weights["checksums"]
        got = checksums(state_dict)
        bad = [k for k in state_dict if tuple(float(v) for v in expected[k]) != got[k]]
        if bad:
            raise ValueError(f"seeded weights drifted for {len(bad)} tensors, e.g. {bad[:3]}")
    return state_dict
