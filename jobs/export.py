"""Export a model for CPU runtimes: an ONNX graph (and OpenVINO's IR) in a folder that describes itself.

    detr export --model models:/shapes-detector@champion --output exports/shapes
    detr export --model checkpoint.pt --format openvino --output exports/shapes-ov

Any model `detr label` accepts. The folder holds model.onnx (dynamic batch, height and width; the padding
mask is an input), with --format openvino also model.xml/.bin, and raydetr_export.json: inputs, outputs,
preprocessing, classes, score semantics and which model it came from. Before anything is written the graph
runs in its runtime against PyTorch; an export that does not reproduce the model is refused. See
pipelines/inference/export_folder.py.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="registry URI, runs:/ID/model, one of our checkpoints or an official DETR checkpoint")
    parser.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx: for ONNX Runtime and any ONNX consumer; openvino: also OpenVINO's IR")
    parser.add_argument("--output", required=True, help="the export folder (created; an earlier export replaced)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs "
                                               "(default: $MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from jobs.model_sources import check_model_spec, load_detector
    from pipelines.inference.export_folder import write_export
    from pipelines.inference.runtimes import check_runtime

    check_model_spec(args.model)
    check_runtime("onnxruntime" if args.format == "onnx" else "openvino")
    loaded, detector = load_detector(args.model, args.tracking_uri)
    described = write_export(detector, loaded.identity(), args.output, args.format)
    worst = max(described["check"]["max_abs_difference"].values())
    print(f"exported {args.model} ({args.format}) to {args.output}: outputs {', '.join(described['outputs'])}; "
          f"{described['check']['runtime']} reproduces PyTorch to {worst:.1g}")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
