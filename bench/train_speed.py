"""Training throughput on Ray Train: images/s per worker with 1 and 2 workers, and where the time goes.

    python bench/train_speed.py [--steps 30] [--preset tiny] [--images 256]

Each configuration runs a real `TorchTrainer` over the real data pipeline (a
synthetic dataset written to disk, decoded and augmented by Ray Data). The
worker loop is the job's step (`detr.engine.train_step` semantics) with the
gradient all-reduce made explicit so that its time can be measured apart:
data (waiting for the next batch), forward/backward, communication (all-reduce
of every gradient over gloo) and optimiser (clipping and AdamW). Each worker uses
one CPU thread; the ratio of 2-worker to 1-worker throughput is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from detr import SetCriterion, build_model
    from detr.engine import move_batch
    from detr.optim import OptimizerConfig, build_optimizer, clip_gradients
    from pipelines.training.collate import DetectionCollate

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = build_model(config["preset"], num_classes=config["num_classes"]).train()
    criterion = SetCriterion.from_config(model.config)
    optimizer = build_optimizer(model, OptimizerConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    shard = ray.train.get_dataset_shard("train")
    times = {"data": 0.0, "forward_backward": 0.0, "communication": 0.0, "optimizer": 0.0}
    images = steps = 0
    batches = iter(shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=DetectionCollate()))
    warmup = 3
    while steps < config["steps"] + warmup:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            batches = iter(shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=DetectionCollate()))
            continue
        t1 = time.perf_counter()
        images_, mask, targets = move_batch(batch, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        losses = criterion(model(images_, mask), targets)
        criterion.total(losses).backward()
        t2 = time.perf_counter()
        if world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        t3 = time.perf_counter()
        clip_gradients(model, 0.1)
        optimizer.step()
        t4 = time.perf_counter()
        steps += 1
        if steps > warmup:
            images += len(targets)
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key] += value
    total = sum(times.values())
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"images": images, "seconds": total, **times}, f)


def run_config(workers: int, dataset, args, out_dir: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(out_dir, f"w{workers}")
    os.makedirs(out, exist_ok=True)
    TorchTrainer(
        worker,
        train_loop_config={"preset": args.preset, "num_classes": args.classes + 1, "batch_size": args.batch_size,
                           "steps": args.steps, "out": out},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{workers}", storage_path=os.path.join(out_dir, "ray")),
        datasets={"train": dataset},
    ).fit()
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(workers)]
    seconds = max(r["seconds"] for r in ranks)
    per_worker = sum(r["images"] / r["seconds"] for r in ranks) / workers
    split = {k: sum(r[k] for r in ranks) / sum(r["seconds"] for r in ranks)
             for k in ("data", "forward_backward", "communication", "optimizer")}
    return {"workers": workers, "per_worker": per_worker, "total": sum(r["images"] for r in ranks) / seconds,
            **split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per worker (after 3 warm-up)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import ray

    from pipelines.training.dataset import build_detection_dataset
    from jobs.synthetic_data import SyntheticConfig, write_dataset
    from pipelines.training.transforms import TransformsConfig

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="error", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_dataset(os.path.join(tmp, "data"),
                              SyntheticConfig(images=args.images, classes=args.classes, min_image_size=96,
                                              max_image_size=160, max_object_size=64, seed=1))
        dataset = build_detection_dataset(paths["train"], train=True, transforms=TransformsConfig.small(),
                                          seed=0, collect_errors=False).dataset
        results = [run_config(w, dataset, args, tmp) for w in (1, 2)]
    print(f"# {args.preset}, batch {args.batch_size} per worker, 1 CPU thread per worker, {os.cpu_count()} cores")
    print(f"{'workers':>7} {'img/s/worker':>13} {'img/s total':>12} {'data':>6} {'fwd/bwd':>8} {'comm':>6} {'optim':>6}")
    for r in results:
        print(f"{r['workers']:>7} {r['per_worker']:>13.2f} {r['total']:>12.2f} {r['data']:>6.1%} "
              f"{r['forward_backward']:>8.1%} {r['communication']:>6.1%} {r['optimizer']:>6.1%}")
    print(f"# scaling: 2 workers give {results[1]['total'] / results[0]['total']:.2f}x the images/s of 1 worker")
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
