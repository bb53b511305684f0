"""Export a model for CPU runtimes: an ONNX graph (and OpenVINO's IR) in a folder that describes itself.

    detr export --model models:/shapes-detector@champion --output exports/shapes
    detr export --model checkpoint.pt --format openvino --output exports/shapes-ov
    detr export --model checkpoint.pt --precision int8 --calibration data/shapes/images --output exports/int8

Any model `detr label` accepts. The folder holds model.onnx (dynamic batch, height and width; the padding
mask is an input), with --format openvino also model.xml/.bin, and raydetr_export.json: inputs, outputs,
preprocessing, classes, score semantics and which model it came from. Before anything is written the graph
runs in its runtime against PyTorch; an export that does not reproduce the model is refused. `--precision
int8` quantises the graph (ONNX Runtime's static quantiser: int8 weights per channel, activation ranges from
the first `--calibration-images` readable images of `--calibration`, anything the pipelines read). See
pipelines/inference/export_folder.py and pipelines/inference/quantize.py.
"""
from __future__ import annotations

import argparse
import sys

from detr.errors import RaydetrError
from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="registry URI, runs:/ID/model, one of our checkpoints or an official DETR checkpoint")
    parser.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx: for ONNX Runtime and any ONNX consumer; openvino: also OpenVINO's IR")
    parser.add_argument("--precision", choices=("float32", "int8"), default="float32",
                        help="int8: quantised after training, calibrated on --calibration images (faster on CPUs "
                             "with VNNI/AMX; its AP: detr evaluate --runtime on the export)")
    parser.add_argument("--calibration", help="int8: images like those the model will see (a folder, glob, "
                                              "archive, annotated dataset or Parquet; local or object store)")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="int8: how many of them calibrate the activations' ranges")
    parser.add_argument("--output", required=True, help="the export folder, local or on an object store (s3://...; "
                                                        "created; an earlier export there replaced)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs "
                                               "(default: $MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from jobs.model_sources import check_model_spec, load_detector
    from pipelines.inference.export_folder import write_export
    from pipelines.inference.runtimes import check_runtime
    from pipelines.storage import check_reachable

    check_model_spec(args.model)
    check_reachable(args.output)
    check_runtime("onnxruntime" if args.format == "onnx" else "openvino")
    calibration = None
    if args.precision == "int8":
        check_runtime("onnxruntime")
        if not args.calibration:
            raise RaydetrError("--precision int8 needs --calibration IMAGES: images like those the model will see")
        if args.calibration_images < 1:
            raise RaydetrError(f"--calibration-images must be at least 1, got {args.calibration_images}")
        calibration = calibration_images(args.calibration, args.calibration_images)  # read before the model loads
    loaded, detector = load_detector(args.model, args.tracking_uri)
    described = write_export(detector, loaded.identity(), args.output, args.format, precision=args.precision,
                             calibration=calibration)
    differences = described["check"]["max_abs_difference"]
    if args.precision == "int8":
        how = (f"int8, calibrated on {described['calibration']['images']} images (its AP: detr evaluate; "
               f"largest box difference from PyTorch's float32 {differences['pred_boxes']:.1g})")
    else:
        how = f"{described['check']['runtime']} reproduces PyTorch to {max(differences.values()):.1g}"
    print(f"exported {args.model} ({args.format}) to {args.output}: outputs {', '.join(described['outputs'])}; "
          f"{how}")
    return 0


def calibration_images(source: str, count: int) -> list:
    """The first `count` images of `source` that decode (HWC uint8 RGB); unreadable ones are skipped."""
    from pipelines.sources import iter_records, open_source
    from pipelines.validation.loading import first_images

    images = [decoded.array for _, decoded in first_images(iter_records(open_source(source)), count)]
    if not images:
        raise RaydetrError(f"{source}: no image there could be read to calibrate the int8 export")
    return images


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
