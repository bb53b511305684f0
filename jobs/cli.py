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
import os
import sys
from types import ModuleType
from typing import Sequence

from detr.errors import RaydetrError

# name -> (module, one-line help). The order is the order `detr --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "the end-to-end demo: data, training, evaluation, promotion, labelling"),
    "make-dataset": ("jobs.make_dataset", "generate a synthetic COCO dataset of shapes"),
    "ingest": ("jobs.ingest", "validate a source and write sharded Parquet with an errors table"),
    "convert": ("jobs.convert", "convert YOLO or Pascal VOC annotations to COCO JSON"),
    "train": ("jobs.train", "train DETR on a Ray cluster (Ray Train), tracked in MLflow"),
    "evaluate": ("jobs.evaluate", "COCO metrics of a model on a labelled dataset, logged to MLflow"),
    "label": ("jobs.label", "label images with a detector into a resumable Parquet dataset (Ray Data)"),
    "export": ("jobs.export", "export a model as ONNX (or OpenVINO IR) with what a runtime needs to run it"),
    "explain": ("jobs.explain", "pictures of what a model attends to: each detection's decoder attention, the "
                                "encoder's at points"),
    "promote": ("jobs.promote", "move a registry alias to a version only if it beats the current holder"),
    "rollback": ("jobs.rollback", "point a registry alias back at its previous holder"),
    "submit": ("jobs.submit", "submit a job (train, label, evaluate, ...) to a Ray cluster"),
    "jobs": ("jobs.job_control", "list, inspect, follow or stop submitted jobs"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their lines (the module docstrings' examples), options show their defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr",
        formatter_class=HelpFormatter,
        description="DETR object detection as Ray jobs: data tools, training, evaluation, "
        "labelling and model promotion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter,
                                    usage=getattr(module, "USAGE", None))
        module.configure_parser(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def add_eval_size_arguments(parser: argparse.ArgumentParser) -> None:
    """`--eval-size`/`--eval-max-size` of the jobs that run a model on images (label, evaluate)."""
    parser.add_argument("--eval-size", type=int, metavar="PIXELS",
                        help="resize images' shorter side to this before the model (default: the model's own, "
                             "800 for the paper's models): smaller is faster and usually less accurate")
    parser.add_argument("--eval-max-size", type=int, metavar="PIXELS",
                        help="longer side at most this (default: the model's ratio to the shorter side, 1333/800)")


# Errors that mean "the input or the environment is wrong": shown as one line, not a traceback, as is any
# OSError that names its file (a folder given for a file, a full disk). Anything else (a KeyError, an
# IndexError, a ValueError the project did not raise on purpose) is a bug: traceback.
USER_ERRORS = (RaydetrError, FileNotFoundError, PermissionError)


def _names_a_file(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.filename is not None


def split_passthrough(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Arguments before the first `--` are ours; those after it belong to a submitted job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, passthrough = split_passthrough(argv)
    args = parser.parse_args(own)
    args.passthrough = passthrough
    if passthrough and not getattr(getattr(args, "_module", None), "ACCEPTS_PASSTHROUGH", False):
        parser.error(f"unexpected arguments after --: {' '.join(passthrough)}")
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return _run(args._module, args, f"detr {args.command}")


def _run(module: ModuleType, args: argparse.Namespace, prog: str) -> int:
    from jobs.tracking import TrackingUnavailableError
    from pipelines.storage import StoreAccessError, StoreUnavailableError

    stated = (TrackingUnavailableError, StoreAccessError, StoreUnavailableError)  # raised with a message for users
    try:
        return int(module.run(args) or 0)
    except (*USER_ERRORS, *stated, OSError) as exc:
        if os.environ.get("RAYDETR_DEBUG") or not (isinstance(exc, (*USER_ERRORS, *stated)) or _names_a_file(exc)):
            raise
        cause = getattr(exc, "cause", None)  # raised in a Ray task: Ray's error wraps it, with the task's traceback
        message = str(cause if isinstance(cause, BaseException) else exc)
        if isinstance(exc, StoreUnavailableError):
            message += " (re-run the same command when it is back: finished work is kept)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ != "AuthenticationError" or os.environ.get("RAYDETR_DEBUG"):  # Ray's, by name: no import
            raise
        advice = ("export RAY_AUTH_MODE=token" if os.environ.get("RAY_AUTH_MODE") != "token"
                  else "check that this is the cluster's token")
        print(f"{prog}: error: the Ray cluster uses token authentication and refused this client: {advice} (the "
              "token: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token)", file=sys.stderr)
        return 1


def module_main(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Run one job module as a program (`python -m jobs.train ...`)."""
    name = module.__spec__.name if module.__spec__ is not None else module.__name__  # not "__main__" under -m
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__, formatter_class=HelpFormatter,
                                     usage=getattr(module, "USAGE", None))
    module.configure_parser(parser)
    own, passthrough = split_passthrough(argv)
    args = parser.parse_args(own)
    args.passthrough = passthrough
    return _run(module, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
