"""The exponential moving average of the weights: its decay schedule and what it averages, by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from detr.ema import ema_decay_at, ema_model


def test_decay_ramps_up_to_its_ceiling():
    assert ema_decay_at(0.99, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.99, 990) == pytest.approx(0.99)  # (1 + n) / (10 + n) passes 0.99 at n = 890
    assert ema_decay_at(0.99, 5000) == 0.99
    with pytest.raises(ValueError, match="decay"):
        ema_model(nn.Linear(2, 2), 1.0)


def test_average_of_weights_and_batch_norm_statistics_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    average = ema_model(model, decay=0.3)
    expected = 0.0
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        model.train()(torch.randn(4, 2))
        average.update_parameters(model)
        d = ema_decay_at(0.3, step - 1)
        expected = float(step) if step == 1 else d * expected + (1 - d) * step  # the first update copies
    for p in average.module.parameters():
        assert torch.allclose(p, torch.full_like(p, expected))
    # A copy, then decays 2/11 and 3/12, then the ceiling 0.3 twice: the average trails the weights (5).
    assert expected == pytest.approx(0.3 * (0.3 * 2.7045 + 0.7 * 4) + 0.7 * 5, abs=1e-3)
    bn, averaged_bn = model[1], average.module[1]
    assert averaged_bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5  # counts follow
    assert not torch.allclose(averaged_bn.running_mean, bn.running_mean)  # statistics are averaged too
    # The model itself is untouched, and the average is a separate copy.
    assert all(torch.equal(p, torch.full_like(p, 5.0)) for p in model.parameters())
    assert average.module[0].weight.data_ptr() != model[0].weight.data_ptr()
