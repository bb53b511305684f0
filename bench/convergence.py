"""Convergence benchmark: COCO AP of the `paper` and `fast` recipes after the same minutes of training.

    python bench/convergence.py [--minutes 10] [--eval-every 1] [--recipes paper,fast] [--threads 2]

Generates the synthetic shapes dataset once (`jobs.synthetic_data`: 64-128 px images,
1-4 shapes of 16-48 px, 4 classes, a held-out val split), then trains one model per
recipe from random weights: the same ResNet-18 DETR (hidden size 128, 3+3 layers, 20
queries, the sizes a new user tries on a CPU) with the same augmentation at about the
images' own size, each recipe of `jobs.recipes` layered under those settings exactly as
`detr train` layers it (`recipe: fast` in a config file).
Training uses the project's own pieces: the pipelines' transforms and collation, the
model and criterion, `detr.engine.train_step`, `detr.evaluation.evaluate_coco`
(pycocotools). The recipes train in turns of `--eval-every` minutes, each followed by
an evaluation on the val split, so both see the same machine load; the budget counts
training wall-clock time only (data loading included, evaluation excluded), with torch
limited to `--threads` threads; a recipe with `lr_schedule: cosine` fits it to `--minutes`. Prints AP/AP50
per recipe and minute (with steps, images seen, seconds per step, the share of the time spent waiting
for data and the machine's load average) and the final AP50
ratio, and writes the curves as a PNG and the numbers as JSON under `--out`; `--save-models` also writes each
recipe's final model there as a raydetr checkpoint (what bench/export_accuracy.py evaluates).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr import SetCriterion, build_model  # noqa: E402
from detr.engine import predict, train_step  # noqa: E402
from detr.evaluation import evaluate_coco  # noqa: E402
from detr.optim import build_deadline_schedule, build_optimizer, build_warmup_scheduler  # noqa: E402
from jobs.config_files import build_dataclass  # noqa: E402
from jobs.recipes import RECIPES, apply_recipe  # noqa: E402
from jobs.synthetic_data import SyntheticConfig, write_dataset  # noqa: E402
from jobs.train_config import TrainJobConfig  # noqa: E402
from pipelines.sources import open_source  # noqa: E402
from pipelines.training.torch_dataset import (DetectionTorchDataset, collate_skipping_rejected,  # noqa: E402
                                              endless_batches)
from pipelines.training.transforms import TransformsConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = {"preset": "tiny", "hidden_dim": 128, "nheads": 8, "enc_layers": 3, "dec_layers": 3,
         "dim_feedforward": 512, "num_queries": 20}
"""The model both recipes train: ResNet-18 from random weights, the CPU sizes the issue names."""
TRANSFORMS = "native"
"""Both recipes see the images at about their own size (the paper's 800 px scales would upsample
64-128 px images tenfold): the comparison is of the training recipes, not of image sizes."""


def dataset_config(train_images: int, val_images: int, seed: int) -> SyntheticConfig:
    total = train_images + val_images
    return SyntheticConfig(images=total, classes=4, val_fraction=val_images / total, seed=seed)


def ensure_dataset(root: Path, config: SyntheticConfig) -> dict[str, str]:
    """Write the dataset under `root` unless the same configuration is already there."""
    stamp = root / "config.json"
    wanted = json.dumps(config.__dict__, sort_keys=True)
    if not (stamp.exists() and stamp.read_text() == wanted):
        write_dataset(str(root), config, workers=2)
        stamp.write_text(wanted)
    return {"train": str(root / "train.json"), "val": str(root / "val.json")}


@dataclass
class RecipeRun:
    """One recipe's model, optimiser and data stream, trained in slices and evaluated between them."""

    name: str
    train_json: str
    val_json: str
    seed: int = 0
    budget_seconds: float = 600.0
    """The run's time budget, which a cosine schedule is fitted to."""
    train_seconds: float = 0.0
    load_seconds: float = 0.0
    """Of train_seconds, the time spent waiting for the next batch."""
    steps: int = 0
    images: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        job = build_dataclass(TrainJobConfig, apply_recipe(
            {"recipe": self.name, "data": {"train": self.train_json, "transforms": TRANSFORMS}, "model": dict(MODEL)}))
        source = open_source(self.train_json)
        torch.manual_seed(self.seed)
        self.model_config = job.model_config(max(source.category_ids) + 1)
        self.model = build_model(self.model_config).train()
        self.criterion = SetCriterion.from_config(self.model_config)
        self.clip = job.optimizer.clip_max_norm
        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.warmup = build_warmup_scheduler(self.optimizer, job.optimizer)
        self.decay = build_deadline_schedule(self.optimizer, job.optimizer)
        transforms = TransformsConfig.preset(job.data.transforms)
        self.transforms, self.categories = transforms, source.categories
        train_set = DetectionTorchDataset(source, train=True, transforms=transforms, seed=self.seed)
        # One loader process decodes and augments while the model trains, as Ray Data's tasks do in `detr train`.
        self.batches = endless_batches(train_set, job.data.batch_size, self.seed, workers=1)
        val_set = DetectionTorchDataset(open_source(self.val_json), train=False, transforms=transforms)
        self.val_batches = list(DataLoader(val_set, batch_size=16, collate_fn=collate_skipping_rejected))

    def train_for(self, seconds: float) -> None:
        """Train until `seconds` more of training time have passed (the last step may run over)."""
        end = self.train_seconds + seconds
        while self.train_seconds < end:
            start = time.perf_counter()
            batch = next(self.batches)
            self.load_seconds += time.perf_counter() - start
            train_step(self.model, self.criterion, self.optimizer, [batch], self.clip)
            if self.warmup is not None:
                self.warmup.step()
            if self.decay is not None:
                self.decay.step((self.train_seconds + time.perf_counter() - start) / self.budget_seconds)
            self.train_seconds += time.perf_counter() - start
            self.steps += 1
            self.images += len(batch[2])

    def evaluate(self) -> dict:
        stats = evaluate_coco(self.val_json, predict(self.model, self.val_batches))
        self.model.train()
        row = {"minutes": self.train_seconds / 60, "steps": self.steps, "images": self.images, "AP": stats["AP"],
               "AP50": stats["AP50"], "seconds_per_step": self.train_seconds / max(self.steps, 1),
               "data_wait_share": self.load_seconds / max(self.train_seconds, 1e-9), "load_average": os.getloadavg()[0]}
        self.history.append(row)
        return row


def plot(runs: list[RecipeRun], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(runs):
        minutes = [0] + [r["minutes"] for r in run.history]
        ax.plot(minutes, [0] + [r["AP50"] for r in run.history], marker="o", color=f"C{i}",
                label=f"{run.name} AP50 ({run.steps} steps)")
        ax.plot(minutes, [0] + [r["AP"] for r in run.history], marker="s", linestyle="--", color=f"C{i}",
                label=f"{run.name} AP")
    ax.set_xlabel(f"training minutes ({threads} CPU threads)")
    ax.set_ylabel("COCO AP50 and AP (0.50:0.95), held-out split")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("DETR (ResNet-18, random init) on synthetic shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="paper,fast", help=f"comma-separated, from {sorted(RECIPES)}")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe")
    parser.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=RESULTS / "shapes", help="dataset folder (written if absent)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--save-models", action="store_true", help="write each recipe's final model under --out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # AdamW's second moments of tiny clipped gradients decay into subnormal floats, which the CPU
    # computes in microcode at ~100x the cost: steps ran 6x slower after a few dozen without this.
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = ensure_dataset(args.data, dataset_config(args.train_images, args.val_images, args.seed))
    runs = [RecipeRun(name, paths["train"], paths["val"], args.seed, args.minutes * 60)
            for name in args.recipes.split(",")]
    turns = max(1, math.ceil(args.minutes / args.eval_every - 1e-9))
    for turn in range(1, turns + 1):
        target = min(args.minutes, turn * args.eval_every) * 60
        for run in runs:
            run.train_for(target - run.train_seconds)
            row = run.evaluate()
            print(f"{run.name:>8}  {row['minutes']:5.2f} min  {row['steps']:6d} steps  {row['images']:6d} images  "
                  f"AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}  {row['seconds_per_step']:.3f} s/step  "
                  f"data wait {row['data_wait_share']:.1%}  load {row['load_average']:.1f}", flush=True)

    print(f"\n{'recipe':<8} {'minutes':>7} {'steps':>6} {'images':>7} {'AP':>6} {'AP50':>6}")
    for run in runs:
        last = run.history[-1]
        print(f"{run.name:<8} {last['minutes']:7.2f} {last['steps']:6d} {last['images']:7d} {last['AP']:6.3f} "
              f"{last['AP50']:6.3f}")
    if len(runs) >= 2:
        base, best = runs[0].history[-1]["AP50"], runs[-1].history[-1]["AP50"]
        ratio = f"{best / base:.1f}x" if base >= 0.001 else f"none (the baseline's AP50 is {base:.3f})"
        print(f"AP50 ratio {runs[-1].name}/{runs[0].name}: {ratio}")
    stem = f"convergence_{args.minutes:g}min"
    plot(runs, args.out / f"{stem}.png", args.threads)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {run.name: {"steps": run.steps, "history": run.history} for run in runs}, indent=1))
    print(f"plot: {args.out / f'{stem}.png'}")
    if args.save_models:
        from detr import save_checkpoint
        from pipelines.inference.detector import transforms_to_metadata

        for run in runs:
            path = save_checkpoint(run.model, args.out / f"{stem}_{run.name}.pt", {
                "categories": run.categories, "transforms": transforms_to_metadata(run.transforms)})
            print(f"model: {path}")


if __name__ == "__main__":
    main()
