"""Collecting the errors of a streaming dataset that has no output folder (training, evaluation).

Ray Data tasks report each batch's rejected records and counts to one small
actor; the driver reads them back (`errors()`, `summary()`) or writes the
errors table (`write(path)`). Errors are de-duplicated across epochs; counts are
kept per epoch of the dataset.
"""
from __future__ import annotations

from typing import Any

from pipelines.validation.errors import ErrorRecord, RunSummary, write_errors_table


class _Collector:
    def __init__(self) -> None:
        self._errors: dict[tuple[str, str, str, str], None] = {}
        self._summaries: dict[int, RunSummary] = {}

    def add(self, epoch: int, summary: dict, errors: list[dict]) -> None:
        self._summaries.setdefault(epoch, RunSummary()).add(RunSummary.from_json(summary))
        for e in errors:
            self._errors[(e["source"], e["image"], e["reason"], e["detail"])] = None

    def errors(self) -> list[dict]:
        return [dict(zip(("source", "image", "reason", "detail"), k)) for k in self._errors]

    def summary(self, epoch: int | None) -> dict:
        if not self._summaries:
            return RunSummary().to_json()
        key = min(self._summaries) if epoch is None else epoch
        return self._summaries.get(key, RunSummary()).to_json()


class ErrorCollector:
    """A handle to the collecting actor; picklable, so it can travel into Ray Data tasks."""

    def __init__(self, actor: Any):
        self.actor = actor

    @classmethod
    def create(cls) -> "ErrorCollector":
        import ray

        return cls(ray.remote(num_cpus=0)(_Collector).remote())

    def report(self, epoch: int, summary: RunSummary, errors: list[ErrorRecord]) -> None:
        """Blocking, so that once a dataset has been consumed every report has arrived."""
        import ray

        ray.get(self.actor.add.remote(epoch, summary.to_json(), [e.as_dict() for e in errors]))

    def errors(self) -> list[ErrorRecord]:
        import ray

        return [ErrorRecord(**e) for e in ray.get(self.actor.errors.remote())]

    def summary(self, epoch: int | None = None) -> RunSummary:
        """Counts of one epoch of the dataset; the first one by default."""
        import ray

        return RunSummary.from_json(ray.get(self.actor.summary.remote(epoch)))

    def write(self, path: str) -> str:
        return write_errors_table(self.errors(), path)
