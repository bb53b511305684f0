"""pad_images: the (images, mask) batch form of differently sized images."""
import pytest
import torch

from detr import image_sizes_from_mask, pad_images


def test_pads_bottom_right_and_masks_padding():
    a, b = torch.rand(3, 5, 7), torch.rand(3, 8, 4)
    images, mask = pad_images([a, b])
    assert images.shape == (2, 3, 8, 7) and mask.shape == (2, 8, 7) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and torch.equal(images[1, :, :8, :4], b)
    assert images[0, :, 5:].abs().sum() == 0 and images[1, :, :, 4:].abs().sum() == 0
    assert mask[0, :5, :7].logical_not().all() and mask[0, 5:].all()
    assert mask[1, :, 4:].all() and not mask[1, :, :4].any()
    assert image_sizes_from_mask(mask).tolist() == [[5, 7], [8, 4]]


def test_size_divisibility_rounds_up():
    images, mask = pad_images([torch.rand(3, 33, 20)], size_divisibility=32)
    assert images.shape[-2:] == (64, 32)
    assert image_sizes_from_mask(mask).tolist() == [[33, 20]]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pad_images([])
    with pytest.raises(ValueError, match="expected"):
        pad_images([torch.rand(5, 5)])
    with pytest.raises(ValueError, match="channel"):
        pad_images([torch.rand(3, 5, 5), torch.rand(1, 5, 5)])
