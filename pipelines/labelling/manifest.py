"""The output's manifest: which model and settings made the rows, the totals, and every run.

A re-run into an existing output must use the same model (name, version, run id
and the checkpoint's sha256) and the same row settings (threshold, top-k,
classes); otherwise the dataset would mix rows that mean different things, so
the job refuses with a message that says what differs.
"""
from __future__ import annotations

from typing import Any, Mapping

from pipelines.labelling.output import FORMAT


def check_compatible(existing: Mapping[str, Any] | None, model: Mapping[str, str], settings: Mapping[str, Any],
                     where: str) -> None:
    """Raise ValueError when `where` was labelled with another model or other settings."""
    if existing is None:
        return
    if existing.get("format") != FORMAT:
        raise ValueError(f"{where}: not a labelling output (manifest format {existing.get('format')!r})")
    problems = []
    for name in ("name", "version", "run_id", "sha256"):
        before, now = existing["model"].get(name, ""), model.get(name, "")
        if before != now:
            problems.append(f"model {name} {before!r} (now {now!r})")
    for name, now in settings.items():
        if existing["settings"].get(name) != now:
            problems.append(f"{name} {existing['settings'].get(name)!r} (now {now!r})")
    if problems:
        raise ValueError(f"{where} was labelled with " + ", ".join(problems)
                         + "; use the same model and settings to resume, or a new --output")


def new_manifest(model: Mapping[str, str], settings: Mapping[str, Any]) -> dict:
    return {"format": FORMAT, "model": dict(model), "settings": dict(settings), "status": "running",
            "totals": {}, "runs": []}
