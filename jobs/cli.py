"""The `detr` command line: one subcommand per job or tool.

Each subcommand lives in its own module under `jobs/` and exposes
`configure_parser(parser)` and `run(args) -> int`. Those modules keep their
top-level imports light (torch, Ray and MLflow are imported inside `run`) so
that `detr --help` answers at once. Every job module also runs on its own as
`python -m jobs.<name> ...`, which is the form submitted to a Ray cluster.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

# name -> (module, one-line help). The order is the order `detr --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-dataset": ("jobs.make_dataset", "generate a synthetic COCO dataset of shapes"),
    "ingest": ("jobs.ingest", "validate a source and write sharded Parquet with an errors table"),
    "convert": ("jobs.convert", "convert YOLO or Pascal VOC annotations to COCO JSON"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr",
        description="DETR object detection as Ray jobs: data tools, training, evaluation, "
        "labelling and model promotion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.configure_parser(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


def module_main(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Run one job module as a program (`python -m jobs.train ...`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module.__name__}", description=module.__doc__)
    module.configure_parser(parser)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
