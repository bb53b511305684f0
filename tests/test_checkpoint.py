"""Checkpoints: our format round-trips without executing code; the official layout loads and exports."""
import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

import detr
from detr import (DETRConfig, build_model, from_official, load_checkpoint, official_state_dict, pad_images,
                  save_checkpoint)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def batch():
    g = torch.Generator().manual_seed(3)
    return pad_images([torch.randn(3, 64, 80, generator=g), torch.randn(3, 72, 64, generator=g)])


def same_outputs(a, b, atol=0.0):
    images, mask = batch()
    with torch.no_grad():
        oa, ob = a.eval()(images, mask), b.eval()(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(oa[key], ob[key], atol=atol, rtol=0)


def test_our_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=6, pre_norm=True)
    meta = {"categories": [{"id": 1, "name": "circle"}, {"id": 5, "name": "star"}], "epoch": 3}
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.pt", metadata=meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "raydetr.detr" and raw["config"]["pre_norm"] is True
    loaded, metadata = load_checkpoint(path)
    assert loaded.config == model.config and metadata == meta and not loaded.training
    same_outputs(model, loaded)
    assert not list(tmp_path.glob("ckpt/.*tmp"))  # atomic write leaves no temporary file


def test_metadata_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match="metadata.when"):
        save_checkpoint(build_model("tiny", num_classes=2), tmp_path / "m.pt", metadata={"when": object()})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_executes_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "raydetr.detr", "model": _Exploit()}))
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    with pytest.raises(ValueError, match="evil.pt"):
        from_official(evil)
    assert not (tmp_path / "pwned").exists()


def test_not_a_raydetr_checkpoint_is_named(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a raydetr checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def _read_key_table(name):
    rows = [line.split("\t") for line in (REFERENCE / name).read_text().splitlines() if line.strip()]
    return {key: [int(x) for x in shape.strip("[]").split(",") if x.strip()] for key, shape, _ in rows}


@pytest.mark.parametrize("preset, table", [("detr_r50", "detr_r50_keys.tsv"), ("detr_r101", "detr_r101_keys.tsv"),
                                           ("detr_r50_dc5", "detr_r50_keys.tsv")])
def test_official_export_has_exactly_the_release_layout(preset, table):
    expected = _read_key_table(table)
    state = official_state_dict(build_model(preset))
    assert {k: list(v.shape) for k, v in state.items()} == expected


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pre_norm": True, "position_embedding": "learned", "backbone": "resnet34"},
     {"backbone": "resnet50", "enc_layers": 1, "dec_layers": 3, "num_queries": 7, "num_classes": 12,
      "hidden_dim": 48, "nheads": 6, "dim_feedforward": 96}],
    ids=["tiny", "r34-prenorm-learned", "r50-asymmetric"],
)
def test_official_layout_round_trip_infers_the_architecture(overrides):
    torch.manual_seed(0)
    model = build_model("tiny", **{"num_classes": 5, **overrides})
    state = {"model": official_state_dict(model)}
    loaded = from_official(state, nheads=model.config.nheads, padding_invariant=True)
    for field in ("backbone", "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                  "num_classes", "pre_norm", "position_embedding"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    same_outputs(model, loaded)


def test_official_file_with_training_args_and_new_class_count(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=5, backbone="resnet50", dilation=True, nheads=2, padding_invariant=False)
    args = argparse.Namespace(nheads=2, dilation=True, dropout=0.0, lr=1e-4, masks=False)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official_state_dict(model), "args": args, "epoch": 10}, path)

    loaded = from_official(path)  # heads and dilation come from the file's args
    assert (loaded.config.nheads, loaded.config.dilation, loaded.config.dropout) == (2, True, 0.0)
    assert not loaded.config.padding_invariant and not loaded.training
    same_outputs(model, loaded, atol=1e-6)

    finetune = from_official(path, num_classes=3)
    assert finetune.class_embed.weight.shape == (4, model.config.hidden_dim)
    torch.testing.assert_close(finetune.query_embed.weight, model.query_embed.weight)
    torch.testing.assert_close(finetune.bbox_embed.layers[0].weight, model.bbox_embed.layers[0].weight)


def test_malformed_official_checkpoints_are_explained():
    with pytest.raises(ValueError, match="not an official DETR checkpoint"):
        from_official({"model": {"foo": torch.zeros(1)}})
    # Panoptic checkpoints load (tests/test_panoptic_reference.py); one without its mask head is explained.
    with pytest.raises(ValueError, match="panoptic DETR checkpoint .*without its mask head"):
        from_official({"model": {"detr.query_embed.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="not a complete panoptic DETR checkpoint"):
        from_official({"model": {"detr.class_embed.weight": torch.zeros(1)}})


def test_library_has_no_ray_or_mlflow_dependency():
    import subprocess
    import sys

    code = "import sys, detr; bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert detr.DETRConfig is DETRConfig


def test_a_checkpoint_saved_before_the_parts_loads_as_it_was(tmp_path):
    """Checkpoints (and registered models) written before the model was assembled from parts hold a flat
    config and the parts' weights under their old names, with a panoptic detector's keys unprefixed."""
    from detr import DenseHead, FocalLoss, MaskHead, SemanticHead, TwoStage
    from detr.checkpoint import checkpoint_dict

    torch.manual_seed(0)
    model = build_model("tiny_panoptic", num_classes=5, focal=FocalLoss(), dense_head=DenseHead(2),
                        two_stage=TwoStage(nms=0.5, content=True), mask_head=MaskHead(scaled_attention=True),
                        semantic_head=SemanticHead(2.0))
    new = checkpoint_dict(model)
    old_names = {"dense_head.class_embed.": "encoder_class_embed.", "dense_head.bbox_embed.": "encoder_bbox_embed.",
                 "proposals.query_pos.": "proposal_pos.", "semantic_head.classifier.": "semantic_embed."}

    def old_key(key: str) -> str:
        key = key.removeprefix("detr.")
        return next((old + key[len(new):] for new, old in old_names.items() if key.startswith(new)), key)

    config = {k: v for k, v in new["config"].items()
              if k not in ("focal", "dense_head", "two_stage", "mask_head", "semantic_head")}
    config.update(focal_loss=True, focal_alpha=0.25, focal_gamma=2.0, encoder_aux_matches=2, two_stage=True,
                  proposal_nms=0.5, proposal_content=True, masks=True, freeze_detector=True,
                  scaled_mask_attention=True, semantic_loss_coef=2.0, query_groups=1, box_refine=False)
    old = {**new, "config": config, "model": {old_key(k): v for k, v in new["model"].items()}}
    assert "encoder_class_embed.weight" in old["model"] and "mask_head.lay1.weight" in old["model"]
    torch.save(old, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded.config == model.config
    same_outputs(model, loaded)
    images, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(images, mask)["pred_masks"], model(images, mask)["pred_masks"])


def test_weights_load_into_a_model_that_differs_by_one_rule():
    from detr import DenseHead, FocalLoss, MaskHead, SemanticHead, TwoStage
    from detr.weights import load_weights

    torch.manual_seed(0)
    detector = build_model("tiny_panoptic", num_classes=5, mask_head=None)
    panoptic = load_weights(build_model("tiny_panoptic", num_classes=5), detector.state_dict())  # fresh mask head
    torch.testing.assert_close(panoptic.detr.query_embed.weight, detector.query_embed.weight)
    back = load_weights(build_model("tiny_panoptic", num_classes=5, mask_head=None), panoptic.state_dict())
    torch.testing.assert_close(back.class_embed.weight, detector.class_embed.weight)  # the detector alone
    other = load_weights(build_model("tiny_panoptic", num_classes=9, mask_head=MaskHead(), focal=FocalLoss(),
                                     dense_head=DenseHead(2), two_stage=TwoStage()), detector.state_dict())
    assert other.detr.class_embed.weight.shape[0] == 10  # another class count: a fresh class head
    torch.testing.assert_close(other.detr.transformer.state_dict(), detector.transformer.state_dict())
    # A fast-recipe model (dense encoder head, semantic head) of 3 classes fine-tunes into one of 7: every head
    # with one output per class starts fresh, the rest loads.
    fast = dict(focal=FocalLoss(), dense_head=DenseHead(2), two_stage=TwoStage(), semantic_head=SemanticHead())
    three = build_model("tiny_panoptic", num_classes=3, **fast)
    seven = load_weights(build_model("tiny_panoptic", num_classes=7, **fast), three.state_dict())
    assert seven.detr.dense_head.class_embed.weight.shape[0] == 8 and seven.detr.semantic_head.classifier.out_features == 7
    torch.testing.assert_close(seven.detr.dense_head.bbox_embed.state_dict(), three.detr.dense_head.bbox_embed.state_dict())
    with pytest.raises(ValueError, match=r"missing \['transformer.encoder.layers.0"):
        load_weights(build_model("tiny_panoptic", num_classes=5, mask_head=None),
                     {k: v for k, v in detector.state_dict().items() if "encoder.layers.0." not in k})
    with pytest.raises(ValueError, match="do not fit the model"):
        load_weights(build_model("tiny", num_classes=5), detector.state_dict())  # another width
