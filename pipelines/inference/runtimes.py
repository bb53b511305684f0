"""Where a Detector's forward pass runs: PyTorch itself, or the model's ONNX export in ONNX Runtime or OpenVINO.

Why: on CPUs the exported graph runs faster than eager PyTorch (figures: bench/RESULTS.md). Preprocessing and
post-processing stay the Detector's, so detections, filters and outputs mean the same in every runtime. A
runner takes a padded, normalised batch and returns the model's main outputs as float32 tensors, as
`detr.forward_inference` does for the torch runtime. ONNX Runtime and OpenVINO are optional
(`raydetr[onnx]`, `raydetr[openvino]`); asking for one that is not installed is one line saying what to
install.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from detr.errors import RaydetrError

RUNTIMES = ("torch", "onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
"""runtime -> (module it needs, raydetr extra that installs it)"""

Runner = Callable[[Tensor, Tensor], dict]


def check_runtime(runtime: str) -> None:
    """Fail at once, in one line, for an unknown runtime or one that is not installed here."""
    if runtime not in RUNTIMES:
        raise RaydetrError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime in _PACKAGES:
        module, extra = _PACKAGES[runtime]
        missing = [m for m in (module, "onnx") if importlib.util.find_spec(m) is None]  # onnx: the export
        if missing:
            raise RaydetrError(f"runtime {runtime!r} needs {', '.join(missing)}, which is not installed: "
                               f"pip install 'raydetr[{extra}]'")


def check_model_runs_in(runtime: str, config) -> None:
    """Refuse a model whose export a runtime computes differently: OpenVINO's NonMaxSuppression keeps other
    cells than torchvision's NMS does, so a two-stage model with proposal NMS gets other queries there
    (boxes 0.9 apart, measured in tests/test_runtimes.py); ONNX Runtime's matches."""
    two_stage = getattr(config, "two_stage", None)
    if runtime == "openvino" and two_stage is not None and two_stage.nms > 0:
        raise RaydetrError("the openvino runtime does not run a two-stage model with proposal NMS "
                           f"(two_stage.nms={two_stage.nms}): its NMS keeps other cells; use onnxruntime")


class OnnxRuntimeRunner:
    """An ONNX file in an ONNX Runtime CPU session with `threads` threads; with `unpadded_file` (the graph for
    unpadded batches, `detr.export.export_onnx(padded=False)`), batches without padding run that one."""

    def __init__(self, onnx_file: str, threads: int, unpadded_file: str | None = None) -> None:
        self.session = self._session(onnx_file, threads)
        self.unpadded = self._session(unpadded_file, threads) if unpadded_file else None
        self.names = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _session(onnx_file: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: Tensor, mask: Tensor) -> dict:
        session = self.unpadded if self.unpadded is not None and not bool(mask.any()) else self.session
        feeds = {"images": images.float().contiguous().cpu().numpy(), "mask": mask.cpu().numpy()}
        return {name: torch.from_numpy(np.asarray(value)) for name, value in
                zip(self.names, session.run(self.names, feeds))}


class OpenVinoRunner:
    """An ONNX file (or OpenVINO IR) compiled for the CPU by OpenVINO, in float32, with `threads` threads; with
    `unpadded_file` (the graph for unpadded batches), batches without padding run that one."""

    def __init__(self, model_file: str, threads: int, unpadded_file: str | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(model_file), "CPU", settings)
        self.request = self.compiled.create_infer_request()
        self.unpadded = core.compile_model(core.read_model(unpadded_file), "CPU", settings) if unpadded_file else None
        self.unpadded_request = self.unpadded.create_infer_request() if self.unpadded is not None else None
        self.names = [o.get_any_name() for o in self.compiled.outputs]

    def __call__(self, images: Tensor, mask: Tensor) -> dict:
        compiled, request = self.compiled, self.request
        if self.unpadded is not None and not bool(mask.any()):
            compiled, request = self.unpadded, self.unpadded_request
        results = request.infer({"images": images.float().contiguous().cpu().numpy(), "mask": mask.cpu().numpy()})
        return {name: torch.from_numpy(np.array(results[output])) for name, output in
                zip(self.names, compiled.outputs)}


def exported_runner(runtime: str, model: nn.Module, threads: int | None = None) -> Runner:
    """A runner of `runtime` for `model`, exported to ONNX on the way (in a temporary folder, removed once
    the runtime has loaded the graph)."""
    check_runtime(runtime)
    if runtime == "torch":
        raise ValueError("the torch runtime runs the model itself (Detector)")
    from detr.export import export_onnx

    check_model_runs_in(runtime, model.config)
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="raydetr-export-") as folder:
        path, unpadded = os.path.join(folder, "model.onnx"), os.path.join(folder, "model_unpadded.onnx")
        export_onnx(model, path)
        export_onnx(model, unpadded, padded=False)
        return file_runner(runtime, path, threads, unpadded)


def file_runner(runtime: str, model_file: str, threads: int, unpadded_file: str | None = None) -> Runner:
    """A runner of `runtime` for an exported file, and its graph for unpadded batches when given."""
    check_runtime(runtime)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(model_file, threads, unpadded_file)
    if runtime == "openvino":
        return OpenVinoRunner(model_file, threads, unpadded_file)
    raise ValueError(f"the {runtime} runtime does not run exported files")
