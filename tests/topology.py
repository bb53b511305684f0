"""The production topology, started once per test session: Ray nodes that share no disk, an S3-compatible
object store, and MLflow on PostgreSQL with its artifacts on that store.

- `S3Server`: moto's standalone server (the S3 protocol over HTTP on 127.0.0.1). It enforces IAM
  authentication, so wrong credentials are refused as a real store refuses them; the project reaches it
  only through the standard AWS settings (`AWS_ENDPOINT_URL`, access keys, region).
- MLflow: `cluster/mlflow_server.sh start --postgres --artifacts s3://...`, the documented team setup.
- `SharedNothingCluster`: a Ray head (`ray start --head`, this process's mount namespace) and a worker
  node started under `unshare --mount` with an empty tmpfs over pytest's base temporary folder, so its
  processes cannot see any test's files, the drivers' temporary folders or their downloads. The
  virtual environment stays visible, as an installed image is on a real node. Nodes use Ray's token
  authentication; their AWS credentials come from their environment, as from a node's instance role.

Drivers run as subprocesses (`detr ...`), as a user runs them, with `Topology.env()`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REGION = "us-east-1"
HEAD_RESOURCE = "topology_head"
ISOLATED_RESOURCE = "topology_isolated"
# A tracking server with S3 artifacts hands clients presigned S3 URLs to download from; moto's IAM check
# cannot verify presigned requests (it wants an Authorization header), so here downloads stream through the
# server, MLflow's other documented mode.
NO_PRESIGNED_DOWNLOADS = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_groups(processes: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM the leaders of process groups started with start_new_session=True (each stops its children), all
    at once, give them `timeout` seconds together, then SIGKILL what is left of every group."""
    for process in processes:
        if process.poll() is None:
            try:
                process.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop_group(process: subprocess.Popen, timeout: float = 10) -> None:
    _stop_groups([process], timeout)


def _wait_for(check, what: str, log: Path | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


class OutageProxy:
    """A TCP proxy in front of a server: `cut()` drops every connection and refuses new ones, as a store
    that went down does; `restore()` accepts them again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.connections.discard(source)


class S3Server:
    """moto's S3 server on 127.0.0.1 with IAM authentication enforced; `credentials` are a real IAM
    user's access key that may do anything on S3."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proxy = OutageProxy(self.port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"  # clients reach the store through the proxy
        self.log = root / "moto.log"
        self.process: subprocess.Popen | None = None
        self.credentials: dict[str, str] = {}

    def start(self) -> "S3Server":
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the setup below, then IAM is enforced
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        _wait_for(self._answers, "moto S3 server", self.log)
        self.proxy.restore()
        if not self.credentials:
            self.credentials = self._create_user()
        return self

    def _answers(self) -> bool:
        try:  # a connection, not a request: requests before the setup would count against it
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _create_user(self) -> dict[str, str]:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="raydetr")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="raydetr", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="raydetr")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def env(self) -> dict[str, str]:
        """The standard settings every AWS SDK (boto3, pyarrow's S3) reads."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true", **self.credentials}

    @contextmanager
    def environment(self):
        """This process reaches the store through the standard settings while the block runs."""
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self):
        import boto3

        e = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=e["AWS_ACCESS_KEY_ID"], aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])

    def use(self, monkeypatch) -> None:
        """Point this process's AWS settings at the store for one test (pyarrow reads them when a file system is
        made)."""
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)

    def put(self, uri: str, data: bytes) -> None:
        bucket, key = uri[len("s3://"):].split("/", 1)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_folder(self, folder: Path, uri: str) -> str:
        """Copy a local folder's files under `uri` (s3://bucket/prefix); returns `uri`."""
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")
        return uri

    def keys(self, uri: str) -> list[str]:
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def go_down(self) -> None:
        """The store goes away: open connections drop, new ones are refused."""
        self.proxy.cut()

    def come_back(self) -> None:
        self.proxy.restore()

    def stop(self) -> None:
        self.proxy.cut()
        if self.process is not None:
            _stop_group(self.process)


class MlflowOnPostgres:
    """`cluster/mlflow_server.sh start --postgres --artifacts s3://...`: PostgreSQL backend, artifacts on S3."""

    def __init__(self, state_dir: Path, s3: S3Server, artifacts: str) -> None:
        self.state_dir, self.s3, self.artifacts = state_dir, s3, artifacts
        self.port, self.pg_port = free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.s3.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "RAYDETR_MLFLOW_DIR": str(self.state_dir)}

    def start(self) -> "MlflowOnPostgres":
        done = subprocess.run(["bash", "cluster/mlflow_server.sh", "start", "--postgres", "--pg-port", str(self.pg_port),
                               "--port", str(self.port), "--artifacts", self.artifacts, "--workers", "1"],
                              cwd=ROOT, env=self._env(), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            log = self.state_dir / "server.log"
            raise RuntimeError(f"mlflow_server.sh failed:\n{done.stdout}\n{done.stderr}\n"
                               f"{log.read_text()[-3000:] if log.exists() else ''}")
        return self

    def stop(self) -> None:
        subprocess.run(["bash", "cluster/mlflow_server.sh", "stop"], cwd=ROOT, env=self._env(), capture_output=True,
                       timeout=120)


class SharedNothingCluster:
    """A Ray head and a worker node whose processes see an empty folder where `hidden` is."""

    def __init__(self, ray_dir: Path, hidden: Path, node_env: dict[str, str], head_cpus: int = 1,
                 worker_cpus: int = 3) -> None:
        # A head with one CPU, as clusters keep their head light: a job's second actor or training worker
        # must run on the isolated node.
        self.ray_dir, self.hidden = ray_dir, hidden
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, **node_env, **NO_PRESIGNED_DOWNLOADS, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # nothing of this session's
            self.env.pop(name, None)
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.address = ""
        self.processes: list[subprocess.Popen] = []

    def _start(self, command: str, log: Path) -> None:
        with open(log, "ab") as out:
            self.processes.append(subprocess.Popen(["sh", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                                   env=self.env, start_new_session=True, cwd=ROOT))

    def start(self) -> "SharedNothingCluster":
        ray = BIN / "ray"
        head_log, worker_log = self.ray_dir / "head.log", self.ray_dir / "worker.log"
        self._start(f"exec {ray} start --head --block --port={self.port} --num-cpus={self.head_cpus} "
                    f"--resources='{{\"{HEAD_RESOURCE}\": 1}}' --temp-dir={self.ray_dir / 'ray'} "
                    f"--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port={self.dashboard_port} "
                    f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()} "
                    "--disable-usage-stats", head_log)
        current = self.ray_dir / "ray" / "ray_current_cluster"
        _wait_for(current.exists, "the Ray head node", head_log)
        self.address = current.read_text().strip()
        # The worker node: its own mount namespace with an empty tmpfs over the tests' folders, and one over the
        # head's Ray folder, so that it keeps its sessions, logs and runtime environments (unpacked working
        # dirs) on a disk of its own, as a real node does: sharing one, the two nodes' runtime-env agents
        # deleted each other's unpacked working dirs under running jobs.
        self._start(f"unshare --mount --propagation private sh -c 'mount -t tmpfs tmpfs {self.hidden} && "
                    f"mount -t tmpfs tmpfs {self.ray_dir / 'ray'} && "
                    f"exec {ray} start --block --address={self.address} --num-cpus={self.worker_cpus} "
                    f"--resources=\"{{\\\"{ISOLATED_RESOURCE}\\\": 1}}\" "
                    f"--dashboard-agent-listen-port={free_port()} --disable-usage-stats'", worker_log)
        _wait_for(self._both_nodes_alive, "the isolated Ray worker node", worker_log)
        return self

    def _both_nodes_alive(self) -> bool:
        done = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        return f"1.0 {ISOLATED_RESOURCE}" in done.stdout and f"1.0 {HEAD_RESOURCE}" in done.stdout

    def stop(self) -> None:
        _stop_groups(list(reversed(self.processes)))


@dataclass
class Topology:
    cluster: SharedNothingCluster
    s3: S3Server
    mlflow: MlflowOnPostgres
    bucket: str  # s3://bucket for the tests' data and outputs
    driver_tmp: Path  # the drivers' TMPDIR: hidden from the isolated node
    logs: list[str] = field(default_factory=list)  # what every job printed (searched for credentials)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.uri

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: the cluster's address and token, S3 settings, the tracking server."""
        return {**self.cluster.env, "RAY_ADDRESS": self.cluster.address, "MLFLOW_TRACKING_URI": self.mlflow.uri,
                "MLFLOW_REGISTRY_URI": self.mlflow.uri,
                "TMPDIR": str(self.driver_tmp), "PYTHONUNBUFFERED": "1", **NO_PRESIGNED_DOWNLOADS, **extra}

    def detr(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None
             ) -> subprocess.CompletedProcess:
        """Run the `detr` command line as a user would, against this topology."""
        done = subprocess.run([str(BIN / "detr"), *args], env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.driver_tmp)
        self.logs += [done.stdout, done.stderr]
        if check:
            assert done.returncode == 0, f"detr {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
        return done

    def actor_classes_on_isolated_node(self) -> list[str]:
        """The class names of every actor (alive or dead) that ran on the isolated node, from Ray's state API."""
        script = ("import json, sys\n"
                  "from ray.util.state import list_actors, list_nodes\n"
                  "nodes = list_nodes(address=sys.argv[1], detail=True)\n"
                  f"isolated = {{n.node_id for n in nodes if '{ISOLATED_RESOURCE}' in (n.resources_total or {{}})}}\n"
                  "actors = list_actors(address=sys.argv[1], detail=True, limit=10000)\n"
                  "print(json.dumps([a.class_name for a in actors if a.node_id in isolated]))\n")
        done = subprocess.run([sys.executable, "-c", script, self.cluster.dashboard], env=self.env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def uri(self, *parts: str) -> str:
        return "/".join([self.bucket, *parts])


def _can_isolate() -> str | None:
    if sys.platform != "linux":
        return "needs Linux mount namespaces"
    if os.geteuid() != 0:
        return "needs root for `unshare --mount` and to run PostgreSQL as its own user"
    for tool in ("unshare", "initdb", "pg_ctl", "runuser"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"needs {tool} on the PATH"
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server for the whole session (the topology's store too); each test makes its own buckets."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def topology(tmp_path_factory, s3_server):
    """The shared-nothing cluster, S3 and MLflow on PostgreSQL, for the whole session."""
    reason = _can_isolate()
    if reason:
        pytest.fail(f"the production topology {reason}")
    hidden = tmp_path_factory.getbasetemp()
    # Outside the hidden folder: Ray's sockets (short paths) and PostgreSQL (its user must reach it).
    state = Path(tempfile.mkdtemp(prefix="rdt-", dir="/tmp"))
    state.chmod(0o755)
    driver_tmp = hidden / "driver-tmp"
    driver_tmp.mkdir()
    started = []
    s3 = s3_server
    try:
        bucket = s3.create_bucket("raydetr-tests")
        s3.create_bucket("raydetr-mlflow")
        mlflow = MlflowOnPostgres(state / "mlflow", s3, "s3://raydetr-mlflow/artifacts").start()
        started.append(mlflow)
        cluster = SharedNothingCluster(state / "cluster", hidden, s3.env())
        (state / "cluster").mkdir()
        started.append(cluster)
        cluster.start()
        yield Topology(cluster, s3, mlflow, bucket, driver_tmp)
    finally:
        for component in reversed(started):
            component.stop()
        subprocess.run(["rm", "-rf", str(state)], check=False)
