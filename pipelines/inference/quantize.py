"""int8 post-training quantisation of an exported DETR: ONNX Runtime's static quantiser, calibrated on images.

Why static and calibrated: a CPU spends DETR's time in the backbone's convolutions and the transformer's
matrix products; int8 versions of them run on the CPU's integer units (VNNI, AMX) when both the weights and
the activations are int8, and an activation's int8 scale must be fixed ahead of time from the ranges it takes
on real images. The user names those images (a few dozen of the kind they will label); the weights are
quantised per output channel. The result is a QDQ graph (QuantizeLinear/DequantizeLinear pairs around each
quantised operator): ONNX Runtime fuses it into integer kernels and OpenVINO reads it as its own int8 model.
What it costs in accuracy is measured by `detr evaluate --runtime` on the export's model and in
bench/RESULTS.md; the graph keeps the float32 one's inputs, outputs and dynamic sizes.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator

import numpy as np
import torch

from detr.errors import RaydetrError

QUANTIZED_OPERATORS = ("Conv", "MatMul", "Gemm")
"""The operators made int8 (the rest, softmax, norms and box arithmetic among them, stay float32)."""
FLOAT_HEADS = ("class_embed", "bbox_embed")
"""Operators of these modules stay float32: the prediction heads, a sliver of the computation whose outputs are
the logits and boxes themselves (OpenVINO's int8 MatMul also fails on them: they run over every decoder layer)."""


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over (images, mask) batches."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._batches: Iterator = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        images, mask = batch
        return {"images": images.float().contiguous().numpy(), "mask": mask.numpy().astype(np.bool_)}

    def rewind(self) -> None:  # the protocol's; one pass is all the min/max calibration needs
        pass


def quantize_onnx(float_file: str, int8_file: str, calibration: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Write `float_file`'s graph quantised to int8 as `int8_file`, the activations' ranges taken over the
    `calibration` batches (normalised images and padding masks, as the graph's inputs); returns how many
    batches calibrated it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = list(calibration)
    if not batches:
        raise RaydetrError("int8 quantisation needs calibration images; none were given")

    class Reader(_Batches, CalibrationDataReader):
        pass

    import onnx

    with tempfile.TemporaryDirectory(prefix="raydetr-int8-") as folder:
        prepared = os.path.join(folder, "prepared.onnx")
        # Constant folding and shape inference first, as ONNX Runtime's quantiser asks (symbolic shapes stay).
        quant_pre_process(float_file, prepared, skip_symbolic_shape=True)
        heads = [node.name for node in onnx.load(prepared).graph.node if any(h in node.name for h in FLOAT_HEADS)]
        quantize_static(prepared, int8_file, Reader(batches), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPERATORS), nodes_to_exclude=heads, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return len(batches)


def calibration_batches(detector, images: Iterable[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each image (HWC uint8 RGB) preprocessed as `detector` does, as a batch of one without padding."""
    for image in images:
        tensor = detector.preprocess(image)
        yield tensor[None], torch.zeros((1, *tensor.shape[1:]), dtype=torch.bool)


__all__ = ["FLOAT_HEADS", "QUANTIZED_OPERATORS", "calibration_batches", "quantize_onnx"]
