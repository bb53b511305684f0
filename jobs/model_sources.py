"""Where a model comes from: one resolver for every job's `--model` / `init_from` argument.

Accepted forms:

- a raydetr checkpoint file (`model.pt` from training, or `detr checkpoint` output);
- an official DETR checkpoint file (facebookresearch/detr release layout);
- either file on an object store (`s3://...`, `gs://...`): downloaded like an MLflow model;
- a registered model in MLflow: `models:/NAME@ALIAS` or `models:/NAME/VERSION`;
- an MLflow logged model (`models:/m-...`) or run artifact (`runs:/RUN_ID/model`);
- for jobs that run a model (label, evaluate): a `detr export` folder, local or on an object store (float32
  or int8; it runs in ONNX Runtime or OpenVINO, and its rows name the model it was exported from).

MLflow models are downloaded once into a local cache folder and their raydetr
checkpoint (logged as the pyfunc's `checkpoint` artifact) is used; the registry's
name, version and run id travel along so outputs can say which model made them.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from detr.errors import RaydetrError

if TYPE_CHECKING:
    from pipelines.inference.detector import Detector
    from pipelines.inference.export_package import ExportPackage
    from pipelines.training.transforms import TransformsConfig

_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


@dataclass(frozen=True)
class ResolvedModel:
    """A local checkpoint file plus the identity of the model it came from."""

    checkpoint: str
    name: str
    version: str = ""
    run_id: str = ""
    uri: str = ""
    download_dir: str | None = None  # a temporary folder this resolver made (an MLflow download)


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _find_checkpoint(directory: Path) -> Path:
    """The raydetr checkpoint inside a downloaded pyfunc model folder."""
    candidates = sorted(p for p in directory.rglob("*") if p.is_file() and p.parent.name == "artifacts")
    if not candidates:
        candidates = sorted(directory.rglob("model.pt"))
    if not candidates:
        raise FileNotFoundError(f"{directory}: no raydetr checkpoint artifact in this MLflow model")
    return candidates[0]


def check_model_spec(spec: str, allow_export: bool = False) -> None:
    """Fail at once, in one line, for a model argument that is neither an MLflow URI nor a file (nor, with
    `allow_export`, an export folder), before a job starts Ray or a tracking database for nothing; a file on
    an object store is looked up there."""
    from pipelines.inference.export_package import is_export_folder

    if is_mlflow_uri(spec):
        return
    exported = is_export_folder(spec)
    if exported and not allow_export:
        raise RaydetrError(f"model {spec!r} is an export folder: this job needs the checkpoint it was exported "
                           "from (exports run in detr label and detr evaluate)")
    if exported:
        return
    if _on_object_store(spec):
        from pipelines import storage

        if not storage.exists(spec) or storage.is_dir(spec):
            raise FileNotFoundError(f"model {storage.redact(spec)!r}: no such file (or export folder) on the "
                                    "object store")
    elif Path(spec).expanduser().is_dir():
        raise FileNotFoundError(f"model {spec!r}: a folder, but not an export folder (no raydetr_export.json)")
    elif not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"model {spec!r}: no such file, and not an MLflow URI (models:/..., runs:/...)")


def _on_object_store(spec: str) -> bool:
    """A URI (`pipelines.storage.has_scheme`) that is not MLflow's."""
    from pipelines.storage import has_scheme

    return has_scheme(spec) and not is_mlflow_uri(spec)


def resolve_model(spec: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> ResolvedModel:
    """Turn a model argument that `check_model_spec` accepted into a local checkpoint path (downloading
    MLflow models and files on object stores)."""
    if _on_object_store(spec):
        return _download_file(spec, cache_dir)
    if not is_mlflow_uri(spec):
        path = Path(spec).expanduser()
        return ResolvedModel(checkpoint=str(path.resolve()), name=path.stem, uri=str(path.resolve()))

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from jobs.tracking import resolve_tracking_uri, tracking_store

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry the job was given
    name, version, run_id = spec, "", ""
    try:
        if match := _ALIAS_URI.match(spec):
            mv = client.get_model_version_by_alias(match["name"], match["alias"])
            name, version, run_id = mv.name, str(mv.version), mv.run_id or ""
        elif match := _VERSION_URI.match(spec):
            mv = client.get_model_version(match["name"], match["version"])
            name, version, run_id = mv.name, str(mv.version), mv.run_id or ""
        elif spec.startswith("runs:/"):
            run_id = spec.split("/")[1]
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RaydetrError(f"model {spec!r} is not in the registry at {uri}: {exc.message}") from None
    target = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="raydetr-model-"))
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
    try:
        # A models:/ URI is resolved through MLflow's default registry, not download_artifacts' tracking_uri
        # (--tracking-uri was ignored): the job's store is the default while it downloads, and only then.
        with tracking_store(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(target / key),
                                                              tracking_uri=uri))
        checkpoint = local if local.is_file() else _find_checkpoint(local)
    except BaseException:
        if not cache_dir:  # a failed download leaves no folder behind either
            shutil.rmtree(target, ignore_errors=True)
        raise
    return ResolvedModel(checkpoint=str(checkpoint), name=name, version=version, run_id=run_id, uri=spec,
                         download_dir=None if cache_dir else str(target))


def _download_file(uri: str, cache_dir: str | None) -> ResolvedModel:
    from pipelines import storage

    target = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="raydetr-model-"))
    name = Path(uri.split("://", 1)[1]).name
    local = target / re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("://", 1)[1])
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(uri))
    except BaseException:
        if not cache_dir:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return ResolvedModel(checkpoint=str(local), name=Path(name).stem, uri=storage.redact(uri),
                         download_dir=None if cache_dir else str(target))


@dataclass(frozen=True)
class LoadedModel:
    """A model argument resolved to checkpoint bytes (or an export's package), its identity, preprocessing
    and classes.

    The bytes are what remote actors load (the job puts them in Ray's object store): a path on the
    driver's disk means nothing on another node."""

    resolved: ResolvedModel
    checkpoint: bytes  # empty for an export folder
    sha256: str
    transforms: TransformsConfig
    categories: list | None
    masks: bool  # the model has a mask head (panoptic)
    export: "ExportPackage | None" = None  # the model is a `detr export` folder

    def identity(self) -> dict:
        r = self.resolved
        return {"uri": r.uri, "name": r.name, "version": r.version, "run_id": r.run_id, "sha256": self.sha256}

    @property
    def runtime(self) -> str:
        """Where the model runs unless a job is told otherwise: PyTorch, or an export's own runtime."""
        return self.export.runtime if self.export is not None else "torch"

    @property
    def precision(self) -> str:
        """An export's precision ("float32" or "int8"); a checkpoint's is chosen when it runs."""
        return self.export.precision if self.export is not None else "float32"

    def payload(self, runtime: str, detector: "Detector") -> "bytes | ExportPackage":
        """What a job's actors load to run this model in `runtime`: the checkpoint's bytes for PyTorch; for ONNX
        Runtime or OpenVINO the export (the folder given, or the checkpoint exported once, here, and checked
        against PyTorch), with only the files that runtime reads."""
        if self.export is not None:
            if runtime == "torch":
                raise RaydetrError(f"model {self.resolved.uri} is an export: it runs in onnxruntime or openvino, "
                                   "not torch (the torch runtime needs the checkpoint it was exported from)")
            return self.export.for_runtime(runtime)
        if runtime == "torch":
            return self.checkpoint
        from pipelines.inference.export_package import export_package

        return export_package(detector, self.identity(), runtime).for_runtime(runtime)


def load_model(spec: str, tracking_uri: str | None = None, allow_export: bool = False) -> LoadedModel:
    """Resolve any model argument (downloading MLflow models, then removing the download), check that the
    file loads, and read what a job's driver needs from it."""
    return load_detector(spec, tracking_uri, allow_export)[0]


def load_detector(spec: str, tracking_uri: str | None = None,
                  allow_export: bool = False) -> tuple[LoadedModel, "Detector"]:
    """`load_model`, and the plain (not inference-optimised) `Detector` it checked the file with; with
    `allow_export`, an export folder's Detector (in the export's own runtime)."""
    from detr.checkpoint import read_checkpoint_file
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri
    from pipelines.inference.detector import Detector

    check_model_spec(spec, allow_export)
    if not is_mlflow_uri(spec):
        from pipelines.inference.export_package import is_export_folder

        if is_export_folder(spec):
            return _load_export(spec)
    uri = resolve_tracking_uri(tracking_uri)
    if is_mlflow_uri(spec):
        ensure_tracking_available(uri)
    resolved = resolve_model(spec, uri)
    try:
        data = Path(resolved.checkpoint).read_bytes()  # read once: checked here, shipped to actors as bytes
        detector = Detector.from_checkpoint(read_checkpoint_file(data, name=resolved.uri), optimize=False)
    finally:
        if resolved.download_dir:
            shutil.rmtree(resolved.download_dir, ignore_errors=True)
    loaded = LoadedModel(resolved, data, hashlib.sha256(data).hexdigest(), detector.transforms, detector.categories,
                         bool(detector.config.masks))
    return loaded, detector


def _load_export(spec: str) -> tuple[LoadedModel, "Detector"]:
    """An export folder: its package, checked by loading it in its runtime; its rows name the model it was
    exported from (name, version, run) and carry the export's own digest."""
    from pipelines import storage
    from pipelines.inference.detector import Detector
    from pipelines.inference.export_package import read_export_package

    package = read_export_package(spec)
    detector = Detector.from_export(package)
    source = package.metadata.get("model", {})
    location = storage.redact(spec) if storage.has_scheme(spec) else str(Path(spec).expanduser().resolve())
    resolved = ResolvedModel(checkpoint=location, name=str(source.get("name") or Path(location).name),
                             version=str(source.get("version", "")), run_id=str(source.get("run_id", "")),
                             uri=location)
    loaded = LoadedModel(resolved, b"", package.sha256, detector.transforms, detector.categories,
                         bool(detector.config.masks), export=package)
    return loaded, detector
