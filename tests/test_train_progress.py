"""The training progress lines: the time left, from the epochs asked, the budget and what is done."""
from __future__ import annotations

import math

from jobs.train_progress import NOT_VALIDATED, Clock, epoch_line, format_duration, step_line, validated


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (0, 42, 190, 3725, -3)] == ["0s", "42s", "3m10s", "1h02m", "0s"]


def test_time_left_from_the_steps_and_epochs_done_and_never_past_the_budget():
    clock = Clock(epochs=3)
    assert clock.seconds_left(0, 5, 10.0, 0.0) is None  # the first epoch's length is not known yet
    clock.epoch_seconds.append(20.0)
    clock.epoch_steps.append(10)
    assert clock.seconds_left(0, 0, 0.0, 20.0) == 40.0  # after epoch 1 of 3: two more at 20 s
    # Half-way through epoch 2 at 1 s a step: 5 steps, then one epoch of 20 s.
    assert clock.seconds_left(1, 5, 5.0, 20.0) == 25.0
    budget = Clock(epochs=100, budget_seconds=60.0, epoch_seconds=[20.0], epoch_steps=[10])
    assert budget.seconds_left(1, 5, 5.0, 20.0) == 35.0  # 60 s budget - 20 trained - 5 in this epoch
    assert Clock(epochs=3, budget_seconds=60.0).seconds_left(0, 5, 10.0, 0.0) == 50.0  # the budget bounds it
    assert budget.seconds_left(3, 5, 5.0, 60.0) == 5.0  # past the budget: the rest of this epoch still runs
    capped = Clock(epochs=2, step_cap=4)  # max_steps_per_epoch: the length is known from the start
    assert capped.seconds_left(0, 2, 4.0, 0.0) == 4.0 + 8.0


def test_lines_say_step_loss_speed_time_left_and_validation():
    line = step_line(0, 3, 40, 1.23456, 7.81, 190.0, None)
    assert line == "epoch 1/3  step 40  loss 1.2346  7.8 images/s  3m10s left"
    assert step_line(1, 3, 50, 1.0, 8.0, None, 0.1234).endswith("time left known after the first epoch  "
                                                               "last val AP 0.1234")
    metrics = {"epoch_train_loss": 2.5, "train_images": 540.0, "train_seconds": 69.8, "train_images_per_s": 7.7,
               "val_AP": 0.25, "val_AP50": 0.5, "val_PQ": math.nan}
    assert epoch_line(0, 3, metrics, 140.0) == ("epoch 1/3 done  loss 2.5000  540 images in 1m10s (7.7 images/s)  "
                                                "AP 0.2500  AP50 0.5000  2m20s left")
    # An epoch that did not validate reports NOT_VALIDATED (Ray's checkpoint order; NaN did not survive its
    # state file): no AP in the line.
    assert epoch_line(0, 3, dict(metrics, val_AP=NOT_VALIDATED, val_AP50=NOT_VALIDATED), None).endswith("images/s)")
    assert not validated(NOT_VALIDATED) and not validated(math.nan) and validated(0.0)
