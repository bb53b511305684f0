"""Benchmark: the Ray Data training pipeline against a torch DataLoader, and streaming memory.

1. Throughput: augmented images/s (decode + the paper's training transforms +
   collate) through `build_detection_dataset(...).iter_torch_batches` against a
   `torch.utils.data.DataLoader` over the same samples, same transforms, same
   number of worker processes, measured in the same run (second epoch of each,
   after a warm-up epoch). Target: ratio >= 1.0.
2. Memory: peak proportional set size (PSS, so shared object-store pages count
   once) of the whole process tree while streaming 10,000 images against 1,000,
   each in a fresh process with its own Ray. Target: ratio <= 1.2.

    python bench/pipeline_speed.py [--images 600] [--workers 2] [--memory-small 1000 --memory-large 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(folder: str, images: int, min_size: int, max_size: int) -> str:
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    config = SyntheticConfig(images=images, min_image_size=min_size, max_image_size=max_size,
                             max_object_size=min(48, min_size), image_format="jpg", seed=1)
    return write_dataset(folder, config, workers=2)["train"]


def start_ray(workers: int) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="error", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def ray_epoch(data, batch_size: int) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(len(t) for _, _, t in data.iter_batches(batch_size=batch_size, prefetch_batches=2))
    return n, time.perf_counter() - start


def loader_epoch(loader) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(len(t) for _, _, t in loader)
    return n, time.perf_counter() - start


def throughput(args) -> dict:
    import torch

    from pipelines.training.dataset import build_detection_dataset
    from pipelines.sources import open_source
    from pipelines.training.torch_dataset import DetectionTorchDataset, collate_skipping_rejected
    from pipelines.training.transforms import TransformsConfig

    folder = tempfile.mkdtemp(prefix="bench-speed-")
    coco = make_data(folder, args.images, args.min_image_size, args.max_image_size)
    transforms = TransformsConfig().scaled(args.scale)
    torch.set_num_threads(1)

    loader = torch.utils.data.DataLoader(
        DetectionTorchDataset(open_source(coco), train=True, transforms=transforms, seed=0),
        batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping_rejected,
        persistent_workers=True, shuffle=True,
    )
    loader_epoch(loader)  # warm-up: worker start
    n_dl, t_dl = loader_epoch(loader)
    del loader

    start_ray(args.workers)
    data = build_detection_dataset(coco, train=True, transforms=transforms, seed=0)
    ray_epoch(data, args.batch_size)  # warm-up: worker start
    n_ray, t_ray = ray_epoch(data, args.batch_size)
    import ray

    ray.shutdown()
    return {
        "images": args.images, "image_sizes": [args.min_image_size, args.max_image_size],
        "transform_scale": args.scale, "workers": args.workers, "batch_size": args.batch_size,
        "dataloader_images_per_s": n_dl / t_dl, "ray_images_per_s": n_ray / t_ray,
        "ratio_ray_over_dataloader": (n_ray / t_ray) / (n_dl / t_dl),
    }


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_pss(pid: int) -> int:
    """Sum of PSS (bytes) over a process and all its descendants, from /proc (Linux)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            stack += _children(p)
        except OSError:
            pass
    return total


def memory_child(images: int, workers: int, folder: str) -> None:
    """Runs in a fresh process: stream `images` images through the pipeline once, print the count."""
    from pipelines.training.dataset import build_detection_dataset
    from pipelines.training.transforms import TransformsConfig

    start_ray(workers)
    data = build_detection_dataset(os.path.join(folder, "train.json"), train=True,
                                   transforms=TransformsConfig.small(), seed=0)
    n = sum(len(t) for _, _, t in data.iter_batches(batch_size=8))
    print(json.dumps({"streamed": n}))


def peak_memory(images: int, workers: int, folder: str) -> dict:
    """Peak PSS of a fresh process tree streaming `images` images (sampled every 0.25 s)."""
    proc = subprocess.Popen([sys.executable, __file__, "--memory-child", str(images), "--workers", str(workers),
                             "--data", folder], stdout=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    streamed = json.loads(out.strip().splitlines()[-1])["streamed"]
    return {"images": images, "streamed": streamed, "seconds": time.perf_counter() - start, "peak_pss_mb": peak[0] / 2**20}


def memory(args) -> dict:
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    results = {}
    for n in (args.memory_small, args.memory_large):
        folder = tempfile.mkdtemp(prefix=f"bench-mem-{n}-")
        write_dataset(folder, SyntheticConfig(images=n, image_format="jpg", seed=2), workers=2)
        results[n] = peak_memory(n, args.workers, folder)
    small, large = results[args.memory_small], results[args.memory_large]
    return {"small": small, "large": large, "ratio_large_over_small": large["peak_pss_mb"] / small["peak_pss_mb"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--min-image-size", type=int, default=240)
    parser.add_argument("--max-image-size", type=int, default=400)
    parser.add_argument("--scale", type=float, default=0.4, help="transforms = paper recipe scaled by this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-small", type=int, default=1000)
    parser.add_argument("--memory-large", type=int, default=10000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.workers, args.data)
        return 0
    report = {}
    if not args.skip_speed:
        report["throughput"] = throughput(args)
        t = report["throughput"]
        print(f"throughput: ray {t['ray_images_per_s']:.1f} img/s, dataloader {t['dataloader_images_per_s']:.1f} img/s, "
              f"ratio {t['ratio_ray_over_dataloader']:.2f} (target >= 1.0)", flush=True)
    if not args.skip_memory:
        report["memory"] = memory(args)
        m = report["memory"]
        print(f"memory: peak {m['large']['peak_pss_mb']:.0f} MB streaming {m['large']['images']} images vs "
              f"{m['small']['peak_pss_mb']:.0f} MB for {m['small']['images']}: ratio "
              f"{m['ratio_large_over_small']:.2f} (target <= 1.2)", flush=True)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "pipeline_speed.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
