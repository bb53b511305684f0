"""What an exported model costs in accuracy: COCO AP of one trained model in each runtime and precision.

    python bench/export_accuracy.py --model bench/results/convergence_5min_fast.pt [--data bench/results/shapes]
                                    [--calibration-images 32] [--threads 2]

The model (a raydetr checkpoint: `bench/convergence.py --save-models` writes one per recipe) is evaluated on
the held-out split of the dataset it was trained on (`--data`: a folder with train.json and val.json), with
the same preprocessing, padded batches and post-processing in every row: PyTorch float32 (the baseline), its
ONNX export (`detr export`) in ONNX Runtime and OpenVINO, and its int8 export (`detr export --precision int8`,
calibrated on the first `--calibration-images` training images) in both (OpenVINO left out for a model it
refuses: a two-stage one with proposal NMS, the fast recipe's; `--without-proposal-nms` evaluates such a model
with its proposal NMS off in every row, which OpenVINO runs: the same trained weights, duplicates left in).
Prints AP, AP50, the AP each row
loses against PyTorch and the seconds per image on these small images (speed at the paper's sizes:
bench/runtime_speed.py); figures belong in bench/RESULTS.md with the date and the CPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr.checkpoint import read_checkpoint_file  # noqa: E402
from detr.errors import RaydetrError  # noqa: E402
from detr.evaluation import evaluate_coco  # noqa: E402
from jobs.export import calibration_images  # noqa: E402
from pipelines.inference.detector import Detector  # noqa: E402
from pipelines.inference.export_folder import write_export  # noqa: E402
from pipelines.inference.runtimes import check_model_runs_in, file_runner  # noqa: E402
from pipelines.sources import open_source  # noqa: E402
from pipelines.training.torch_dataset import DetectionTorchDataset, collate_skipping_rejected  # noqa: E402


def evaluate(forward, postprocess, batches: list, val_json: str) -> tuple[dict, float]:
    """COCO stats of `forward`'s detections on `batches`, and its seconds per image."""
    detections, seconds, images = {}, 0.0, 0
    with torch.inference_mode():
        for batch_images, mask, targets in batches:
            start = time.perf_counter()
            outputs = forward(batch_images, mask)
            seconds += time.perf_counter() - start
            images += len(targets)
            sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets])
            for target, found in zip(targets, postprocess(outputs, sizes)):
                detections[int(target["image_id"])] = found
    return evaluate_coco(val_json, detections), seconds / max(images, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a raydetr checkpoint trained on --data")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "results" / "shapes")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--without-proposal-nms", action="store_true",
                        help="a two-stage model's proposals without NMS in every row (so OpenVINO runs it too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = read_checkpoint_file(args.model)
    if args.without_proposal_nms and (checkpoint["config"].get("two_stage") or {}).get("nms"):
        checkpoint["config"]["two_stage"]["nms"] = 0.0
        print("proposal NMS off in every row (--without-proposal-nms)")
    detector = Detector.from_checkpoint(checkpoint)
    val_json, train_json = str(args.data / "val.json"), str(args.data / "train.json")
    val_set = DetectionTorchDataset(open_source(val_json), train=False, transforms=detector.transforms)
    batches = list(DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate_skipping_rejected))
    identity = {"uri": args.model}
    runtimes = ["onnxruntime", "openvino"]
    try:
        check_model_runs_in("openvino", detector.model.config)
    except RaydetrError as refused:  # the fast recipe's two-stage model with proposal NMS
        print(f"openvino left out: {refused}")
        runtimes.remove("openvino")
    export_format = "openvino" if "openvino" in runtimes else "onnx"
    with tempfile.TemporaryDirectory() as folder:
        write_export(detector, identity, f"{folder}/float32", export_format, threads=args.threads)
        described = write_export(detector, identity, f"{folder}/int8", export_format, threads=args.threads,
                                 precision="int8",
                                 calibration=calibration_images(train_json, args.calibration_images))
        rows = {"torch float32": detector.forward}
        files = {"onnxruntime": "model.onnx", "openvino": "model.xml"}
        for precision in ("float32", "int8"):
            for runtime in runtimes:
                rows[f"{runtime} {precision}"] = file_runner(runtime, f"{folder}/{precision}/{files[runtime]}",
                                                             args.threads)
        postprocess = detector.postprocess()
        results = {name: evaluate(forward, postprocess, batches, val_json) for name, forward in rows.items()}

    print(f"{args.model}: {len(val_set)} held-out images at {detector.transforms.eval_size} px, batches of "
          f"{args.batch_size}, {args.threads} threads; int8 calibrated on {described['calibration']['images']} "
          "training images")
    base = results["torch float32"][0]
    print(f"{'runtime, precision':<22} {'AP':>6} {'AP50':>6} {'AP lost':>8} {'s/image':>8}")
    for name, (stats, seconds) in results.items():
        print(f"{name:<22} {stats['AP']:6.3f} {stats['AP50']:6.3f} {base['AP'] - stats['AP']:8.4f} {seconds:8.4f}")


if __name__ == "__main__":
    main()
