"""Generate a synthetic COCO dataset of shapes on textured backgrounds (seeded, fast); with --panoptic,
the backgrounds are stuff regions and the dataset is written in COCO panoptic format too."""
from __future__ import annotations

import argparse
import sys

from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from jobs.synthetic_data import SyntheticConfig

    d = SyntheticConfig()
    parser.add_argument("out", help="output folder: OUT/images/, OUT/train.json (and OUT/val.json)")
    parser.add_argument("--images", type=int, default=d.images, help="number of images")
    parser.add_argument("--classes", type=int, default=d.classes, help="number of shape classes (1-8)")
    parser.add_argument("--min-objects", type=int, default=d.min_objects)
    parser.add_argument("--max-objects", type=int, default=d.max_objects)
    parser.add_argument("--min-object-size", type=int, default=d.min_object_size, help="pixels")
    parser.add_argument("--max-object-size", type=int, default=d.max_object_size, help="pixels")
    parser.add_argument("--min-image-size", type=int, default=d.min_image_size, help="pixels")
    parser.add_argument("--max-image-size", type=int, default=d.max_image_size, help="pixels")
    parser.add_argument("--max-overlap", type=float, default=d.max_overlap, help="largest IoU between two objects")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction written to val.json")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--format", choices=("png", "jpg"), default=d.image_format, dest="image_format")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    parser.add_argument("--panoptic", action="store_true",
                        help="stuff too: background regions of textured stuff classes; writes COCO panoptic "
                        "(OUT/panoptic_train.json + OUT/panoptic_train/*.png) beside the instances JSON")
    parser.add_argument("--stuff-classes", type=int, default=d.stuff_classes, help="panoptic: stuff classes (1-4)")


def run(args: argparse.Namespace) -> int:
    import time

    from jobs.synthetic_data import SyntheticConfig, write_dataset

    config = SyntheticConfig(
        images=args.images, classes=args.classes, min_objects=args.min_objects, max_objects=args.max_objects,
        min_object_size=args.min_object_size, max_object_size=args.max_object_size,
        min_image_size=args.min_image_size, max_image_size=args.max_image_size, max_overlap=args.max_overlap,
        val_fraction=args.val_fraction, seed=args.seed, image_format=args.image_format,
        panoptic=args.panoptic, stuff_classes=args.stuff_classes,
    )
    start = time.perf_counter()
    paths = write_dataset(args.out, config, workers=args.workers)
    elapsed = time.perf_counter() - start
    print(f"wrote {config.images} images in {elapsed:.1f}s ({config.images / max(elapsed, 1e-9):.0f} images/s)")
    for split, path in paths.items():
        print(f"  {split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
