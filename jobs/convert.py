"""Convert YOLO label folders or Pascal VOC XML to a COCO instances JSON."""
from __future__ import annotations

import argparse
import sys

from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=("yolo", "voc"), help="input format")
    parser.add_argument("source", help="YOLO root (images/, labels/) or VOC root (Annotations/, JPEGImages/)")
    parser.add_argument("out", help="output COCO JSON; errors go to OUT.errors.parquet beside it")
    parser.add_argument("--classes", help="class names file, one per line (YOLO default: classes.txt "
                                          "or data.yaml; VOC default: sorted names found)")


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipelines.tools.convert import convert, errors_path_for

    coco, errors = convert(args.format, args.source, args.out, args.classes)
    print(f"{len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories -> {args.out}")
    for reason, n in sorted(Counter(e.reason for e in errors).items()):
        print(f"  rejected {reason:24s} {n}")
    print(f"errors table: {errors_path_for(args.out)}")
    images = args.source.rstrip("/") + ("/images" if args.format == "yolo" else "/JPEGImages")
    print(f"its file names are relative to {images}: give that as --images (ingest, evaluate, label) or "
          "data.train_images / data.val_images (training)")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
