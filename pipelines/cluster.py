"""Connecting a job to Ray: reuse a running session, join a cluster, or start a local one."""
from __future__ import annotations

import os


def connect(address: str | None = None) -> None:
    """`address` None: RAY_ADDRESS or a new local instance; "auto": the running cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(include_dashboard=False, logging_level="warning")
