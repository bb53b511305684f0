"""Training's own progress lines on the driver, in place of Ray's internals.

Rank 0 of the training workers sends a line every `schedule.log_every_steps` steps and one at the end of
each epoch (step, epoch, loss, images/s, the time left, the last validation AP) through a queue actor; the
driver prints them as they come. The driver asks Ray to keep the workers' own output (and Ray Train's) in
the cluster's logs unless `detr train --verbose`, so these lines are what a user sees.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 190 -> '3m10s', 42 -> '42s'."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class Clock:
    """What the time left is estimated from: the epochs asked, the time budget, and what is done so far."""

    epochs: int
    budget_seconds: float | None = None
    start_epoch: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)
    step_cap: int | None = None

    def steps_per_epoch(self) -> int | None:
        """Known once an epoch has ended (or from `max_steps_per_epoch`)."""
        return self.epoch_steps[-1] if self.epoch_steps else self.step_cap

    def seconds_left(self, epoch: int, step_in_epoch: int, seconds_in_epoch: float,
                     trained_seconds: float) -> float | None:
        """Training time left at `step_in_epoch` of `epoch` (0-based), or None before it can be told; never
        past the time budget, except for the rest of the epoch under way (the run stops at the first epoch
        ending after the budget)."""
        per_epoch = self.steps_per_epoch()
        estimate = rest_of_epoch = None
        if per_epoch and step_in_epoch:
            per_step = seconds_in_epoch / step_in_epoch
            epoch_time = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else \
                per_step * per_epoch
            rest_of_epoch = max(0, per_epoch - step_in_epoch) * per_step
            estimate = rest_of_epoch + (self.epochs - epoch - 1) * epoch_time
        elif not step_in_epoch and self.epoch_seconds:  # at an epoch's end
            estimate = (self.epochs - epoch - 1) * sum(self.epoch_seconds) / len(self.epoch_seconds)
        if self.budget_seconds is not None:
            left = max(0.0, self.budget_seconds - trained_seconds - seconds_in_epoch)
            bound = max(left, rest_of_epoch or 0.0)  # past the budget, the epoch still runs to its end
            estimate = bound if estimate is None else min(estimate, bound)
        return estimate


def step_line(epoch: int, epochs: int, step: int, loss: float, images_per_s: float, left: float | None,
              last_ap: float | None) -> str:
    """One line per `log_every_steps` steps."""
    parts = [f"epoch {epoch + 1}/{epochs}", f"step {step}", f"loss {loss:.4f}", f"{images_per_s:.1f} images/s",
             f"{format_duration(left)} left" if left is not None else "time left known after the first epoch"]
    if last_ap is not None:
        parts.append(f"last val AP {last_ap:.4f}")
    return "  ".join(parts)


NOT_VALIDATED = -1.0
"""The validation score (val_AP, val_PQ) an epoch reports when it did not validate: below any real score in Ray's
checkpoint order. Not NaN: Ray Train keeps that order in a JSON state file where NaN turns into null, and a run
resumed from it failed at its first checkpoint."""


def validated(value: float | None) -> bool:
    """Whether a reported validation score is one (not missing, NaN or NOT_VALIDATED)."""
    return value is not None and not math.isnan(value) and value != NOT_VALIDATED


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], left: float | None) -> str:
    """One line per epoch: its mean loss, speed, validation (when it ran) and the time left."""
    parts = [f"epoch {epoch + 1}/{epochs} done", f"loss {metrics.get('epoch_train_loss', math.nan):.4f}",
             f"{metrics['train_images']:.0f} images in {format_duration(metrics['train_seconds'])} "
             f"({metrics['train_images_per_s']:.1f} images/s)"]
    for name in ("val_AP", "val_AP50", "val_PQ"):
        value = metrics.get(name)
        if validated(value):
            parts.append(f"{name[4:]} {value:.4f}")
    if left is not None:
        parts.append(f"{format_duration(left)} left")
    return "  ".join(parts)


class Reporter:
    """Rank 0's side: turns the loop's numbers into lines on the queue."""

    def __init__(self, queue: "ProgressQueue", clock: Clock) -> None:
        self.queue, self.clock = queue, clock
        self.last_ap: float | None = None

    def step(self, epoch: int, step: int, step_in_epoch: int, loss: float, images_per_s: float,
             seconds_in_epoch: float, trained_seconds: float) -> None:
        left = self.clock.seconds_left(epoch, step_in_epoch, seconds_in_epoch, trained_seconds)
        self.queue.put(step_line(epoch, self.clock.epochs, step, loss, images_per_s, left, self.last_ap))

    def epoch_end(self, epoch: int, metrics: dict[str, float], trained_seconds: float, last: bool) -> None:
        self.clock.epoch_seconds.append(metrics["train_seconds"])
        self.clock.epoch_steps.append(int(metrics["train_steps"]))
        ap = metrics.get("val_AP")
        if validated(ap):
            self.last_ap = ap
        left = 0.0 if last else self.clock.seconds_left(epoch, 0, 0.0, trained_seconds)
        self.queue.put(epoch_line(epoch, self.clock.epochs, metrics, left))


class ProgressQueue:
    """Rank 0 puts lines; the driver's printer takes them. A queue actor that holds no CPU, so it starts
    whatever the training workers hold."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})

    def put(self, line: str) -> None:
        self.queue.put_nowait(line)

    def printing(self, write: Callable[[str], Any] | None = None) -> "Printer":
        return Printer(self.queue, write or (lambda line: print(line, flush=True)))


class Printer:
    """A driver thread printing the queue's lines while training runs (`with queue.printing(): ...`)."""

    def __init__(self, queue, write: Callable[[str], Any]) -> None:
        self.queue, self.write = queue, write
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def __enter__(self) -> "Printer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._drain()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            try:
                self.write(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone (the job is ending): stop printing
                return

    def _drain(self) -> None:
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self.write(line)
        except Exception:  # noqa: BLE001 - the queue's actor is gone: nothing more to print
            pass
