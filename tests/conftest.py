"""Shared fixtures. `ray_cluster` starts ONE real two-node Ray cluster for the whole session."""
from __future__ import annotations

import os
import tempfile

import pytest

pytest_plugins = ("mlflow_fixtures", "topology")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Code run in-process (a labelling actor, an evaluation actor) sets torch's thread count for its
    process; restore it so later tests compute with the same thread count (float sums depend on it)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster: a head node and one worker node (2 nodes), shared by all tests.

    Yields the `ray.cluster_utils.Cluster`; the driver is connected (`ray.init(address=...)`).
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray keeps sessions, sockets and logs under $RAY_TMPDIR/ray: a fresh temp dir per test session.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raytest-")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    # Logical CPUs: 2 per node, so two training workers and Ray Data's tasks fit together.
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
