"""PostProcess: scores without no-object, boxes in pixels of (height, width), threshold and top-k."""
import pytest
import torch

from detr import PostProcess


def outputs():
    logits = torch.tensor([[[2.0, 0.0, 0.0, 5.0],   # mostly no-object; best real class 0
                            [0.0, 4.0, 0.0, 0.0],   # class 1, confident
                            [0.0, 0.0, 1.0, 0.0]]])  # class 2, weak
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2], [0.1, 0.1, 0.2, 0.2]]])
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_scores_labels_and_pixel_boxes():
    (result,) = PostProcess()(outputs(), torch.tensor([[200, 400]]))  # height 200, width 400
    prob = outputs()["pred_logits"][0].softmax(-1)
    torch.testing.assert_close(result["scores"], prob[:, :-1].max(-1).values)
    assert result["labels"].tolist() == [0, 1, 2]
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.0, 0.0, 400.0, 200.0]))
    torch.testing.assert_close(result["boxes"][1], torch.tensor([0.0, 80.0, 200.0, 120.0]))


def test_threshold_and_top_k_sort_and_trim():
    (by_score,) = PostProcess(top_k=2)(outputs(), [[10, 10]])
    assert by_score["labels"].tolist() == [1, 2]
    assert by_score["scores"][0] >= by_score["scores"][1]
    (confident,) = PostProcess(score_threshold=0.5)(outputs(), [[10, 10]])
    assert confident["labels"].tolist() == [1]
    (none,) = PostProcess(score_threshold=0.99)(outputs(), [[10, 10]])
    assert none["boxes"].shape == (0, 4) and none["labels"].dtype == torch.int64


def test_rejects_wrong_target_sizes():
    with pytest.raises(ValueError, match="height, width"):
        PostProcess()(outputs(), torch.tensor([200, 400]))
    with pytest.raises(ValueError, match="target sizes"):
        PostProcess()(outputs(), [[1, 2], [3, 4]])
    with pytest.raises(ValueError):
        PostProcess(top_k=0)


def test_the_default_score_threshold_follows_the_models_scoring():
    from detr import FocalLoss, build_model, default_score_threshold
    from pipelines.labelling.options import LabelOptions

    softmax, sigmoid = build_model("tiny", num_classes=3), build_model("tiny", num_classes=3, focal=FocalLoss())
    assert (default_score_threshold(softmax.config), default_score_threshold(sigmoid.config)) == (0.5, 0.2)
    assert LabelOptions().score_threshold is None  # the label job takes the model's
    assert LabelOptions().for_model(0.2).score_threshold == 0.2
    assert LabelOptions(score_threshold=0.7).for_model(0.2).score_threshold == 0.7  # given: kept
