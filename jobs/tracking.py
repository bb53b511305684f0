"""MLflow tracking for jobs: where the tracking store is, a fail-fast check, and a thin run handle.

The tracking URI comes from the job's config, else `$MLFLOW_TRACKING_URI`, else
MLflow's own default (a SQLite store, `sqlite:///mlflow.db`, in the working
directory). Relative SQLite and file stores are made absolute on the driver, so
Ray workers, whose working directory differs, write to the same store.

A tracking server that is down must fail a job when it starts, not after hours of
training: `ensure_tracking_available` answers within seconds.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value's length
BATCH_LIMIT = 100  # MLflow accepts at most 100 params (1000 metrics) per batch


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached; raised before any work starts."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else MLflow's default; local stores made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            uri = "sqlite:///" + os.path.abspath(path)
    elif ":" not in uri:  # a plain folder: MLflow's file store
        uri = os.path.abspath(uri)
    return uri


@contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """`uri` as MLflow's tracking and registry URI while the block runs, then what they were: MLflow keeps its
    default in the environment (MLFLOW_TRACKING_URI), which every process this one starts afterwards would
    inherit."""
    import mlflow

    saved_tracking, saved_registry = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None: unset, as it was
        if saved_registry is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = saved_registry


def ensure_tracking_available(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailableError with a clear message unless the store answers within `timeout_s` and
    accepts this job's credentials (a server with MLflow's basic-auth app)."""
    if uri.startswith(("http://", "https://")):
        import requests

        base = uri.rstrip("/")
        try:
            response = requests.get(base + "/health", timeout=timeout_s)
            if response.status_code == 200:
                user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
                response = requests.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                                        auth=(user, password) if user else None, timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is not reachable ({type(exc).__name__}). Start it "
                "(e.g. `cluster/mlflow_server.sh`) or point tracking.uri / MLFLOW_TRACKING_URI elsewhere."
            ) from exc
        if response.status_code == 401:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} refused the password of user {user!r} (MLFLOW_TRACKING_PASSWORD)" if user
                else f"MLflow tracking server {uri} needs credentials: set MLFLOW_TRACKING_USERNAME and "
                     "MLFLOW_TRACKING_PASSWORD in the job's environment (never in a config or on the command line)")
        if response.status_code == 403:
            raise TrackingUnavailableError(f"MLflow tracking server {uri}: user "
                                           f"{os.environ.get('MLFLOW_TRACKING_USERNAME')!r} may not read experiments")
        if response.status_code != 200:
            raise TrackingUnavailableError(f"MLflow tracking server {uri} answered with {response.status_code}")
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
        raise TrackingUnavailableError(f"MLflow tracking store {uri} cannot be used: {exc}") from exc


def _stringify(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


@dataclass
class TrackedRun:
    """One MLflow run, addressed by id: usable from the driver and from a Ray worker alike."""

    tracking_uri: str
    run_id: str

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> "TrackedRun":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        return cls(tracking_uri, run.info.run_id)

    def resume(self) -> None:
        """Mark a run RUNNING again (a restarted job continues its history)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _stringify(v)) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; a resumed run keeps them
        for i in range(0, len(items), BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[i: i + BATCH_LIMIT])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def log_metric_history(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Several steps' metrics in as few calls as possible."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for step, metrics in rows for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def last_step(self, key: str) -> int:
        """The largest step logged for a metric, -1 when none (where a resumed job continues)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, _stringify(value))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
