"""Panoptic benchmark: train a detector with the fast recipe and its mask head, and measure PQ and the cost of masks.

    python bench/panoptic.py [--detector-minutes 0] [--mask-minutes 15] [--mask-training joint] [--threads 2]

On the synthetic panoptic set (`make-dataset --panoptic`: shapes as things,
textured background regions as stuff; held-out validation images), with the
project's own pieces and no Ray (one process, `--threads` torch threads):

1. the detector (no masks) trains on the boxes of every segment, things and stuff,
   with the named recipe of `jobs.recipes` (`fast_panoptic` by default) over MODEL's
   size, for `--detector-minutes` (default 0: none on its own);
2. the mask head trains on top of it: by default with the detector training on
   with it (`--mask-training joint`: with no detector minutes, both from random
   weights, the best use of 15 minutes measured); `frozen` is the paper's recipe
   (detector frozen, e.g. `--detector-minutes 11 --mask-minutes 4 --mask-training
   frozen`). Masks are computed only for the matched queries. An exponential moving
   average of the weights (`--ema`, decay 0.99; `detr.ema`) follows the training;
3. the weights (as trained, or their average) and the panoptic threshold with the best
   PQ on `--calibrate` further generated images (their own seed: neither trained on nor
   held out), then PQ, SQ and RQ (overall, things, stuff) with them on the held-out
   images at their original size, with `detr.panoptic_evaluation.PanopticEvaluator`,
   and mask AP of things;
4. the cost of masks: images/s of `detr label --task panoptic`'s model actor
   (`PanopticLabelPredictor`: one forward with masks for the kept queries, the merge,
   RLE of every segment, the panoptic PNG, the result table) against the detection
   actor (`LabelPredictor`: forward, boxes), same model, same prepared batches (the
   job's `prepare_batch`, done once, outside the timing), alternated. The actors
   are what limits the job's rate; the driver writes rows and PNGs meanwhile.

The whole run stays within the two training budgets plus about a minute. Prints a
table and writes the figures as JSON under `--out` (default bench/results/), beside the trained
model (`panoptic_model.pt`, a checkpoint `detr label --model` takes).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr import SetCriterion, build_model  # noqa: E402
from detr.checkpoint import checkpoint_dict  # noqa: E402
from detr.config import PANOPTIC_THRESHOLD, DETRConfig, MaskHead  # noqa: E402
from detr.ema import ema_model  # noqa: E402
from detr.engine import Batch, train_step  # noqa: E402
from detr.weights import load_weights  # noqa: E402
from detr.optim import OptimizerConfig, build_optimizer, build_warmup_scheduler, parameter_groups  # noqa: E402
from jobs.config_files import build_dataclass  # noqa: E402
from jobs.recipes import apply_recipe  # noqa: E402
from jobs.train_config import TrainJobConfig  # noqa: E402
from detr.panoptic_evaluation import PanopticEvaluator, instance_ground_truth, mask_ap  # noqa: E402
from pipelines.validation.decode import decode_image  # noqa: E402
from pipelines.inference.detector import Detector, transforms_to_metadata  # noqa: E402
from pipelines.labelling.key_digests import DIGEST_DTYPE  # noqa: E402
from pipelines.labelling.panoptic_predictor import PanopticLabelPredictor  # noqa: E402
from pipelines.labelling.pipeline import GROUP_WINDOW_BATCHES  # noqa: E402
from pipelines.labelling.predictor import LabelPredictor  # noqa: E402
from pipelines.labelling.prepare import prepare_batch  # noqa: E402
from pipelines.validation.loading import read_record_bytes  # noqa: E402
from pipelines.validation.panoptic import decode_panoptic_png, panoptic_categories  # noqa: E402
from pipelines.sources.records import records_table  # noqa: E402
from pipelines.inference.panoptic import segment_images  # noqa: E402
from pipelines.sources import iter_records, open_source  # noqa: E402
from pipelines.storage import read_bytes  # noqa: E402
from jobs.synthetic_data import SyntheticConfig, write_dataset  # noqa: E402
from pipelines.training.torch_dataset import DetectionTorchDataset, endless_batches  # noqa: E402
from pipelines.training.transforms import TransformsConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


MODEL = {"preset": "tiny_panoptic", "enc_layers": 3, "dec_layers": 3, "dim_feedforward": 512}
"""The model's size: ResNet-18 from random weights, hidden size 128 (the mask head's minimum), 3+3 layers;
its parts and options come from the recipe (`jobs/recipes/fast_panoptic.yaml`)."""


@dataclass(frozen=True)
class Plan:
    """What a recipe gives this benchmark: model, optimiser, batch size, augmentation."""

    name: str
    model: DETRConfig
    optimizer: OptimizerConfig
    batch_size: int
    transforms: TransformsConfig


def plan_from_recipe(name: str, num_classes: int) -> Plan:
    """The named recipe of `jobs.recipes` over MODEL, layered exactly as `detr train` layers it."""
    job = build_dataclass(TrainJobConfig, apply_recipe({"recipe": name, "data": {"train": "-"}, "model": dict(MODEL)}))
    model = job.model_config(num_classes)
    return Plan(name, model, job.optimizer, job.data.batch_size, TransformsConfig.preset(job.data.transforms))


def dataset_config(train_images: int, val_images: int, seed: int) -> SyntheticConfig:
    total = train_images + val_images
    return SyntheticConfig(images=total, classes=3, max_objects=3, val_fraction=val_images / total, seed=seed,
                           panoptic=True, stuff_classes=3)


def ensure_dataset(root: Path, config: SyntheticConfig) -> dict[str, str]:
    stamp = root / "config.json"
    wanted = json.dumps(config.__dict__, sort_keys=True)
    names = {"train": str(root / "panoptic_train.json"), "val": str(root / "panoptic_val.json")}
    if stamp.exists() and stamp.read_text() == wanted:
        return names
    write_dataset(str(root), config, workers=2)
    stamp.write_text(wanted)
    return names


def mask_phase_groups(model, optimizer: OptimizerConfig, mask_lr: float, joint: bool) -> list[dict]:
    """The mask head at `mask_lr`; with `joint`, the detector too, at the recipe's rates."""
    mask_params = [p for n, p in model.named_parameters() if n.startswith(model.MASK_MODULES)]
    groups = [{"params": mask_params, "lr": mask_lr, "name": "mask_head"}]
    if joint:
        in_mask_head = {id(p) for p in mask_params}
        for group in parameter_groups(model, optimizer.lr, optimizer.lr_backbone):
            groups.append(dict(group, params=[p for p in group["params"] if id(p) not in in_mask_head]))
    return groups


def train_for(model, criterion, optimizer, data: Iterator[Batch], minutes: float, clip: float, label: str,
              scheduler=None, drop_at: float = 1.0, drop_factor: float = 0.1, averages=()) -> dict[str, float]:
    """Train for `minutes` of wall time; every rate times `drop_factor` once `drop_at` of them has passed
    (the paper's step decay, by time: its 200 of 300 epochs is 0.67); each of `averages` (EMA copies)
    follows the weights after every step."""
    model.train()
    deadline = time.perf_counter() + minutes * 60
    steps, last, start, dropped = 0, {}, time.perf_counter(), False
    while time.perf_counter() < deadline:
        if not dropped and time.perf_counter() - start >= drop_at * minutes * 60:
            for group in optimizer.param_groups:
                group["lr"] *= drop_factor
            dropped = True
            print(f"  {label}: rates x{drop_factor:g} at step {steps}", flush=True)
        last = train_step(model, criterion, optimizer, [next(data)], clip)
        if scheduler is not None:
            scheduler.step()
        for average in averages:
            average.update_parameters(model)
        steps += 1
        if steps % 50 == 0:
            shown = {k: round(v, 3) for k, v in last.items() if k in ("loss", "loss_ce", "loss_bbox", "loss_mask",
                                                                         "loss_dice")}
            print(f"  {label} step {steps} ({time.perf_counter() - start:.0f}s): {shown}", flush=True)
    return {"steps": steps, "seconds": time.perf_counter() - start, **{f"final_{k}": v for k, v in last.items()}}


def evaluate(detector: Detector, val_json: str, threshold: float) -> dict[str, Any]:
    source = open_source(val_json)
    categories = source.categories or []
    is_thing = panoptic_categories(categories)
    evaluator = PanopticEvaluator(categories)
    images, annotations, results = [], [], []
    detector.model.eval()
    for record in iter_records(source):
        image = decode_image(read_record_bytes(record), record["key"]).array
        out = segment_images(detector, [image], threshold)[0]
        gt_ids = decode_panoptic_png(read_bytes(record["panoptic_path"]))
        gt_segments = [{"id": int(a), "category_id": int(c)} for a, c in
                       zip(record["annotation_ids"], record["category_ids"])]
        evaluator.update(out["id_map"], out["segments"], gt_ids, gt_segments)
        image_id = int(record["image_id"])
        images.append({"id": image_id, "height": int(gt_ids.shape[0]), "width": int(gt_ids.shape[1])})
        annotations += instance_ground_truth(image_id, gt_ids, gt_segments, is_thing, len(annotations) + 1)
        results += [{"image_id": image_id, "category_id": s["category_id"], "score": s["score"],
                     "segmentation": s["rle"]} for s in out["segments"] if s["isthing"]]
    stats = evaluator.compute()
    things = [c for c in categories if is_thing[int(c["id"])]]
    segm = mask_ap({"images": images, "annotations": annotations, "categories": things}, results)
    return {**{k: v for k, v in stats.items() if k != "per_class"}, "segm_AP": segm["segm_AP"],
            "segm_AP50": segm["segm_AP50"],
            "per_class_PQ": {int(k): round(v["PQ"], 4) for k, v in stats["per_class"].items()}}


def checkpoint_bytes(model: torch.nn.Module, categories: list[dict], transforms: TransformsConfig) -> bytes:
    """The model as the checkpoint bytes the labelling job ships to its actors."""
    buffer = io.BytesIO()
    torch.save(checkpoint_dict(model, {"categories": categories, "transforms": transforms_to_metadata(transforms)}),
               buffer)
    return buffer.getvalue()


def prepared_batches(records: list[dict], transforms: TransformsConfig, batch: int) -> list[pa.Table]:
    """The actors' input batches, as the job makes them: `prepare_batch` over windows of
    GROUP_WINDOW_BATCHES batches (decoded, resized, ordered by shape), then cut into batches."""
    window = GROUP_WINDOW_BATCHES * batch
    none_done = np.zeros(0, dtype=DIGEST_DTYPE)
    batches = []
    for start in range(0, len(records), window):
        prepared = prepare_batch(records_table(records[start:start + window]), done=none_done, transforms=transforms)
        batches += [prepared.slice(i, batch) for i in range(0, prepared.num_rows, batch)]
    return batches


def labelling_speed(checkpoint: bytes, batches: list[pa.Table], threshold: float, rounds: int,
                    threads: int) -> dict[str, float]:
    """Images/s of the label job's detection actor and its panoptic actor on the same prepared batches,
    alternated so both see the same machine load."""
    common = {"score_threshold": 0.5, "top_k": None, "classes": None, "threads": threads}
    actors = {"detection": LabelPredictor(checkpoint, **common),
              "panoptic": PanopticLabelPredictor(checkpoint, panoptic_threshold=threshold, **common)}
    images = sum(b.num_rows for b in batches)

    def label_all(name: str) -> None:
        for b in batches:
            actors[name](b)

    for name in actors:
        label_all(name)  # warm-up
    times = {name: [] for name in actors}
    for _ in range(rounds):
        for name in actors:
            start = time.perf_counter()
            label_all(name)
            times[name].append(time.perf_counter() - start)
    det = images / float(np.median(times["detection"]))
    pan = images / float(np.median(times["panoptic"]))
    return {"detection_images_per_s": det, "panoptic_images_per_s": pan, "ratio": pan / det}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fast_panoptic", help="a jobs.recipes name")
    parser.add_argument("--detector-minutes", type=float, default=0.0, help="detector alone, before the masks")
    parser.add_argument("--mask-minutes", type=float, default=15.0, help="with the mask head")
    parser.add_argument("--mask-lr", type=float, default=5e-4, help="mask head learning rate")
    parser.add_argument("--mask-training", choices=("frozen", "joint"), default="joint",
                        help="frozen: the mask head trains on the frozen detector (the paper); joint: the detector "
                             "trains on with it (with --detector-minutes 0, both from the start)")
    parser.add_argument("--lr-drop-at", type=float, default=1.0,
                        help="fraction of the mask phase after which every rate drops by the recipe's "
                             "lr_drop_factor (1: never)")
    parser.add_argument("--ema", default="0.99",
                        help="comma-separated decays of exponential moving averages of the weights to keep while "
                             "training; the calibration chooses among them and the weights as trained")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--threshold", type=float, default=PANOPTIC_THRESHOLD,
                        help="panoptic keep threshold (the paper's 0.85) when not calibrated")
    parser.add_argument("--calibrate", type=int, default=150,
                        help="choose the threshold with the best PQ on this many further generated images (a "
                             "seed of their own, neither trained on nor held out); 0: use --threshold")
    parser.add_argument("--candidates", default="0.15,0.2,0.25,0.3,0.35,0.4,0.5",
                        help="thresholds --calibrate chooses from (focal scores run lower than softmax)")
    parser.add_argument("--also-thresholds", default="",
                        help="comma-separated further thresholds to report PQ at (focal scores run lower than softmax)")
    parser.add_argument("--speed-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="dataset folder (default: under --out)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data or out / "panoptic_shapes")
    paths = ensure_dataset(data_root, dataset_config(args.train_images, args.val_images, args.seed))
    source = open_source(paths["train"])
    categories = source.categories or []
    num_classes = max(int(c["id"]) for c in categories) + 1
    plan = plan_from_recipe(args.recipe, num_classes)
    print(f"recipe {plan.name}: {plan.model}", flush=True)
    started = time.perf_counter()

    # 1. The detector, on the boxes of things and stuff.
    detector_model = build_model(plan.model.replace(mask_head=None))
    criterion = SetCriterion.from_config(detector_model.config)
    optimizer = build_optimizer(detector_model, plan.optimizer)
    data = endless_batches(DetectionTorchDataset(source, train=True, transforms=plan.transforms, seed=args.seed),
                   plan.batch_size, args.seed)
    detector_stats = train_for(detector_model, criterion, optimizer, data, args.detector_minutes,
                               plan.optimizer.clip_max_norm, "detector", build_warmup_scheduler(optimizer, plan.optimizer))

    # 2. The mask head on top of it: detector frozen (the paper), or training on with it (--mask-training joint).
    joint = args.mask_training == "joint"
    config = plan.model.replace(mask_head=dataclasses.replace(plan.model.mask_head or MaskHead(),
                                                              freeze_detector=not joint))
    model = load_weights(build_model(config), detector_model.state_dict(), "the detector's weights")
    criterion = SetCriterion.from_config(config)
    optimizer = torch.optim.AdamW(mask_phase_groups(model, plan.optimizer, args.mask_lr, joint),
                                  lr=args.mask_lr, weight_decay=plan.optimizer.weight_decay)
    warmup = build_warmup_scheduler(optimizer, plan.optimizer) if joint and not args.detector_minutes else None
    decays = [float(d) for d in args.ema.split(",") if d]
    averages = [ema_model(model, d) for d in decays]
    mask_stats = train_for(model, criterion, optimizer, data, args.mask_minutes, plan.optimizer.clip_max_norm, "masks",
                           warmup, drop_at=args.lr_drop_at, drop_factor=plan.optimizer.lr_drop_factor,
                           averages=averages)
    train_seconds = time.perf_counter() - started

    # 3. PQ on held-out images, 4. the cost of masks.
    weights = {"trained": model.eval(), **{f"ema {d:g}": a.module.eval() for d, a in zip(decays, averages)}}
    detectors = {name: Detector(m, plan.transforms, categories, device=torch.device("cpu")) for name, m in weights.items()}
    chosen, threshold, calibration = list(weights)[-1], args.threshold, {}
    thresholds = {name: args.threshold for name in weights}
    if args.calibrate:
        # Focal scores of a briefly trained model sit near any fixed threshold, and where shifts from run to
        # run: choose it (and the weights: as trained or averaged) on images of their own, so the held-out PQ
        # stays an honest figure.
        calibration_json = ensure_dataset(data_root.with_name(data_root.name + "_calibration"),
                                          dataset_config(args.calibrate, 0, args.seed + 1))["train"]
        for name, detector in detectors.items():
            calibration[name] = {float(t): evaluate(detector, calibration_json, float(t))["PQ"]
                                 for t in args.candidates.split(",")}
            thresholds[name] = max(calibration[name], key=calibration[name].get)
            print(f"calibration PQ by threshold, {name} weights: "
                  + ", ".join(f"{t:g}: {q:.3f}" for t, q in calibration[name].items()), flush=True)
        chosen = max(calibration, key=lambda name: calibration[name][thresholds[name]])
        threshold = thresholds[chosen]
        print(f"chosen: {chosen} weights at threshold {threshold:g}", flush=True)
    by_weights = {name: evaluate(detector, paths["val"], thresholds[name]) for name, detector in detectors.items()}
    quality, model, detector = by_weights[chosen], weights[chosen], detectors[chosen]
    also = {float(t): evaluate(detector, paths["val"], float(t)) for t in args.also_thresholds.split(",") if t}
    records = list(iter_records(open_source(paths["val"])))[: args.speed_images]
    batches = prepared_batches(records, plan.transforms, batch=4)
    checkpoint = checkpoint_bytes(model, categories, plan.transforms)
    (out / "panoptic_model.pt").write_bytes(checkpoint)  # for `detr label --task panoptic` or a closer look
    speed = labelling_speed(checkpoint, batches, threshold, rounds=3, threads=args.threads)
    total = time.perf_counter() - started

    report = {"recipe": plan.name, "model": plan.model.to_dict(), "weights": chosen, "threshold": threshold,
              "train_images": args.train_images, "val_images": args.val_images, "threads": args.threads,
              "detector": detector_stats, "mask_head": mask_stats, "train_seconds": train_seconds,
              "total_seconds": total, "quality": quality, "speed": speed,
              "quality_at_other_thresholds": also, "calibration_pq": calibration,
              "quality_by_weights": {name: {"threshold": thresholds[name], **q} for name, q in by_weights.items()}}
    (out / "panoptic.json").write_text(json.dumps(report, indent=2, default=float))
    q = quality
    print(f"\ntrained {detector_stats['steps']} detector + {mask_stats['steps']} mask-head steps in "
          f"{train_seconds / 60:.1f} min; whole run {total / 60:.1f} min on {args.threads} threads")
    print(f"{'':8} {'PQ':>7} {'SQ':>7} {'RQ':>7}")
    for label, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        print(f"{label:8} {q['PQ' + suffix]:7.3f} {q['SQ' + suffix]:7.3f} {q['RQ' + suffix]:7.3f}")
    print(f"weights: {chosen}, threshold {threshold:g}")
    for name, other in by_weights.items():
        print(f"  {name} weights at {thresholds[name]:g}: PQ {other['PQ']:.3f} (things {other['PQ_th']:.3f}, "
              f"stuff {other['PQ_st']:.3f})")
    for t, other in also.items():
        print(f"threshold {t:g}: PQ {other['PQ']:.3f} (things {other['PQ_th']:.3f}, stuff {other['PQ_st']:.3f})")
    print(f"mask AP (things) {q['segm_AP']:.3f}, AP50 {q['segm_AP50']:.3f}; per-class PQ {q['per_class_PQ']}")
    print(f"labelling: detection-only {speed['detection_images_per_s']:.1f} images/s, panoptic "
          f"{speed['panoptic_images_per_s']:.1f} images/s, ratio {speed['ratio']:.2f}")
    print(f"written to {out / 'panoptic.json'}")


if __name__ == "__main__":
    main()
