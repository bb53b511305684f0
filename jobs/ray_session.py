"""Connecting a job to Ray: reuse a running session, join a cluster, or start a local one."""
from __future__ import annotations

import math
import os


def connect(address: str | None = None, num_cpus: float | None = None, quiet: bool = False) -> None:
    """`address` None: RAY_ADDRESS or a new local instance; "auto": the running cluster. A new local instance
    gets at least `num_cpus` logical CPUs (a job's workers plus its data pipeline), however few cores the
    machine has: they share the cores rather than wait forever for one. `quiet`: the cluster's processes'
    output stays in its logs (`ray logs`, the dashboard) and Ray's own warnings are not printed: the job
    prints what matters itself."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    output = {"logging_level": "error" if quiet else "warning", "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **output)
    else:
        cpus = max(os.cpu_count() or 1, int(math.ceil(num_cpus or 0)))
        ray.init(include_dashboard=False, num_cpus=cpus, **output)


def restore_working_directory() -> None:
    """Step out of a working directory that no longer exists.

    A job submitted with a `working_dir` runs inside Ray's unpacked copy of it, which Ray may
    garbage-collect once the last worker that shared it exits (seen after `TorchTrainer.fit`
    on a multi-node cluster); libraries that call `os.getcwd()` afterwards (MLflow does when
    logging a model) would fail. Moving to the temporary folder keeps them working; every path
    the jobs use is absolute by then."""
    import tempfile

    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(tempfile.gettempdir())
