"""An export folder: a model's graph for a runtime plus everything needed to run it without raydetr.

    OUT/model.onnx            the graph (detr.export: dynamic batch and size, padding mask as an input), float32
                              or with --precision int8 quantised (pipelines.inference.quantize)
    OUT/model_unpadded.onnx   float32: the graph for batches without padding (one image, or images of one
                              size), without the multiplications that keep padding at zero; the runtimes
                              run it for such batches
    OUT/model.xml, model.bin  with --format openvino: OpenVINO's IR of the same graph (float32: also
                              model_unpadded.xml/.bin)
    OUT/raydetr_export.json   what a runtime user needs: inputs and outputs, the preprocessing (evaluation
                              size, normalisation), the classes, how scores are made (softmax or sigmoid) and
                              the default threshold, and which model it came from

Why a folder that describes itself: a team that runs the graph on a CPU fleet in its own service needs the
preprocessing and the score semantics as much as the weights. Writing it checks the graph in its runtime
against PyTorch on a padded batch: an export that does not reproduce the model is refused, not written.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from detr.errors import RaydetrError

FORMATS = ("onnx", "openvino")
PRECISIONS = ("float32", "int8")
METADATA_FILE = "raydetr_export.json"
FORMAT_NAME = "raydetr-export"
FORMAT_VERSION = 1
TOLERANCE = 1e-4
"""Largest difference allowed between the runtime's outputs and PyTorch's (logits, boxes, masks)."""
EXPORT_FILES = (METADATA_FILE, "model.onnx", "model_unpadded.onnx", "model.xml", "model.bin", "model_unpadded.xml",
                "model_unpadded.bin")
"""Every file an export folder may hold."""


def _remove_export_files(out: str) -> None:
    for name in EXPORT_FILES:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def metadata(detector, model_identity: Mapping[str, str], export_format: str, outputs: tuple[str, ...],
             precision: str = "float32", unpadded: bool = False) -> dict:
    """The folder's description of the model it holds."""
    from detr.postprocess import default_score_threshold, scored_by_sigmoid
    from pipelines.inference.detector import transforms_to_metadata

    config = detector.config
    transforms = detector.transforms
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "export_format": export_format,
        "precision": precision,
        "files": {"onnx": "model.onnx", **({"onnx_unpadded": "model_unpadded.onnx"} if unpadded else {}),
                  **({"openvino": "model.xml"} if export_format == "openvino" else {}),
                  **({"openvino_unpadded": "model_unpadded.xml"} if unpadded and export_format == "openvino"
                     else {})},
        "inputs": {"images": "float32 [batch, 3, height, width]: RGB scaled to [0, 1], minus mean, over std, "
                             "zero-padded at the bottom and right",
                   "mask": "bool [batch, height, width]: True on padding"},
        "outputs": {name: _OUTPUT_TEXT[name] for name in outputs},
        "preprocessing": {"eval_size": transforms.eval_size, "eval_max_size": transforms.eval_max_size,
                          "mean": list(transforms.mean), "std": list(transforms.std)},
        "scores": "sigmoid" if scored_by_sigmoid(config) else "softmax",
        "default_score_threshold": default_score_threshold(config),
        "categories": detector.categories or [],
        "model": dict(model_identity),
        "config": config.to_dict(),
        "transforms": transforms_to_metadata(transforms),
    }


_OUTPUT_TEXT = {
    "pred_logits": "float32 [batch, queries, classes + 1]: class logits, the last 'no object'",
    "pred_boxes": "float32 [batch, queries, 4]: (cx, cy, w, h) in [0, 1] of each image's own unpadded size",
    "pred_masks": "float32 [batch, queries, height / 4, width / 4]: mask logits of every query",
}


def write_export(detector, model_identity: Mapping[str, str], out: str, export_format: str = "onnx",
                 threads: int | None = None, precision: str = "float32",
                 calibration: Iterable[np.ndarray] | None = None) -> dict:
    """Export `detector`'s model into the folder `out`, local (created) or on an object store; files of an
    earlier export there are replaced. The graph is checked in its runtime against PyTorch, and the metadata
    written last (on an object store after the model files are uploaded: a folder without it is no export).
    Returns the metadata, with the largest differences measured under `check`. `precision="int8"` quantises
    the graph with the activations' ranges over the `calibration` images (HWC uint8 RGB;
    `pipelines.inference.quantize`)."""
    from pipelines import storage

    if not storage.has_scheme(out):
        return _write_local(detector, model_identity, out, export_format, threads, precision, calibration)
    for name in EXPORT_FILES:  # the metadata first: an earlier export stops being one before its files change
        storage.remove(storage.join(out, name))
    with tempfile.TemporaryDirectory(prefix="raydetr-export-") as folder:
        described = _write_local(detector, model_identity, folder, export_format, threads, precision, calibration)
        for name in export_files(described) + [METADATA_FILE]:
            with open(os.path.join(folder, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(out, name), f.read())
    return described


def _write_local(detector, model_identity: Mapping[str, str], out: str, export_format: str, threads: int | None,
                 precision: str, calibration: Iterable[np.ndarray] | None) -> dict:
    from detr.export import example_batch, export_onnx
    from pipelines.inference.runtimes import check_model_runs_in, check_runtime, file_runner

    if export_format not in FORMATS:
        raise RaydetrError(f"unknown export format {export_format!r}; choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise RaydetrError(f"unknown export precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise RaydetrError("an int8 export needs calibration images (detr export --calibration IMAGES)")
    runtime = "onnxruntime" if export_format == "onnx" else "openvino"
    check_runtime(runtime)
    if precision == "int8":
        check_runtime("onnxruntime")  # ONNX Runtime's quantiser makes the int8 graph for either runtime
    check_model_runs_in(runtime, detector.config)
    os.makedirs(out, exist_ok=True)
    _remove_export_files(out)  # an earlier export's files: a half-written folder is no export
    onnx_file = os.path.join(out, "model.onnx")
    calibrated = None
    if precision == "int8":
        from pipelines.inference.quantize import calibration_batches, quantize_onnx

        with tempfile.TemporaryDirectory(prefix="raydetr-export-") as folder:
            float_file = os.path.join(folder, "float32.onnx")
            outputs = export_onnx(detector.model, float_file)
            calibrated = quantize_onnx(float_file, onnx_file, calibration_batches(detector, calibration))
    else:
        outputs = export_onnx(detector.model, onnx_file)
    unpadded_file = None
    if precision == "float32":
        unpadded_file = os.path.join(out, "model_unpadded.onnx")
        export_onnx(detector.model, unpadded_file, padded=False)
    model_file = onnx_file
    if export_format == "openvino":
        import openvino as ov

        model_file = os.path.join(out, "model.xml")
        ov.save_model(ov.convert_model(onnx_file), model_file, compress_to_fp16=False)
        if unpadded_file is not None:
            ov.save_model(ov.convert_model(unpadded_file), os.path.join(out, "model_unpadded.xml"),
                          compress_to_fp16=False)
            unpadded_file = os.path.join(out, "model_unpadded.xml")
    images, mask = example_batch(((70, 90), (96, 64)))  # padded, and other sizes than the graph was traced at
    with torch.inference_mode():
        expected = detector.forward(images, mask)
    runner = file_runner(runtime, model_file, threads or torch.get_num_threads(), unpadded_file)
    got = runner(images, mask)
    differences = {name: float((got[name] - expected[name]).abs().max()) for name in outputs}
    if unpadded_file is not None:  # the unpadded graph, on a batch of two images of one size
        same, no_padding = example_batch(((80, 100), (80, 100)))
        with torch.inference_mode():
            want = detector.forward(same, no_padding)
        unpadded_got = runner(same, no_padding)
        differences.update({f"{name} (unpadded)": float((unpadded_got[name] - want[name]).abs().max())
                            for name in outputs})
    # float32 must reproduce PyTorch; int8 cannot (a two-stage model may even pick other queries), so there
    # the differences are recorded, its accuracy is `detr evaluate`'s to measure, and only a graph that
    # computes no finite numbers is refused.
    broken = {name: value for name, value in differences.items()
              if not (value <= TOLERANCE if precision == "float32" else torch.isfinite(got[name]).all().item())}
    if broken:
        _remove_export_files(out)
        worst = max(broken, key=broken.get)
        raise RaydetrError(f"the {precision} {export_format} export of {model_identity.get('uri', 'the model')} "
                           f"does not reproduce it in {runtime}: {worst} differs by {broken[worst]:.2g} "
                           + (f"(at most {TOLERANCE:g})" if precision == "float32" else "(not finite)")
                           + "; nothing was written")
    described = metadata(detector, model_identity, export_format, outputs, precision, unpadded_file is not None)
    described["check"] = {"runtime": runtime, "max_abs_difference": differences}
    if calibrated is not None:
        described["calibration"] = {"images": calibrated}
    with open(os.path.join(out, METADATA_FILE), "w") as f:
        json.dump(described, f, indent=2)
    return described


def read_export(folder: str) -> dict[str, Any]:
    """The metadata of an export folder (local or on an object store), checked: ours, a version this raydetr
    reads, its files present."""
    from pipelines import storage

    path = storage.join(folder, METADATA_FILE)
    if not storage.exists(path):
        raise RaydetrError(f"{storage.redact(folder)}: not an export folder (no {METADATA_FILE}; "
                           "`detr export` writes one)")
    try:
        described = json.loads(storage.read_text(path))
    except ValueError as exc:
        raise RaydetrError(f"{storage.redact(path)}: not valid JSON ({exc})") from None
    if not isinstance(described, dict) or described.get("format") != FORMAT_NAME:
        raise RaydetrError(f"{storage.redact(path)}: not a raydetr export (format "
                           f"{described.get('format') if isinstance(described, dict) else None!r})")
    if described.get("format_version", 0) > FORMAT_VERSION:
        raise RaydetrError(f"{storage.redact(path)}: export format version {described['format_version']} is newer "
                           f"than this raydetr reads ({FORMAT_VERSION}); upgrade raydetr or export again")
    missing = [name for name in export_files(described) if not storage.exists(storage.join(folder, name))]
    if missing:
        raise RaydetrError(f"{storage.redact(folder)}: the export is incomplete: {', '.join(missing)} missing")
    return described


def export_files(described: Mapping[str, Any]) -> list[str]:
    """The model files an export folder's metadata says it holds (OpenVINO's IR is two files)."""
    names = list(dict.fromkeys(described.get("files", {}).values()))
    return names + [name.removesuffix(".xml") + ".bin" for name in names if name.endswith(".xml")]


__all__ = ["FORMATS", "METADATA_FILE", "PRECISIONS", "export_files", "read_export", "write_export"]
