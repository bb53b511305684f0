"""Convert YOLO label folders or Pascal VOC XML to a COCO instances JSON.

    detr convert yolo data/yolo data/yolo.json      # file names relative to data/: use the JSON as it is
    detr convert voc VOC2012 elsewhere/voc.json     # images outside the JSON's folder: give --images too

Jobs look a COCO JSON's images up under the JSON's own folder. When the images lie under OUT's folder,
the file names are written relative to it, so nothing else is needed; otherwise they are relative to the
images folder (YOLO's ROOT/images, VOC's ROOT/JPEGImages), and the command says to pass it as --images.
"""
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

    from pipelines.tools.convert import convert, errors_path_for, images_folder, images_under_json

    coco, errors = convert(args.format, args.source, args.out, args.classes)
    print(f"{len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories -> {args.out}")
    for reason, n in sorted(Counter(e.reason for e in errors).items()):
        print(f"  rejected {reason:24s} {n}")
    print(f"errors table: {errors_path_for(args.out)}")
    images = images_folder(args.format, args.source.rstrip("/"))
    if images_under_json(images, args.out) is not None:
        print(f"its file names are relative to its own folder: jobs read {args.out} as it is")
    else:
        print(f"its file names are relative to {images}, outside the JSON's folder: give that as --images "
              "(ingest, evaluate, label) or data.train_images / data.val_images (training)")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
