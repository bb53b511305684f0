"""Shared fixtures. `ray_cluster` starts ONE real two-node Ray cluster for the whole session."""
from __future__ import annotations

import os
import tempfile

import pytest

pytest_plugins = ("mlflow_fixtures", "topology")


CLUSTER_FIXTURES = {"ray_cluster", "mlflow_server", "topology", "s3_server"}
"""Session fixtures that start servers and clusters: their tests run in one process."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), every test that uses a cluster or a server
    goes to one worker, in order, so each cluster starts once; the tests that need neither run beside them on the
    other worker, in the CPU time the cluster's tests leave idle while processes start and servers answer."""
    # On the controller `--dist` says so (the option exists where pytest-xdist is installed); a worker, which
    # collects the tests the controller hands out, runs with `dist` "no" and has `workerinput`.
    if config.getoption("dist", "no") == "no" and not hasattr(config, "workerinput"):
        return
    for item in items:
        if CLUSTER_FIXTURES & set(item.fixturenames) or any(item.get_closest_marker(m) for m in ("ray", "mlflow",
                                                                                                  "topology")):
            item.add_marker(pytest.mark.xdist_group("cluster"))


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
