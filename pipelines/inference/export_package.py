"""An export folder's files in memory: how an exported model reaches Ray actors on any node.

Why: a folder on the driver's disk means nothing to an actor on another node, and exporting in every actor
repeats the same work (and its check against PyTorch) once per actor. So the driver reads an export folder
(`detr export` output, local or on an object store), or exports a checkpoint once for the runtime asked, and
the package's bytes travel through Ray's object store; each actor writes them to a private temporary folder,
loads the runtime's session from there and removes the folder.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from detr.errors import RaydetrError

if TYPE_CHECKING:
    from pipelines.inference.detector import Detector
    from pipelines.inference.runtimes import Runner

EXPORT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}
"""An export format -> the runtime its `detr export` checked it in (and runs it by default)."""


@dataclass(frozen=True)
class ExportPackage:
    """The metadata (`raydetr_export.json`) and model files of an export folder."""

    metadata: dict[str, Any]
    files: dict[str, bytes]

    @property
    def runtime(self) -> str:
        """The runtime the export was made and checked for."""
        return EXPORT_RUNTIME[self.metadata["export_format"]]

    @property
    def precision(self) -> str:
        return str(self.metadata.get("precision", "float32"))

    @property
    def sha256(self) -> str:
        """One digest of the model files (what identifies this export's outputs, as a checkpoint's sha256 does)."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return digest.hexdigest()

    def runner(self, runtime: str, threads: int) -> "Runner":
        """A session of `runtime` for this export: OpenVINO runs its IR when the folder has one, any runtime
        the ONNX graph otherwise. The files exist only while the session loads them."""
        from detr.config import DETRConfig
        from pipelines.inference.runtimes import check_model_runs_in, file_runner

        if runtime not in EXPORT_RUNTIME.values():
            raise RaydetrError(f"an export runs in {' or '.join(EXPORT_RUNTIME.values())}, not {runtime!r} "
                               "(the torch runtime needs the checkpoint the export was made from)")
        check_model_runs_in(runtime, DETRConfig.from_dict(self.metadata["config"]))
        model_file, unpadded = self.graphs(runtime)
        with tempfile.TemporaryDirectory(prefix="raydetr-export-") as folder:
            for name, data in self.files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            return file_runner(runtime, os.path.join(folder, model_file), threads,
                               unpadded and os.path.join(folder, unpadded))

    def graphs(self, runtime: str) -> tuple[str, str | None]:
        """The graph `runtime` runs and its graph for unpadded batches (None where the folder has none):
        OpenVINO's IR where there is one, else the ONNX graphs."""
        suffix = ".xml" if runtime == "openvino" and "model.xml" in self.files else ".onnx"
        unpadded = f"model_unpadded{suffix}"
        return f"model{suffix}", unpadded if unpadded in self.files else None

    def for_runtime(self, runtime: str) -> "ExportPackage":
        """This package with only the files `runtime` reads (`graphs`, and the weights beside an IR): what is
        worth shipping to actors."""
        keep = [name for name in self.graphs(runtime) if name is not None]
        keep += [name.removesuffix(".xml") + ".bin" for name in keep if name.endswith(".xml")]
        return ExportPackage(self.metadata, {name: data for name, data in self.files.items() if name in keep})


def read_export_package(folder: str) -> ExportPackage:
    """An export folder (a local path or an object-store URI) read into memory, checked as `read_export`
    checks it."""
    from pipelines import storage
    from pipelines.inference.export_folder import export_files, read_export

    described = read_export(folder)
    return ExportPackage(described, {name: storage.read_bytes(storage.join(folder, name))
                                     for name in export_files(described)})


def export_package(detector: "Detector", identity: Mapping[str, str], runtime: str,
                   threads: int | None = None) -> ExportPackage:
    """`detector`'s model exported (float32) and checked for `runtime`, as a package: the export a job makes
    once on its driver when asked to run a checkpoint in ONNX Runtime or OpenVINO."""
    from pipelines.inference.export_folder import write_export

    export_format = next(f for f, r in EXPORT_RUNTIME.items() if r == runtime)
    with tempfile.TemporaryDirectory(prefix="raydetr-export-") as folder:
        write_export(detector, identity, folder, export_format, threads)
        return read_export_package(folder)


def is_export_folder(location: str) -> bool:
    """Whether `location` (a local path or an object-store URI) is a folder `detr export` wrote."""
    from pipelines import storage
    from pipelines.inference.export_folder import METADATA_FILE

    try:
        return storage.exists(storage.join(location, METADATA_FILE))
    except OSError:
        return False


__all__ = ["EXPORT_RUNTIME", "ExportPackage", "export_package", "is_export_folder", "read_export_package"]
