"""Panoptic fidelity to the official implementation (DETRsegm, PostProcessSegm, PostProcessPanoptic).

`../shared/reference/official_tiny_r18_panoptic.pt` and `fixtures/official/panoptic_*.pt`
hold random-weight panoptic models in the official layout, padded batches, targets with
masks, and what the official code computed: outputs with `pred_masks`, matcher indices,
losses with `loss_mask`/`loss_dice`, instance masks and the panoptic merge.
`fixtures/official/panoptic_postprocess_cases.pt` holds hand-built outputs (stuff to merge,
a segment too small to keep, an image where nothing is kept) and the official
post-processing of them. See `fixtures/official/README.md`.

Why the panoptic merge is compared on the official outputs: in a random-weight mask head the
query-specific attention maps are tiny next to the shared features, so the masks of
different queries differ by about 1e-7 (the shared reference: median top-2 gap 3.5e-7) and
the per-pixel winner is decided by float rounding. The official code itself, rerun on this
machine (its outputs 7e-6 from the stored ones), gives the stored category on only 84% and
92% of the pixels. So the model is checked output by output (to 1e-4), the segments it
yields end to end are checked by category, and the merge is checked pixel for pixel on the
outputs the official merge saw.
"""
from pathlib import Path

import pytest
import torch
from reference.seeded_weights import state_dict_from_fixture

from detr import InstanceMaskPostProcess, PanopticPostProcess, SetCriterion, from_official, official_state_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
MODEL_FIXTURES = ["panoptic_r50_dc5.pt", "panoptic_r34_prenorm.pt"]


def overrides(config: dict) -> dict:
    return {k: config[k] for k in ("dilation", "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou",
                                   "bbox_loss_coef", "giou_loss_coef", "eos_coef", "mask_loss_coef",
                                   "dice_loss_coef", "dropout") if k in config}


@pytest.fixture(scope="module")
def shared():
    ref = torch.load(SHARED / "official_tiny_r18_panoptic.pt", weights_only=True)
    return from_official(ref["checkpoint"], **overrides(ref["config"])), ref


def load_fixture(name):
    ref = torch.load(FIXTURES / name, weights_only=True)
    state = state_dict_from_fixture(ref["weights"])
    return from_official({"model": state}, **overrides(ref["config"])), ref


def category_map(id_map, segments_info, id_offset=0):
    out = torch.full(id_map.shape, -1, dtype=torch.long)
    for s in segments_info:
        out[id_map.long() == s["id"] + id_offset] = s["category_id"]
    return out


def check_model(model, ref):
    cfg = ref["config"]
    assert model.config.masks and model.config.fpn_dims == tuple(cfg["fpn_dims"])
    assert (model.config.backbone, model.config.nheads, model.config.hidden_dim) == (
        cfg["backbone"], cfg["nheads"], cfg["hidden_dim"])
    with torch.no_grad():
        out = model(ref["batch"]["tensors"].float(), ref["batch"]["mask"])
    expected = ref["expected_outputs"]
    # Logits reach |12|; the official code itself, rerun here, moves them by up to 1.8e-4 (ours: 1.7e-4).
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], atol=2e-4, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_masks"], expected["pred_masks"], atol=1e-4, rtol=0)
    assert len(out.get("aux_outputs", [])) == len(expected.get("aux_outputs", []))
    for ours, theirs in zip(out.get("aux_outputs", []), expected.get("aux_outputs", [])):
        torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], atol=2e-4, rtol=0)
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-4, rtol=0)

    criterion = SetCriterion.from_config(model.config)
    for (rows, cols), (exp_rows, exp_cols) in zip(criterion.matcher(out, ref["targets"]), ref["expected_indices"]):
        assert rows.tolist() == exp_rows.tolist() and cols.tolist() == exp_cols.tolist()
    losses = criterion(out, ref["targets"])
    assert set(losses) == set(ref["expected_losses"])
    for name, value in ref["expected_losses"].items():
        assert losses[name].item() == pytest.approx(float(value), abs=1e-4), name

    # Instance masks (official PostProcess + PostProcessSegm), end to end.
    instances = InstanceMaskPostProcess()(out, ref["image_sizes"], ref["orig_sizes"])
    for ours, theirs in zip(instances, ref["expected_instances"]):
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-3, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(ours["labels"], theirs["labels"])
        differing = (ours["masks"] != theirs["masks"][:, 0].bool()).float().mean().item()
        assert differing <= 1e-3

    post = PanopticPostProcess(ref["is_thing"], threshold=ref["panoptic_threshold"])
    # End to end: the same segments (categories, thing or stuff, in order).
    for ours, theirs in zip(post(out, ref["image_sizes"], ref["orig_sizes"]), ref["expected_panoptic"]):
        assert [(s["category_id"], s["isthing"]) for s in ours["segments_info"]] == [
            (s["category_id"], s["isthing"]) for s in theirs["segments_info"]]
        assert ours["id_map"].shape == tuple(theirs["id_map"].shape)
    # The merge itself, on the outputs the official merge saw: identical pixels and areas.
    check_panoptic(post(expected, ref["image_sizes"], ref["orig_sizes"]), ref["expected_panoptic"])
    return out


def check_panoptic(results, expected):
    for ours, theirs in zip(results, expected):
        # Our segment ids start at 1 (0 is COCO's "unlabelled"); the official ones at 0.
        assert [{**s, "id": s["id"] - 1} for s in ours["segments_info"]] == [
            {k: s[k] for k in ("id", "category_id", "isthing", "area")} for s in theirs["segments_info"]]
        if theirs["segments_info"]:
            assert torch.equal(ours["id_map"] - 1, theirs["id_map"].long())
            same = (category_map(ours["id_map"], ours["segments_info"])
                    == category_map(theirs["id_map"], theirs["segments_info"])).float().mean().item()
            assert same >= 0.995
        else:
            assert (ours["id_map"] == 0).all()


def test_shared_official_tiny_r18_panoptic(shared):
    model, ref = shared
    assert not model.training and not model.config.padding_invariant
    check_model(model, ref)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_official_panoptic_configurations(name):
    model, ref = load_fixture(name)
    assert (model.config.pre_norm, model.config.position_embedding, model.config.dilation) == (
        ref["config"]["pre_norm"], ref["config"]["position_embedding"], ref["config"]["dilation"])
    check_model(model, ref)


def test_official_merge_rules_on_hand_built_outputs():
    """Stuff queries of one class merged, a 2-pixel segment removed, an image with nothing kept;
    target sizes that are not multiples of the processed ones (PIL's nearest-neighbour rule)."""
    case = torch.load(FIXTURES / "panoptic_postprocess_cases.pt", weights_only=True)
    post = PanopticPostProcess(case["is_thing"], threshold=case["threshold"])
    results = post(case["outputs"], case["processed_sizes"], case["target_sizes"])
    check_panoptic(results, case["expected_panoptic"])
    assert results[0]["queries"].tolist() == [0, 1, 2, 4]  # query 3 merged into 2, query 5 too small
    instances = InstanceMaskPostProcess()(case["outputs"], case["processed_sizes"], case["target_sizes"])
    for ours, theirs in zip(instances, case["expected_instances"]):
        assert torch.equal(ours["masks"], theirs["masks"][:, 0])
        assert torch.equal(ours["labels"], theirs["labels"])


def test_official_panoptic_layout_round_trips(shared):
    model, ref = shared
    exported = official_state_dict(model)
    original = ref["checkpoint"]["model"]
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k].float()) for k in exported)
