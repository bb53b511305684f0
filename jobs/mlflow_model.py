"""Logging a trained detector to MLflow as a pyfunc model (signature, input example, requirements).

The model directory holds the raydetr checkpoint as an artifact, the `detr` and
`pipelines` packages as code, and `pyfunc_detector.py` as the model's code; it
loads anywhere the pinned requirements install, without this repository. With
`exports`, the model's `detr export` folders (checked against PyTorch) are logged
beside the checkpoint as artifacts `export_onnx` / `export_openvino`, and the
pyfunc's `runtime` param runs them instead of exporting when first asked.
"""
from __future__ import annotations

import io
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from detr.config import PANOPTIC_THRESHOLD

PYFUNC_FILE = Path(__file__).with_name("pyfunc_detector.py")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = [PACKAGE_ROOT / "detr", PACKAGE_ROOT / "pipelines"]
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pyarrow", "pandas", "pycocotools")


def pip_requirements() -> list[str]:
    """The packages the pyfunc imports, pinned to the versions it was logged with."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def signature(panoptic: bool = False, score_threshold: float = 0.5, eval_size: int = 800):
    """The pyfunc's signature; a panoptic model (with masks) adds the `segments` column (JSON); the score
    threshold's and the evaluation size's defaults are the model's (`detr.default_score_threshold`, its
    evaluation transform's shorter side; `eval_max_size` 0: the model's ratio to the shorter side)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.string, "path", required=False), ColSpec(DataType.binary, "image", required=False)])
    outputs = Schema([
        ColSpec(Array(Array(DataType.double)), "boxes"),
        ColSpec(Array(DataType.double), "scores"),
        ColSpec(Array(DataType.long), "labels"),
        ColSpec(Array(DataType.string), "label_names"),
        ColSpec(DataType.long, "width"),
        ColSpec(DataType.long, "height"),
        *([ColSpec(DataType.string, "segments")] if panoptic else []),
        ColSpec(DataType.string, "error"),
    ])
    params = [ParamSpec("score_threshold", DataType.double, score_threshold), ParamSpec("top_k", DataType.long, 100),
              ParamSpec("eval_size", DataType.long, eval_size), ParamSpec("eval_max_size", DataType.long, 0),
              ParamSpec("runtime", DataType.string, "torch")]
    if panoptic:
        params.append(ParamSpec("panoptic_threshold", DataType.double, PANOPTIC_THRESHOLD))
    params = ParamSchema(params)
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example():
    """One small PNG as bytes: the shape of a real request."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def log_detector_model(
    tracking_uri: str,
    run_id: str,
    checkpoint_path: str | Path,
    name: str = "model",
    registered_model_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    exports: Sequence[str] = (),
):
    """Log the checkpoint as a pyfunc model in the run; register a new version when asked; `exports`
    (`onnx`, `openvino`): also the model's export folders, for the pyfunc's `runtime` param.

    Returns MLflow's ModelInfo (its `model_uri` loads the model; `registered_model_version`
    is set when registered).
    """
    import mlflow

    from detr.checkpoint import read_checkpoint_file
    from detr.config import DETRConfig
    from detr.postprocess import default_score_threshold
    from jobs.tracking import tracking_store
    from pipelines.inference.detector import transforms_from_metadata

    saved = read_checkpoint_file(str(checkpoint_path))
    config = DETRConfig.from_dict(saved["config"])
    eval_size = transforms_from_metadata((saved.get("metadata") or {}).get("transforms")).eval_size
    panoptic = bool(config.masks)
    with tempfile.TemporaryDirectory(prefix="raydetr-pyfunc-") as folder, tracking_store(tracking_uri), \
            mlflow.start_run(run_id=run_id, log_system_metrics=False):
        artifacts = {"checkpoint": str(checkpoint_path),
                     **_export_folders(checkpoint_path, exports, folder, registered_model_name or name, run_id)}
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_FILE),
            artifacts=artifacts,
            code_paths=[str(p) for p in CODE_PATHS],
            signature=signature(panoptic, default_score_threshold(config), eval_size),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            tags={k: str(v) for k, v in (tags or {}).items()} or None,
        )


def _export_folders(checkpoint_path: str | Path, formats: Sequence[str], folder: str, name: str,
                    run_id: str) -> dict[str, str]:
    """`export_FORMAT` -> the checkpoint's export folder in that format, written under `folder`."""
    if not formats:
        return {}
    import hashlib

    from pipelines.inference.detector import Detector
    from pipelines.inference.export_folder import write_export

    data = Path(checkpoint_path).read_bytes()
    detector = Detector.from_checkpoint(data, optimize=False)
    identity = {"uri": f"runs:/{run_id}/model", "name": name, "version": "", "run_id": run_id,
                "sha256": hashlib.sha256(data).hexdigest()}
    exported = {}
    for export_format in dict.fromkeys(formats):
        exported[f"export_{export_format}"] = os.path.join(folder, f"export_{export_format}")
        write_export(detector, identity, exported[f"export_{export_format}"], export_format)
    return exported
