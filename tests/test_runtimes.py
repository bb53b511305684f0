"""Exported models in ONNX Runtime and OpenVINO give the PyTorch model's outputs and detections.

For a random tiny model with non-trivial norms, a focal-loss (sigmoid-scored) two-stage model with masks, the
same detector with the box refiner (roi_align), a panoptic model and the official tiny reference (../shared/reference): logits, boxes and masks equal PyTorch's
to 1e-4 on a padded batch of two sizes, the post-processed detections match, and an image gives the same
detections alone as inside the padded batch, in every runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import detr
from detr import from_official, pad_images
from pipelines.inference.detector import Detector
from pipelines.training.transforms import TransformsConfig
from test_inference_model import CONFIGS, model_with_statistics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
EXPORTED = ("onnxruntime", "openvino")


def official_tiny() -> torch.nn.Module:
    reference = torch.load(SHARED / "official_tiny_r18.pt", weights_only=True)
    config = reference["config"]
    return from_official(reference["checkpoint"], nheads=config["nheads"], dilation=config["dilation"],
                         aux_loss=config["aux_loss"], padding_invariant=True).eval()


def two_stage_with_distinct_cells(name: str = "fast_panoptic_stride8") -> torch.nn.Module:
    """A fast-recipe model (focal loss, two-stage queries from the encoder's best cells, NMS among them), its
    cells scored far apart as a trained model's are: a random one's cell scores tie to 1e-7, and which of two
    tied cells a runtime's rounding picks first is not a property of the export."""
    model = model_with_statistics(CONFIGS[name])
    with torch.no_grad():
        detr.detector_of(model).dense_head.class_embed.weight.mul_(50.0)
    return model


MODELS = {
    "tiny": lambda: model_with_statistics(CONFIGS["tiny"]),
    "fast_panoptic_sigmoid": two_stage_with_distinct_cells,
    "fast_refined_sigmoid": lambda: two_stage_with_distinct_cells("fast_refined_stride8"),
    "tiny_panoptic": lambda: model_with_statistics(CONFIGS["tiny_panoptic"]),
    "official_tiny_r18": official_tiny,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((70, 90), (96, 64))]


@pytest.mark.parametrize("runtime", EXPORTED)
def test_an_exported_model_gives_pytorchs_outputs_and_detections(model, runtime):
    from detr.errors import RaydetrError

    transforms = TransformsConfig.small()
    if runtime == "openvino" and model.config.two_stage is not None and model.config.two_stage.nms > 0:
        with pytest.raises(RaydetrError, match="openvino runtime does not run a two-stage model with proposal NMS"):
            Detector(model, transforms, runtime=runtime)
        model = model_with_statistics(model.config.replace(two_stage=detr.TwoStage(nms=0.0)))  # without: it does
    reference = Detector(model, transforms, score_threshold=0.0, optimize=False)
    exported = Detector(model, transforms, score_threshold=0.0, runtime=runtime, threads=2)
    pictures = images()
    resized = [reference.preprocessing.resize(p) for p in pictures]
    batch, mask = pad_images([reference.preprocessing.normalize(r) for r in resized])
    assert mask.any()  # the batch is padded
    expected, got = reference.forward(batch, mask), exported.forward(batch, mask)
    names = ["pred_logits", "pred_boxes"] + (["pred_masks"] if model.config.masks else [])
    assert sorted(k for k in got) == sorted(names)
    if model.config.two_stage is not None:  # queries are the encoder's best cells: match them up first
        got = matched_queries(got, expected)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4)
    # Post-processed detections match, and an image alone gives those it gets inside the padded batch.
    together = exported.detect(pictures)
    for picture, ours, theirs in zip(pictures, together, reference.detect(pictures)):
        alone = exported.detect([picture])[0]
        for det in (theirs, alone):
            assert_same_detections(ours, det)


def matched_queries(got: dict, expected: dict) -> dict:
    """`got`'s queries reordered to match `expected`'s. A two-stage model's queries start at the encoder's
    best-scoring cells; a random model's cell scores nearly tie, so a runtime's rounding (1e-6) may pick them in
    another order: the same predictions, in other query slots."""
    from scipy.optimize import linear_sum_assignment

    order = []
    for image in range(got["pred_boxes"].shape[0]):
        cost = torch.cdist(got["pred_boxes"][image], expected["pred_boxes"][image], p=1)
        cost = cost + torch.cdist(got["pred_logits"][image], expected["pred_logits"][image], p=1)
        rows, cols = linear_sum_assignment(cost.numpy())
        order.append(torch.as_tensor(rows[cols.argsort()]))
    return {k: torch.stack([v[i][order[i]] for i in range(len(order))]) for k, v in got.items()}


def assert_same_detections(a: dict, b: dict) -> None:
    """The same set of (label, score, box): a random model's scores nearly tie (1e-7 apart), so the order of
    equal-looking detections may differ with float rounding; each is matched to its counterpart."""
    from scipy.optimize import linear_sum_assignment

    assert len(a["labels"]) == len(b["labels"])
    cost = (a["boxes"][:, None] - b["boxes"][None]).abs().sum(-1) + 1e6 * (a["labels"][:, None] != b["labels"][None])
    rows, cols = linear_sum_assignment(cost.numpy())
    torch.testing.assert_close(a["boxes"][rows], b["boxes"][cols], rtol=0, atol=1e-2)  # pixels
    torch.testing.assert_close(a["scores"][rows], b["scores"][cols], rtol=0, atol=1e-4)
    assert torch.equal(a["labels"][rows], b["labels"][cols])


def test_a_runtime_that_is_unknown_or_missing_is_one_line(monkeypatch):
    import importlib.util

    from detr.errors import RaydetrError
    from pipelines.inference.runtimes import RUNTIMES, check_runtime
    from pipelines.labelling.options import RUNTIMES as LABEL_RUNTIMES

    assert LABEL_RUNTIMES == RUNTIMES  # named twice so that the command line does not import torch
    with pytest.raises(RaydetrError, match="unknown runtime 'tensorrt'; choose one of torch, onnxruntime, openvino"):
        check_runtime("tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(RaydetrError, match=r"runtime 'openvino' needs openvino, which is not installed: "
                                           r"pip install 'raydetr\[openvino\]'"):
        check_runtime("openvino")
    check_runtime("onnxruntime")


def test_a_model_that_is_not_padding_invariant_is_not_exported(tmp_path):
    from detr.errors import RaydetrError
    from detr.export import export_onnx

    model = detr.build_model(CONFIGS["tiny_official_padding"]).eval()
    with pytest.raises(RaydetrError, match="not padding-invariant"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def exported_tiny(folder: Path, export_format: str) -> tuple[torch.nn.Module, Path, Path]:
    """A tiny model with non-trivial norms, its checkpoint (classes, small transforms) and `detr export` of it."""
    from jobs.cli import main as detr_cli
    from pipelines.inference.detector import transforms_to_metadata

    model = model_with_statistics(CONFIGS["tiny"])
    checkpoint = detr.save_checkpoint(model, folder / "tiny.pt", {
        "categories": CATEGORIES, "transforms": transforms_to_metadata(TransformsConfig.small())})
    out = folder / "export"
    assert detr_cli(["export", "--model", str(checkpoint), "--format", export_format, "--output", str(out)]) == 0
    return model, checkpoint, out


@pytest.mark.parametrize("export_format", ["onnx", "openvino"])
def test_detr_export_writes_a_folder_that_describes_and_checks_itself(tmp_path, export_format):
    """`detr export` on one of our checkpoints: the graph, the metadata a runtime user needs, a check against
    PyTorch; the graph alone (no raydetr) reproduces the model on a padded batch; a broken folder is refused."""
    import json

    import onnxruntime as ort

    from detr.errors import RaydetrError
    from detr.export import example_batch
    from pipelines.inference.export_folder import read_export

    model, checkpoint, out = exported_tiny(tmp_path, export_format)
    transforms, categories = TransformsConfig.small(), CATEGORIES
    described = read_export(str(out))
    assert list(described["outputs"]) == ["pred_logits", "pred_boxes"] and described["scores"] == "softmax"
    assert described["categories"] == categories and described["default_score_threshold"] == 0.5
    assert described["preprocessing"]["eval_size"] == transforms.eval_size
    assert described["model"]["sha256"] and max(described["check"]["max_abs_difference"].values()) <= 1e-4
    images, mask = example_batch(((80, 60), (64, 100)))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = model(images, mask)
    np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=1e-4)
    np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), atol=1e-4)

    assert max(v for k, v in described["check"]["max_abs_difference"].items() if "(unpadded)" in k) <= 1e-4
    if export_format == "openvino":
        assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
        assert described["files"]["openvino_unpadded"] == "model_unpadded.xml"
        assert (out / "model_unpadded.bin").is_file()
        (out / "model.bin").unlink()
        with pytest.raises(RaydetrError, match="the export is incomplete: model.bin missing"):
            read_export(str(out))
    else:
        # The graph for unpadded batches, checked on two images of one size, has no padding multiplications.
        assert described["files"]["onnx_unpadded"] == "model_unpadded.onnx"
        import onnx

        def multiplications(name: str) -> int:
            return sum(node.op_type == "Mul" for node in onnx.load(str(out / name)).graph.node)

        assert multiplications("model_unpadded.onnx") < multiplications("model.onnx")
        meta = out / "raydetr_export.json"
        meta.write_text(json.dumps(dict(described, format_version=99)))
        with pytest.raises(RaydetrError, match="export format version 99 is newer"):
            read_export(str(out))
        with pytest.raises(RaydetrError, match="not an export folder"):
            read_export(str(tmp_path))


def test_an_int8_export_is_quantised_calibrated_and_close_to_float32_in_both_runtimes(tmp_path, capsys):
    """`detr export --precision int8`: the graph's convolutions and matrix products are int8 (weights per
    channel, activation ranges from the calibration images), and ONNX Runtime and OpenVINO both run it with
    boxes close to PyTorch's float32 ones; without calibration images it is refused in one line."""
    import onnx
    from PIL import Image

    from detr.export import example_batch
    from jobs.cli import main as detr_cli
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.inference.export_folder import read_export
    from pipelines.inference.runtimes import file_runner

    model = model_with_statistics(CONFIGS["tiny"])
    checkpoint = detr.save_checkpoint(model, tmp_path / "tiny.pt", {
        "transforms": transforms_to_metadata(TransformsConfig.small())})
    folder = tmp_path / "calibration"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(generator.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (folder / "0-broken.jpg").write_bytes(b"not a jpeg")  # read first, and skipped
    out = tmp_path / "int8"
    code = detr_cli(["export", "--model", str(checkpoint), "--format", "openvino", "--precision", "int8",
                     "--calibration", str(folder), "--calibration-images", "4", "--output", str(out)])
    printed, error = capsys.readouterr()
    assert code == 0, error
    described = read_export(str(out))
    assert described["precision"] == "int8" and described["calibration"] == {"images": 4}
    assert "int8, calibrated on 4 images" in printed
    graph = onnx.load(str(out / "model.onnx")).graph
    operators = [node.op_type for node in graph.node]
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    quantised_inputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    assert operators.count("QuantizeLinear") > 0 and all(c.input[1] in quantised_inputs for c in convolutions)

    images, mask = example_batch(((80, 60), (64, 100)))
    with torch.no_grad():
        expected = model(images, mask)
    for runtime, model_file in (("onnxruntime", out / "model.onnx"), ("openvino", out / "model.xml")):
        got = file_runner(runtime, str(model_file), 2)(images, mask)
        assert float((got["pred_boxes"] - expected["pred_boxes"]).abs().max()) < 0.05, runtime
        assert float((got["pred_logits"] - expected["pred_logits"]).abs().max()) > 1e-6, runtime  # really int8

    code = detr_cli(["export", "--model", str(checkpoint), "--precision", "int8", "--output", str(tmp_path / "x")])
    assert code == 1 and capsys.readouterr().err.strip() == ("detr export: error: --precision int8 needs --calibration IMAGES: images "
                                           "like those the model will see")


def test_an_export_folder_is_a_model_on_its_own(tmp_path):
    """A `detr export` folder runs without its checkpoint: the Detector built from the folder's package alone
    (config, preprocessing, classes from its metadata) detects what the checkpoint's Detector does in that
    runtime, in its own runtime or the other, also when loaded inside an actor from the package; its identity
    names the model it came from; jobs that need weights refuse it in one line."""
    from detr.errors import RaydetrError
    from jobs.cli import main as detr_cli
    from jobs.model_sources import check_model_spec, load_detector

    _, checkpoint, out = exported_tiny(tmp_path, "openvino")
    transforms, categories = TransformsConfig.small(), CATEGORIES

    loaded, exported = load_detector(str(out), allow_export=True)
    assert loaded.export is not None and loaded.checkpoint == b"" and exported.model is None
    assert (loaded.runtime, loaded.precision) == ("openvino", "float32")
    assert loaded.identity()["name"] == "tiny" and loaded.identity()["sha256"] == loaded.export.sha256
    assert exported.categories == categories and exported.transforms == transforms
    reference = Detector.from_checkpoint(str(checkpoint), score_threshold=0.0, runtime="onnxruntime")
    pictures = images()
    expected = reference.detect(pictures)
    for runtime in EXPORTED:
        package = loaded.payload(runtime, exported)
        assert set(package.files) == ({"model.xml", "model.bin", "model_unpadded.xml", "model_unpadded.bin"}
                                      if runtime == "openvino" else {"model.onnx", "model_unpadded.onnx"})
        in_actor = Detector.in_actor(package, threads=2, score_threshold=0.0, runtime=runtime)
        for got, theirs in zip(in_actor.detect(pictures), expected):
            assert_same_detections(got, theirs)

    with pytest.raises(RaydetrError, match="it runs in onnxruntime or openvino, not torch"):
        loaded.payload("torch", exported)
    with pytest.raises(RaydetrError, match="is an export folder: this job needs the checkpoint"):
        check_model_spec(str(out))
    assert detr_cli(["export", "--model", str(out), "--output", str(tmp_path / "again")]) == 1
    (tmp_path / "not-export").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder, but not an export folder"):
        check_model_spec(str(tmp_path / "not-export"), allow_export=True)
