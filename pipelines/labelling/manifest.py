"""The output's manifest: which model and settings made the rows, the totals, and every run.

A re-run into an existing output must use the same model (name, version, run id
and the checkpoint's sha256) and the same row settings (task, threshold, top-k,
classes, precision, panoptic threshold); otherwise the dataset would mix rows that mean
different things, so the job refuses with a message that says what differs. Each run is recorded
when it starts (status "running": a run that was killed stays so) and completed
when it ends.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from detr.errors import RaydetrError
from pipelines.labelling.output import FORMAT, Committed, LabelOutput

# What a setting was before the manifest recorded it: outputs made before tasks existed hold detections,
# and before precisions existed, float32 ones.
SETTING_DEFAULTS = {"task": "detection", "precision": "float32"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_compatible(existing: Mapping[str, Any] | None, model: Mapping[str, str], settings: Mapping[str, Any],
                     where: str) -> None:
    """Raise ValueError when `where` was labelled with another model or other settings."""
    if existing is None:
        return
    if existing.get("format") != FORMAT:
        raise RaydetrError(f"{where}: not a labelling output (manifest format {existing.get('format')!r})")
    problems = []
    for name in ("name", "version", "run_id", "sha256"):
        before, now = existing["model"].get(name, ""), model.get(name, "")
        if before != now:
            problems.append(f"model {name} {before!r} (now {now!r})")
    recorded = existing["settings"]
    for name in dict.fromkeys([*recorded, *settings]):  # a setting only one side has differs too
        before, now = recorded.get(name, SETTING_DEFAULTS.get(name)), settings.get(name, SETTING_DEFAULTS.get(name))
        if before != now:
            problems.append(f"{name} {before!r} (now {now!r})")
    if problems:
        raise RaydetrError(f"{where} was labelled with " + ", ".join(problems)
                         + "; use the same model and settings to resume, or a new --output")


def new_manifest(model: Mapping[str, str], settings: Mapping[str, Any]) -> dict:
    return {"format": FORMAT, "model": dict(model), "settings": dict(settings), "status": "running",
            "totals": {}, "runs": []}


class ManifestRun:
    """One run's entry in OUT/manifest.json: `start` checks and records it, `finish` completes it."""

    def __init__(self, output: LabelOutput, manifest: dict, entry: dict) -> None:
        self.output, self.manifest, self.entry = output, manifest, entry

    @classmethod
    def start(cls, output: LabelOutput, model: Mapping[str, str], settings: Mapping[str, Any],
              **entry: Any) -> "ManifestRun":
        manifest = output.read_manifest()
        check_compatible(manifest, model, settings, output.root)
        manifest = manifest or new_manifest(model, settings)
        record = {**entry, "status": "running", "started": _now()}
        manifest["runs"].append(record)
        manifest["status"] = "running"
        output.write_manifest(manifest)
        return cls(output, manifest, record)

    def finish(self, before: Committed, total_parts: int, **entry: Any) -> dict:
        """Complete the run; returns the output's totals (what was committed before, plus this run)."""
        totals = {"images_labelled": before.labelled + entry["labelled"], "errors": before.errors + entry["errors"],
                  "detections": before.detections + entry["detections"], "parts": total_parts,
                  "duplicates_ignored": before.duplicates_ignored}
        self.entry.update(entry, status="complete", finished=_now())
        self.manifest.update(status="complete", totals=totals)
        self.output.write_manifest(self.manifest)
        return totals
