"""The output's manifest: which model and settings made the rows, and every run.

A re-run into an existing output must use the same model (name, version, run id
and the checkpoint's sha256) and the same row settings (task, threshold, top-k,
classes, precision, evaluation size, panoptic threshold); otherwise the dataset would mix rows that mean
different things, so the job refuses with a message that says what differs.

`manifest.json` is created once, by the first run, and never rewritten, so that
runs writing one output at once cannot undo each other: each run records itself
in `runs/<run>.json` when it starts (status "running": a run that was killed
stays so) and completes that file when it ends, with the output's totals then.
`LabelOutput.read_manifest` shows them together.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from detr.errors import RaydetrError
from pipelines.labelling.output import FORMAT, LabelOutput

KEY_FORMAT = "canonical"
"""Image keys of folders and archives are canonical paths (`pipelines.storage.canonical`). Outputs made
before lack this field: their keys are paths as they were typed."""
PATH_KEYED_KINDS = ("folder", "archive")

# What a setting was before the manifest recorded it: outputs made before tasks existed hold detections,
# before precisions existed, float32 ones, and before runtimes existed, PyTorch's. Model-dependent ones (the
# evaluation size: the model's own) come from the job as `model_defaults`.
SETTING_DEFAULTS = {"task": "detection", "precision": "float32", "runtime": "torch"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_compatible(existing: Mapping[str, Any] | None, model: Mapping[str, str], settings: Mapping[str, Any],
                     where: str, model_defaults: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError when `where` was labelled with another model or other settings; `model_defaults`:
    what a setting an older manifest lacks was for this model (its evaluation size)."""
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
    defaults = {**SETTING_DEFAULTS, **(model_defaults or {})}
    for name in dict.fromkeys([*recorded, *settings]):  # a setting only one side has differs too
        before, now = recorded.get(name, defaults.get(name)), settings.get(name, defaults.get(name))
        if before != now:
            problems.append(f"{name} {before!r} (now {now!r})")
    if problems:
        raise RaydetrError(f"{where} was labelled with " + ", ".join(problems)
                         + "; use the same model and settings to resume, or a new --output")


def check_keys(existing: Mapping[str, Any] | None, source_kind: str, where: str) -> None:
    """Refuse to add path-keyed images (folders, archives) to an output whose keys are paths as typed: the
    same images would get second keys and be labelled again."""
    if existing is None or existing.get("key_format") == KEY_FORMAT or source_kind not in PATH_KEYED_KINDS:
        return
    raise RaydetrError(f"{where} was labelled by an earlier version, which keyed {source_kind} images by their path "
                       "as typed; images are now keyed by their absolute path, so this run would label them all "
                       "again. Label into a new --output (the rows already in this one stay readable)")


def new_manifest(model: Mapping[str, str], settings: Mapping[str, Any]) -> dict:
    return {"format": FORMAT, "model": dict(model), "settings": dict(settings), "key_format": KEY_FORMAT}


class ManifestRun:
    """One run's record in OUT/runs/: `start` checks the output and records the run, `finish` completes it."""

    def __init__(self, output: LabelOutput, entry: dict) -> None:
        self.output, self.entry = output, entry

    @property
    def manifest(self) -> dict:
        """The output's manifest with every run, as it is now (read when asked: other runs may write too)."""
        return self.output.read_manifest()

    @classmethod
    def start(cls, output: LabelOutput, model: Mapping[str, str], settings: Mapping[str, Any], source_kind: str,
              model_defaults: Mapping[str, Any] | None = None, **entry: Any) -> "ManifestRun":
        existing = output.read_base_manifest()
        check_compatible(existing, model, settings, output.root, model_defaults)
        check_keys(existing, source_kind, output.root)
        if existing is None:
            output.create_manifest(new_manifest(model, settings))
            # Another run may have created it first, with another model: the check decides, on what is there.
            check_compatible(output.read_base_manifest(), model, settings, output.root)
        record = {**entry, "status": "running", "started": _now()}
        output.write_run(record)
        return cls(output, record)

    def finish(self, **entry: Any) -> dict:
        """Complete the run; returns the output's totals now (everything committed, by every run)."""
        now = self.output.scan()
        totals = {"images_labelled": now.labelled, "errors": now.errors, "detections": now.detections,
                  "parts": now.parts, "duplicates_ignored": now.duplicates_ignored}
        # The run that finishes last scanned after every other finished run's last commit: its totals hold
        # everything. Seconds are too coarse to tell runs ending together apart.
        self.entry.update(entry, status="complete", finished=_now(), finished_unix=time.time(), totals=totals)
        self.output.write_run(self.entry)
        return totals
