"""Point a registered model's alias back at the version that held it before.

    detr rollback --name shapes --alias champion

Uses the alias history that `detr promote` keeps on the registered model; the
rolled-back version is tagged with when and from what it was rolled back.
"""
from __future__ import annotations

import argparse
import sys
import time

from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")


def rollback(name: str, alias: str = "champion", tracking_uri: str | None = None) -> tuple[str, str]:
    """Returns (version rolled back from, version the alias now points at)."""
    from jobs.registry import client_for, roll_back_alias
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    ensure_tracking_available(uri)
    client = client_for(uri)
    current, previous = roll_back_alias(client, name, alias)
    client.set_model_version_tag(name, current, f"raydetr.rollback.{alias}",
                                 f"replaced by v{previous} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    return current, previous


def run(args: argparse.Namespace) -> int:
    from jobs.tracking import resolve_tracking_uri

    print(f"MLflow registry: {resolve_tracking_uri(args.tracking_uri)}", flush=True)  # which store, said first
    current, previous = rollback(args.name, args.alias, args.tracking_uri)
    print(f"{args.name}: alias {args.alias!r} moved back from v{current} to v{previous}")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
