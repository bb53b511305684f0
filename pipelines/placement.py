"""Where work that touches files may run, on a cluster whose nodes share no disk.

A local path names a file on the driver's disk: a task on another node would not find it, and a file a
task writes there would land on that node's disk, out of everyone's sight. So tasks that read or write
local paths run on the driver's node (as Ray Data's `local://` scheme does), and what they read travels
on through Ray's object store; URIs (`s3://`, `gs://`, ...) are read and written from any node. A folder
that every node must reach (Ray Train's storage path) is checked from every node before work starts.
"""
from __future__ import annotations

import uuid
from typing import Any

from pipelines import storage


def is_local(path: str | None) -> bool:
    return bool(path) and not storage.has_scheme(str(path))


def on_driver_node(num_cpus: float = 0) -> dict[str, Any]:
    """Ray remote arguments that run a task on the driver's node, reserving `num_cpus` only where that node
    offers CPUs at all. Reading files reserves none: the node's CPUs may all be held by other work of the job
    (training workers) or be none (a head started with --num-cpus=0, as KubeRay's), and a pinned task that
    waits for a CPU there would wait for ever."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    if num_cpus:
        offered = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
        num_cpus = min(num_cpus, offered)
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False), "num_cpus": num_cpus}


def driver_node_args(*paths: str | None, num_cpus: float = 0) -> dict[str, Any]:
    """`on_driver_node(num_cpus)` when any of `paths` is local; {} otherwise."""
    return on_driver_node(num_cpus) if any(is_local(p) for p in paths) else {}


def local_uri(path: str) -> str:
    """A local file as Ray Data's `local://` URI (read on the driver's node); URIs unchanged."""
    return f"local://{path}" if is_local(path) else path


def _sees(path: str) -> bool:
    return storage.exists(path)


def nodes_that_cannot_see(folder: str) -> list[str]:
    """The alive Ray nodes (as `node IP (id)`) on which `folder` does not show a file the driver just wrote
    there: a local folder on a cluster whose nodes do not share it. URIs are not checked here (every node
    reaches an object store through the same settings)."""
    if not is_local(folder):
        return []
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = storage.join(folder, f".raydetr-visible-{uuid.uuid4().hex[:12]}")
    storage.write_bytes_atomic(marker, b"")
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(_sees)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        answers = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(marker) for n in nodes])
    finally:
        fs, p = storage.resolve(marker)
        fs.delete_file(p)
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n, seen in zip(nodes, answers) if not seen]
