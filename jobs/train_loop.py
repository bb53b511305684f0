"""What each Ray Train worker runs: the DETR training loop with checkpoints, validation and MLflow.

Per epoch every worker iterates its shard of the training dataset (batches from
the data pipeline's collate function), runs `detr.engine.train_step` under DDP,
and at the end of the epoch:

1. validates when due: every worker predicts on its shard of the validation set,
   rank 0 gathers all predictions and ground truth and computes COCO AP once;
2. rank 0 writes a checkpoint (model in raydetr's format + optimiser, scheduler,
   epoch, step and RNG states) and every worker calls `ray.train.report`, so Ray
   keeps the best checkpoints by validation AP and restarts a failed worker group
   from the latest one;
3. rank 0 logs the epoch's metrics to the job's MLflow run. A resumed run never
   logs a step twice: it starts after the last step MLflow already holds.

Rank 0 also sends the driver a progress line every `schedule.log_every_steps` steps and per epoch
(`jobs.train_progress`).

Workers stay in lock step even when their shards differ in length: before each
step they agree (one all-reduce) to stop as soon as any of them runs out.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from detr import SetCriterion, build_model
from detr.checkpoint import unwrap_model
from detr.config import PANOPTIC_THRESHOLD, DETRConfig
from detr.ema import ema_model
from detr.engine import predict, predict_panoptic, train_step
from detr.evaluation import coco_ground_truth, evaluate_coco
from detr.optim import build_deadline_schedule, build_lr_scheduler, build_optimizer, build_warmup_scheduler
from detr.panoptic_evaluation import PANOPTIC_STAT_NAMES
from detr.training_checkpoint import (Progress, TrainingParts, load_training_checkpoint, rng_state,
                                      save_training_checkpoint, set_rng_state)
from detr.weights import load_weights
from jobs.config_files import build_dataclass
from jobs.train_config import TrainJobConfig
from jobs.train_progress import NOT_VALIDATED, Clock, Reporter, validated

VAL_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")
"""Validation's COCO numbers; with masks it also reports PQ (`PANOPTIC_STAT_NAMES`) at evaluation size."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_have_batch(has_batch: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if has_batch else 0], device=device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _gather_to_rank0(obj: Any, world_size: int, rank: int) -> list[Any] | None:
    if not _distributed():
        return [obj]
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


class EpochMetrics:
    """Running averages of the step metrics, flushed every `every` steps into logged rows."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.last_step = 0

    def add(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        """Add one step's metrics; returns the row it closed (every `every` steps), else None."""
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.window_steps += 1
        self.steps += 1
        self.last_step = step
        if self.window_steps == self.every:
            self.flush()
            return self.rows[-1][1]
        return None

    def flush(self) -> None:
        """Turn the open window into a logged row (at every `every` steps and at the end of an epoch)."""
        if self.window_steps:
            self.rows.append((self.last_step, {f"train_{k}": v / self.window_steps for k, v in self.window.items()}))
            self.window, self.window_steps = {}, 0

    def epoch_means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.totals.items()}


class Trainer:
    """State of one worker's training run (built from the train_loop_config dict)."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.job: TrainJobConfig = build_dataclass(TrainJobConfig, loop_config["job"])
        self.model_config = DETRConfig.from_dict(loop_config["model_config"])
        self.metadata: dict[str, Any] = loop_config["metadata"]
        self.tracking_uri: str | None = loop_config.get("tracking_uri")
        self.run_id: str | None = loop_config.get("run_id")
        self.pid_dir: str | None = loop_config.get("pid_dir")
        self.epoch_clock = loop_config.get("epoch_clock")
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        threads = self.job.scaling.torch_threads or self.job.scaling.cpus_per_worker
        torch.set_num_threads(max(1, threads))
        self.device = ray.train.torch.get_device()
        seed = self.job.schedule.seed + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

        model = build_model(self.model_config)
        if loop_config.get("init_state") is not None:
            load_weights(model, loop_config["init_state"], "init_from weights")
        self.model = ray.train.torch.prepare_model(model)
        self.criterion = SetCriterion.from_config(self.model_config).to(self.device)
        self.optimizer = build_optimizer(unwrap_model(self.model), self.job.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, self.job.optimizer)
        self.warmup = build_warmup_scheduler(self.optimizer, self.job.optimizer)  # per step; None without
        self.decay = build_deadline_schedule(self.optimizer, self.job.optimizer)  # per step; None: step schedule
        self.steps_per_epoch: int | None = self.job.schedule.max_steps_per_epoch
        decay = self.job.optimizer.ema_decay
        self.ema = ema_model(unwrap_model(self.model), decay) if decay else None
        self.start_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self._restore(ray.train.get_checkpoint())
        self.autocast = torch.bfloat16 if (self.job.schedule.bf16 and self.device.type == "cuda") else None
        self.run = None
        self.logged_until = {"step": -1, "epoch": -1}
        if self.rank == 0 and self.run_id and self.tracking_uri:
            from jobs.tracking import TrackedRun

            self.run = TrackedRun(self.tracking_uri, self.run_id)
            self.logged_until = {"step": self.run.last_step("train_loss"), "epoch": self.run.last_step("epoch")}
        self.reporter = None
        if self.rank == 0 and loop_config.get("progress") is not None:
            schedule = self.job.schedule
            budget = schedule.time_budget_minutes * 60 if schedule.time_budget_minutes is not None else None
            self.reporter = Reporter(loop_config["progress"], Clock(schedule.epochs, budget, self.start_epoch,
                                                                    step_cap=schedule.max_steps_per_epoch))
            if self.start_epoch:
                self.reporter.queue.put(f"resumed from the checkpoint after epoch {self.start_epoch} (step "
                                        f"{self.global_step})")
        if self.pid_dir:  # lets tests and operators find (and kill) a worker process
            os.makedirs(self.pid_dir, exist_ok=True)
            with open(os.path.join(self.pid_dir, f"rank{self.rank}.pid"), "w") as f:
                f.write(str(os.getpid()))

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is validated, checkpointed and exported: the weights' average when there is one."""
        return self._parts().exported

    # -- checkpoints ---------------------------------------------------------------
    def _parts(self) -> TrainingParts:
        return TrainingParts(unwrap_model(self.model), self.optimizer, self.scheduler, self.warmup, self.ema,
                             self.decay)

    def _restore(self, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            progress = load_training_checkpoint(directory, self._parts())
        self.start_epoch, self.global_step, self.train_seconds = progress.epoch, progress.global_step, \
            progress.train_seconds
        set_rng_state(progress.rng[min(self.rank, len(progress.rng) - 1)])

    def _write_checkpoint(self, directory: str, epoch: int, metrics: dict[str, float], rng: list) -> None:
        metadata = {**self.metadata, "epoch": epoch, "global_step": self.global_step,
                    "metrics": {k: float(v) for k, v in metrics.items()}}
        if self.ema is not None:
            metadata["ema_decay"] = self.job.optimizer.ema_decay
        save_training_checkpoint(directory, self._parts(),
                                 Progress(epoch + 1, self.global_step, self.train_seconds, rng), metadata)

    # -- the loop ------------------------------------------------------------------
    def _batches(self, shard, batch_size: int) -> Iterator:
        from pipelines.training.collate import DetectionCollate

        return iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=DetectionCollate(), drop_last=False))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        if self.epoch_clock is not None:
            self.epoch_clock.set(epoch)  # before reading: this epoch's augmentation, also after a resume
        batches = self._batches(shard, self.job.data.batch_size)
        accum = self.job.schedule.grad_accum_steps
        cap = self.job.schedule.max_steps_per_epoch
        self.model.train()
        self.criterion.train()
        metrics = EpochMetrics(self.job.schedule.log_every_steps)
        images = 0
        data_time = step_time = 0.0
        steps = 0
        start = time.perf_counter()
        while cap is None or steps < cap:
            t0 = time.perf_counter()
            micro = []
            for _ in range(accum):
                batch = next(batches, None)
                if batch is None:
                    break
                micro.append(batch)
            data_time += time.perf_counter() - t0
            if not _all_have_batch(len(micro) == accum, self.device):
                break
            t1 = time.perf_counter()
            step_metrics = train_step(self.model, self.criterion, self.optimizer, micro,
                                      self.job.optimizer.clip_max_norm, self.autocast)
            step_time += time.perf_counter() - t1
            images += sum(len(b[2]) for b in micro)
            if self.warmup is not None:
                self.warmup.step()
            if self.ema is not None:
                self.ema.update_parameters(unwrap_model(self.model))
            steps += 1
            if self.decay is not None:
                self.decay.step(self._progress(epoch, steps, time.perf_counter() - start))
            self.global_step += 1
            row = metrics.add(self.global_step, step_metrics)
            if self.reporter is not None and row is not None:  # a window of log_every_steps steps just closed
                seconds = time.perf_counter() - start
                self.reporter.step(epoch, self.global_step, steps, row["train_loss"],
                                   images * self.world_size / max(seconds, 1e-9), seconds, self.train_seconds)
        metrics.flush()
        elapsed = time.perf_counter() - start
        self.steps_per_epoch = self.steps_per_epoch or steps
        total_images, total_time = _sum_across_workers([images, elapsed], self.device)
        # Every worker takes the same (mean) duration, so they agree on when the time budget is spent.
        mean_seconds = total_time / self.world_size
        epoch_metrics = {f"epoch_train_{k}": v for k, v in metrics.epoch_means().items()}
        epoch_metrics.update({
            "epoch": float(epoch),
            "train_steps": float(steps),
            "train_images": total_images,
            "train_images_per_s": total_images / max(mean_seconds, 1e-9),
            "train_seconds": mean_seconds,
            "train_data_time_frac": data_time / max(elapsed, 1e-9),
            "train_step_time_frac": step_time / max(elapsed, 1e-9),
        })
        for group in self.optimizer.param_groups:
            epoch_metrics[f"lr_{group.get('name', 'group')}"] = group["lr"]
        self._step_rows = metrics.rows
        return epoch_metrics

    def _progress(self, epoch: int, steps: int, seconds: float) -> float:
        """The share of the run done (for the cosine schedule): epochs done, or the time budget spent,
        whichever is further. Workers agree on it: the time is their mean (one small all-reduce per step)."""
        schedule = self.job.schedule
        within = min(1.0, steps / self.steps_per_epoch) if self.steps_per_epoch else 0.0
        done = (epoch + within) / schedule.epochs
        if schedule.time_budget_minutes is not None:
            seconds = _sum_across_workers([seconds], self.device)[0] / self.world_size
            done = max(done, (self.train_seconds + seconds) / (schedule.time_budget_minutes * 60))
        return done

    def validate(self) -> dict[str, float]:
        import ray.train

        shard = ray.train.get_dataset_shard("val")
        batches = self._batches(shard, self.job.data.eval_batch_size)
        targets: list[dict] = []

        def keeping_targets():
            for batch in batches:
                targets.extend(batch[2])
                yield batch

        panoptic = None
        if self.model_config.masks:
            detections, panoptic = self._panoptic_validation(keeping_targets())
        else:
            detections = predict(self.eval_model, keeping_targets(), autocast_dtype=self.autocast)
        gathered = _gather_to_rank0((detections, targets), self.world_size, self.rank)
        result = {f"val_{name}": float("nan") for name in VAL_STATS}
        if self.rank == 0:
            all_detections: dict[int, Any] = {}
            all_targets: list[dict] = []
            for dets, tgts in gathered:
                all_detections.update(dets)
                all_targets.extend(tgts)
            ground_truth = coco_ground_truth(all_targets, self.metadata.get("categories"))
            stats = evaluate_coco(ground_truth, all_detections, image_ids=[im["id"] for im in ground_truth["images"]])
            result = {f"val_{name}": stats[name] for name in VAL_STATS}
            result["val_images"] = float(len(ground_truth["images"]))
        if panoptic is not None:
            result.update(panoptic)
        return result

    def _panoptic_validation(self, batches) -> tuple[dict, dict[str, float]]:
        """Detections, and PQ over all workers' validation images (torchmetrics' counts summed across workers)."""
        from detr import PanopticPostProcess, mask_postprocess_options
        from detr.panoptic_evaluation import PanopticEvaluator, panoptic_target

        categories = self.metadata.get("categories") or []
        is_thing = {int(c["id"]): bool(c.get("isthing", 1)) for c in categories}
        threshold = float(self.metadata.get("panoptic_threshold", PANOPTIC_THRESHOLD))
        seen: list[dict] = []

        def keeping(batches):
            for batch in batches:
                seen.extend(batch[2])
                yield batch

        detections, segmentations = predict_panoptic(self.eval_model, keeping(batches),
                                                     PanopticPostProcess(is_thing, threshold,
                                                                         **mask_postprocess_options(self.model_config)),
                                                     autocast_dtype=self.autocast)
        evaluator = PanopticEvaluator(categories or [{"id": i, "isthing": 1}
                                                     for i in range(self.model_config.num_classes)])
        for t in seen:
            seg = segmentations[int(t["image_id"])]
            evaluator.update(seg["id_map"], seg["segments_info"], *panoptic_target(t["masks"], t["labels"]))
        counts = evaluator.counts()
        summed = _sum_across_workers(counts.flatten().tolist(), self.device)
        evaluator.set_counts(torch.tensor(summed, dtype=counts.dtype).view_as(counts))
        stats = evaluator.compute()
        return detections, {f"val_{name}": float(stats[name]) for name in PANOPTIC_STAT_NAMES}

    def fit(self) -> None:
        import ray.train
        from ray.train import Checkpoint

        epochs = self.job.schedule.epochs
        has_val = self.job.data.val is not None
        budget = self.job.schedule.time_budget_minutes
        for epoch in range(self.start_epoch, epochs):
            metrics = self.train_epoch(epoch)
            self.scheduler.step()
            self.train_seconds += metrics["train_seconds"]
            out_of_time = budget is not None and self.train_seconds >= budget * 60
            last = epoch + 1 == epochs or out_of_time
            due = (epoch + 1) % self.job.schedule.eval_every == 0 or last
            if has_val and due:
                metrics.update(self.validate())
            else:
                metrics["val_AP"] = NOT_VALIDATED  # ranks below any real AP in Ray's checkpoint order
                if self.model_config.masks:
                    metrics["val_PQ"] = NOT_VALIDATED
            self._log(epoch, metrics)
            if self.reporter is not None:
                self.reporter.epoch_end(epoch, metrics, self.train_seconds, last)
            rng = _gather_to_rank0(rng_state(), self.world_size, self.rank)
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if self.rank == 0:
                    self._write_checkpoint(directory, epoch, metrics, rng)
                    checkpoint = Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)
            if out_of_time:
                break

    def _log(self, epoch: int, metrics: dict[str, float]) -> None:
        """Rank 0 logs the epoch to MLflow, skipping whatever a previous attempt already logged."""
        if self.run is None:
            return
        rows = [(step, row) for step, row in self._step_rows if step > self.logged_until["step"]]
        if epoch > self.logged_until["epoch"]:
            clean = {k: v for k, v in metrics.items()  # not validated this epoch: no val_ entry
                     if (validated(v) if k.startswith("val_") else not math.isnan(v))}
            rows.append((epoch, clean))
        self.run.log_metric_history(rows)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to `TorchTrainer`."""
    Trainer(loop_config).fit()
