"""Validate any image source and write it as sharded Parquet with a manifest and an errors table."""
from __future__ import annotations

import argparse
import sys

from detr.errors import RaydetrError
from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from pipelines.tools.ingest import IngestOptions
    from pipelines.validation.decode import DecodeLimits

    parser.add_argument("source", help="COCO JSON, YOLO or VOC folder, image folder or glob, archive(s), "
                                       "or ingested shards; local path or URI (s3://, gs://, ...)")
    parser.add_argument("out", help="output folder or URI")
    parser.add_argument("--kind", choices=("coco", "yolo", "voc", "folder", "archive", "parquet"),
                        help="source kind (default: detected)")
    parser.add_argument("--images", help="image folder of a COCO JSON (default: the JSON's folder)")
    parser.add_argument("--classes", help="class names file (YOLO, VOC)")
    parser.add_argument("--rows-per-shard", type=int, default=IngestOptions.rows_per_shard)
    parser.add_argument("--max-pixels", type=int, default=DecodeLimits.max_pixels,
                        help="reject images with more pixels (decompression bombs)")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="read images named outside their folder (absolute or '..' paths in an annotation file, links out "
                             "of a local folder); refused as unsafe_path by default")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def run(args: argparse.Namespace) -> int:
    from jobs.ray_session import connect
    from pipelines.sources import open_source
    from pipelines.storage import check_reachable
    from pipelines.tools.ingest import IngestOptions, ingest
    from pipelines.validation.decode import DecodeLimits

    source = open_source(args.source, args.kind, images=args.images, classes=args.classes,
                         allow_outside_paths=args.allow_outside_paths)
    check_reachable(args.out)
    connect(args.address)
    options = IngestOptions(rows_per_shard=args.rows_per_shard, limits=DecodeLimits(max_pixels=args.max_pixels))
    result = ingest(source, args.out, options)
    print(result.summary.format())
    if result.summary.images_kept == 0:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(result.summary.rejected.items())) or "no images"
        raise RaydetrError(f"{args.source}: no image was kept ({reasons}); the errors table is {args.out}/errors/"
                           + ("" if args.images else " (a COCO JSON's file names are relative to its folder, or "
                                                     "to --images)"))
    print(f"{result.manifest['rows']} rows in {len(result.manifest['shards'])} shards "
          f"({result.skipped_units} units already done) -> {args.out}; errors table: {args.out}/errors/")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
