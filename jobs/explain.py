"""Pictures of what a model looked at (the paper's Figs. 6 and 3), for a few images.

    detr explain --model models:/shapes-detector@champion --input data/shapes/images --output explained/
    detr explain --model run/model.pt --input photo.jpg --output explained/ --points 120,80 300,200 --top-k 5

For each image of `--input` (anything the pipelines read; `--images N` of them, 8 by default),
OUT/NAME_decoder.png shows the detections with the last decoder layer's attention of each one laid over the
image in that detection's colour, and OUT/NAME_encoder.png the last encoder layer's self-attention at each
`--points` x,y (in the image's pixels), or at each detection's centre when none are given. Any PyTorch model
`detr label` accepts (not an export: the attention is read from the model). It runs here, without Ray: a
few images are seconds of work. An image that cannot be read is one line, and the others go on.
See pipelines/inference/explain.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from detr.errors import RaydetrError
from jobs.cli import module_main


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is x,y in the image's pixels, got {text!r}") from None
    return x, y


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registry URI, runs:/ID/model, or a checkpoint file")
    parser.add_argument("--input", required=True, help="images: a file, folder, glob, archive or dataset")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--points", nargs="+", type=parse_point, metavar="X,Y",
                        help="where the encoder's self-attention is shown (default: each detection's centre)")
    parser.add_argument("--top-k", type=int, default=10, help="at most this many detections per image")
    parser.add_argument("--score-threshold", type=float, help="default: the model's")
    parser.add_argument("--images", type=int, default=8, help="how many images of --input to explain")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs")


def run(args: argparse.Namespace) -> int:
    from jobs.model_sources import check_model_spec, load_detector
    from pipelines.inference.explain import explain_image
    from pipelines.inference.explain_drawing import draw_decoder_attention, plot_encoder_attention
    from pipelines.sources import iter_records, open_source
    from pipelines.validation.decode import decode_image
    from pipelines.validation.errors import PipelineError
    from pipelines.validation.loading import read_record_bytes

    if args.top_k < 1 or args.images < 1:
        raise RaydetrError("--top-k and --images must be at least 1")
    check_model_spec(args.model)
    source = open_source(args.input)
    _, detector = load_detector(args.model, args.tracking_uri)
    os.makedirs(args.output, exist_ok=True)
    written = 0
    for record in iter_records(source):
        if written == args.images:
            break
        key = str(record.get("key", ""))
        try:
            image = decode_image(read_record_bytes(record), key).array
        except PipelineError as exc:
            print(f"skipped {key}: {exc}", file=sys.stderr, flush=True)
            continue
        try:
            explanation = explain_image(detector, image, args.points, args.score_threshold, args.top_k)
        except RaydetrError as exc:  # points outside this image: said, and the next image goes on
            print(f"skipped {key}: {exc}", file=sys.stderr, flush=True)
            continue
        stem = os.path.join(args.output, _safe_name(key))
        draw_decoder_attention(explanation, detector.label_name).save(f"{stem}_decoder.png")
        plot_encoder_attention(explanation, f"{stem}_encoder.png")
        print(f"{key}: {len(explanation.scores)} detections -> {stem}_decoder.png, {stem}_encoder.png", flush=True)
        written += 1
    if not written:
        raise RaydetrError(f"{args.input}: no image there could be explained (see the lines above)")
    return 0


def _safe_name(key: str) -> str:
    """A file name from a record key (a path, an archive member): its last part without the extension."""
    name = os.path.splitext(key.replace("!", "/").rstrip("/").rsplit("/", 1)[-1])[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
