"""Benchmark: `detr label` against a plain single-process loop, the forward-only limit, and memory.

All on the same generated photos (JPEGs from 640x480 to 1280x960, a quarter of
them portrait) and the same model file (a randomly initialised DETR, ResNet-50 by
default, evaluated at a reduced size so the run fits a small CPU machine; weights
do not change speed):

1. Plain loop: one process, one image at a time: read, decode (`decode_image`),
   transform, forward, post-process (`Detector.detect` over the model as trained,
   `optimize=False`: what a user's own loop runs); by default with torch using
   every core and with one thread, and the faster is the baseline. For reference,
   the same loop over the job's inference copy of the model (`detr.inference_model`:
   norms folded, channels-last) is measured too, to show what the copy alone gives.
2. `detr label` (`python -m jobs.label` in a subprocess with its own local Ray):
   images/s as the job reports it (from building the dataset to the last commit,
   actor start and model loads included; Ray's own start-up excluded), the
   subprocess's wall time, and the rate once rows flow (after the first rows reach
   the driver: start-up excluded). Target: >= 1.3x the plain loop.
3. Forward-only: the job's inference copy of the model alone on pre-resized batches
   grouped by shape, in `--concurrency` processes of one thread (the job's layout)
   and in one process with the plain loop's thread counts above one; the fastest is
   the limit. Target: label time within 1.25x.
4. Memory: peak PSS of the whole process tree (driver, Ray's daemons, workers;
   shared pages counted once) labelling `--memory-large` images against
   `--memory-small`, each in a fresh process. Target: ratio <= 1.2.

5. Runtimes (`--runtimes torch,onnxruntime,openvino,openvino-int8`): the same `detr label` job with the
   model in each runtime: the checkpoint exported once by the job for `onnxruntime` / `openvino`, and for
   `RUNTIME-int8` an int8 export folder (`detr export --precision int8`, calibrated on 32 of the photos) as
   the model. Each is set against the torch runtime's job measured in the same run. Target: the fastest
   >= 1.5x the torch runtime.

The plain loop's timing starts after its model is loaded and one image has run; the
job's comparable figure is its rate once rows flow (after the first rows reach the
driver), and its whole-job rate (start-up included) is printed beside it, for 200
images and, with the memory runs, for `--memory-large` images, where start-up weighs
little. `--precision bfloat16` runs the job and the forward-only limit in bfloat16
(the plain loop stays float32).

Figures go to bench/results/label_speed.json. With `--repeats N` every speed is
measured N times, interleaved, and the best kept (for a machine shared with
other work).

    python bench/label_speed.py [--images 200] [--preset detr_r50 --eval-size 320] [--repeats 2] [--skip-memory]
    python bench/label_speed.py --skip-speed --skip-memory --runtimes torch,openvino,openvino-int8
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.pipeline_speed import tree_pss  # noqa: E402  (after the path is set)


def _write_photo(job: tuple[str, int, int]) -> str:
    """One photo-like JPEG: a gradient, shapes and sensor noise, 640x480..1280x960 (landscape or portrait)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder, index, seed = job
    rng = np.random.default_rng([seed, index])
    scale = rng.uniform(1.0, 2.0)
    width, height = int(640 * scale), int(480 * scale)
    if rng.random() < 0.25:
        width, height = height, width
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-0.1, 0.1, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        box = [x0, y0, x0 + rng.integers(30, width // 3), y0 + rng.integers(30, height // 3)]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    path = os.path.join(folder, f"photo_{index:05d}.jpg")
    image.save(path, "JPEG", quality=90)
    return path


def make_photos(folder: str, count: int, workers: int, seed: int = 0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_write_photo, [(folder, i, seed) for i in range(count)], chunksize=16))


def link_first(paths: list[str], count: int, folder: str) -> list[str]:
    """The first `count` photos in their own folder (hard links: no copy)."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for path in paths[:count]:
        target = os.path.join(folder, os.path.basename(path))
        os.link(path, target)
        out.append(target)
    return out


def make_model(path: str, preset: str, eval_size: int) -> dict:
    import torch

    import detr
    from detr.coco_categories import coco_category_list
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.training.transforms import TransformsConfig

    torch.manual_seed(0)
    model = detr.build_model(preset)
    transforms = TransformsConfig().scaled(eval_size / TransformsConfig().eval_size)
    categories = coco_category_list() if model.config.num_classes == 91 else None
    detr.save_checkpoint(model, path, {"categories": categories, "transforms": transforms_to_metadata(transforms)})
    return {"preset": preset, "backbone": model.config.backbone, "eval_size": transforms.eval_size,
            "eval_max_size": transforms.eval_max_size}


def plain_loop(checkpoint: str, paths: list[str], score_threshold: float, threads: int,
               optimize: bool = False) -> dict:
    """Decode, transform, forward, post-process one image at a time, in this process (over the model as
    trained, or with `optimize` over the job's inference copy)."""
    import torch

    from pipelines.inference.detector import Detector
    from pipelines.validation.decode import decode_image

    torch.set_num_threads(threads)
    detector = Detector.from_checkpoint(checkpoint, score_threshold=score_threshold, optimize=optimize)
    detector.detect([decode_image(open(paths[0], "rb").read(), paths[0]).array])  # warm-up
    start = time.perf_counter()
    detections = 0
    for path in paths:
        with open(path, "rb") as f:
            image = decode_image(f.read(), path).array
        detections += len(detector.detect([image])[0]["scores"])
    seconds = time.perf_counter() - start
    return {"images_per_s": len(paths) / seconds, "seconds": seconds, "threads": torch.get_num_threads(),
            "detections": detections}


def _shape_batches(detector, paths: list[str], batch_size: int) -> list:
    """Resized, normalised images grouped by shape into padded batches (what the model sees at best),
    split where padding would waste too much, as the label job's actors split them."""
    from detr import pad_images
    from pipelines.labelling.shapes import padding_groups
    from pipelines.validation.decode import decode_image

    tensors = [detector.preprocess(decode_image(open(p, "rb").read(), p).array) for p in paths]
    tensors.sort(key=lambda t: tuple(t.shape[1:]))
    batches = []
    for start in range(0, len(tensors), batch_size):
        chunk = tensors[start:start + batch_size]
        batches += [pad_images([chunk[i] for i in group]) for group in padding_groups([t.shape[1:] for t in chunk])]
    return batches


def _forward_seconds(detector, batches) -> float:
    detector.forward(*batches[0])  # warm-up
    start = time.perf_counter()
    for images, mask in batches:
        detector.forward(images, mask)
    return time.perf_counter() - start


def _forward_child(checkpoint: str, paths: list[str], batch_size: int, precision: str, barrier, results) -> None:
    import torch

    from pipelines.inference.detector import Detector

    torch.set_num_threads(1)
    detector = Detector.from_checkpoint(checkpoint, precision=precision)
    batches = _shape_batches(detector, paths, batch_size)
    barrier.wait()
    results.put(_forward_seconds(detector, batches))


def forward_only(checkpoint: str, paths: list[str], batch_size: int, processes: int, threads: list[int],
                 precision: str = "float32") -> dict:
    """Model-only images/s of the job's inference copy: `processes` one-thread processes, and one process with
    each thread count > 1 in `threads`; the fastest is the limit."""
    import torch

    from pipelines.inference.detector import Detector

    results = {}
    for count in sorted({t for t in threads if t > 1}):
        torch.set_num_threads(count)
        detector = Detector.from_checkpoint(checkpoint, precision=precision)
        results[f"one_process_{count}_threads"] = len(paths) / _forward_seconds(
            detector, _shape_batches(detector, paths, batch_size))
        del detector
    context = mp.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    children = [context.Process(target=_forward_child, args=(checkpoint, paths[i::processes], batch_size, precision,
                                                              barrier, queue)) for i in range(processes)]
    for child in children:
        child.start()
    seconds = max(queue.get() for _ in children)
    for child in children:
        child.join()
    results[f"{processes}_processes_1_thread"] = len(paths) / seconds
    return {**results, "images_per_s": max(results.values())}


def label_command(model: str, folder: str, out: str, args, runtime: str | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.label", "--model", model, "--input", folder, "--output", out,
            "--concurrency", str(args.concurrency), "--cpus-per-actor", str(args.cpus_per_actor),
            "--batch-size", str(args.batch_size), "--score-threshold", str(args.score_threshold)] + (
        ["--precision", args.precision] if runtime in (None, "torch") else []) + (
        ["--runtime", runtime] if runtime else [])


def int8_export(checkpoint: str, photos: list[str], runtime: str, folder: str) -> str:
    """An int8 export of the model for `runtime`, calibrated on 32 of the photos (`detr export`)."""
    calibration = os.path.join(folder, "calibration")
    if not os.path.isdir(calibration):
        link_first(photos, 32, calibration)
    out = os.path.join(folder, f"{runtime}-int8")
    export_format = "openvino" if runtime == "openvino" else "onnx"
    subprocess.run([sys.executable, "-m", "jobs.export", "--model", checkpoint, "--format", export_format,
                    "--precision", "int8", "--calibration", calibration, "--output", out],
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True, stdout=subprocess.DEVNULL)
    return out


def run_label(checkpoint: str, folder: str, args, sample_memory: bool = False, runtime: str | None = None) -> dict:
    """Run `detr label` in a fresh process (its own local Ray); the job's own figures from its manifest."""
    out = tempfile.mkdtemp(prefix="bench-label-out-")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    proc = subprocess.Popen(label_command(checkpoint, folder, out, args, runtime), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if sample_memory:
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"detr label failed ({proc.returncode}):\n{stdout[-3000:]}")
    from pipelines.labelling.output import LabelOutput

    manifest = LabelOutput(out).read_manifest()
    job = manifest["runs"][-1]
    shutil.rmtree(out, ignore_errors=True)
    return {"images": job["labelled"] + job["errors"], "images_per_s": job["images_per_s"],
            "runtime": manifest["settings"].get("runtime"), "precision": manifest["settings"].get("precision"),
            "job_seconds": job["seconds"], "first_rows_seconds": job.get("first_rows_seconds"),
            "steady_images_per_s": job.get("steady_images_per_s"), "process_wall_seconds": wall,
            "detections": job["detections"],
            "peak_pss_mb": peak[0] / 2**20 if sample_memory else None,
            "summary": stdout.strip()}


def compare_runtimes(checkpoint: str, photos: list[str], work: str, args) -> dict:
    """The label job in each of `args.runtimes` (and torch), interleaved `--repeats` times, best kept; each
    against the torch runtime's rate."""
    names = list(dict.fromkeys(["torch"] + [r.strip() for r in args.runtimes.split(",") if r.strip()]))
    folder = os.path.join(work, f"runtimes{args.images}")
    if not os.path.isdir(folder):
        link_first(photos, args.images, folder)
    models = {name: int8_export(checkpoint, photos, name.removesuffix("-int8"), work) if name.endswith("-int8")
              else checkpoint for name in names}
    runs: dict[str, list] = {name: [] for name in names}
    for attempt in range(args.repeats):
        for name in names:
            runtime = name.removesuffix("-int8") if name != "torch" else None
            runs[name].append(run_label(models[name], folder, args, runtime=runtime))
            print(f"[{attempt + 1}/{args.repeats}] label in {name}: {runs[name][-1]['images_per_s']:.2f} images/s "
                  f"(steady {runs[name][-1]['steady_images_per_s']:.2f})", flush=True)
    best = {name: max(results, key=lambda r: r["steady_images_per_s"]) for name, results in runs.items()}
    torch_rate, torch_whole = best["torch"]["steady_images_per_s"], best["torch"]["images_per_s"]
    print(f"label job, {args.images} images at {args.eval_size} px, once rows flow (whole job in brackets):")
    for name, job in best.items():
        print(f"  {name:<18} {job['steady_images_per_s']:6.2f} images/s ({job['images_per_s']:.2f}): "
              f"{job['steady_images_per_s'] / torch_rate:.2f}x torch ({job['images_per_s'] / torch_whole:.2f}x)",
              flush=True)
    fastest = max(best, key=lambda n: best[n]["steady_images_per_s"])
    print(f"fastest: {fastest}, {best[fastest]['steady_images_per_s'] / torch_rate:.2f}x the torch runtime "
          "(target >= 1.5)", flush=True)
    return {"best": best, "all_runs": runs, "fastest": fastest,
            "over_torch": {n: j["steady_images_per_s"] / torch_rate for n, j in best.items()},
            "whole_job_over_torch": {n: j["images_per_s"] / torch_whole for n, j in best.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--preset", default="detr_r50")
    parser.add_argument("--eval-size", type=int, default=320, help="shorter side at the model's input")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="2: on CPU, larger batches cost more per image (measured: 1.14x at 4 than at 1)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5,
                        help="0.5 on 2 cores: two one-thread actors leave a Ray CPU for reading and decoding")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="the job's and the forward-only limit's precision (the plain loop stays float32)")
    parser.add_argument("--memory-small", type=int, default=200)
    parser.add_argument("--memory-large", type=int, default=2000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--plain-threads", default="all,1",
                        help="torch thread counts for the plain loop ('all' = every core); the fastest is the baseline")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each speed this many times, interleaved, and keep the best (noisy machines)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes generating photos")
    parser.add_argument("--runtimes", default="",
                        help="label jobs in these runtimes, against torch's: torch, onnxruntime, openvino, "
                             "onnxruntime-int8, openvino-int8 (comma-separated; empty: none)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-label-")
    count = max(args.images, 0 if args.skip_memory else max(args.memory_small, args.memory_large))
    print(f"generating {count} photos in {work} ...", flush=True)
    photos = make_photos(os.path.join(work, "all"), count, args.workers)
    checkpoint = os.path.join(work, "model.pt")
    report = {"model": make_model(checkpoint, args.preset, args.eval_size), "cpus": os.cpu_count(),
              "batch_size": args.batch_size, "concurrency": args.concurrency, "cpus_per_actor": args.cpus_per_actor}
    print(f"model: {report['model']}", flush=True)

    if not args.skip_speed:
        speed_folder = os.path.join(work, f"first{args.images}")
        paths = link_first(photos, args.images, speed_folder)
        cores = os.cpu_count() or 1
        plain_threads = [cores if t == "all" else int(t) for t in args.plain_threads.split(",")]
        runs: dict[str, list] = {f"plain_{t}_threads": [] for t in plain_threads}
        runs.update({f"plain_inference_copy_{t}_threads": [] for t in plain_threads})
        runs.update(label=[], forward=[])
        for attempt in range(args.repeats):  # interleaved, so that a noisy neighbour hits all alike
            for t in plain_threads:
                runs[f"plain_{t}_threads"].append(plain_loop(checkpoint, paths, args.score_threshold, t))
                runs[f"plain_inference_copy_{t}_threads"].append(
                    plain_loop(checkpoint, paths, args.score_threshold, t, optimize=True))
            runs["label"].append(run_label(checkpoint, speed_folder, args))
            runs["forward"].append(forward_only(checkpoint, paths, args.batch_size, args.concurrency, plain_threads,
                                                args.precision))
            for name, results in runs.items():
                print(f"[{attempt + 1}/{args.repeats}] {name}: {results[-1]['images_per_s']:.2f} images/s", flush=True)
        best = {name: max(results, key=lambda r: r["images_per_s"]) for name, results in runs.items()}
        plain = max((best[f"plain_{t}_threads"] for t in plain_threads), key=lambda r: r["images_per_s"])
        job, forward = best["label"], best["forward"]
        print(f"plain loop: {plain['images_per_s']:.2f} images/s (the fastest of torch threads " + ", ".join(
            f"{t}: {best[f'plain_{t}_threads']['images_per_s']:.2f}" for t in plain_threads) + "); over the "
            "inference copy: " + ", ".join(f"{t}: {best[f'plain_inference_copy_{t}_threads']['images_per_s']:.2f}"
                                           for t in plain_threads), flush=True)
        print(f"detr label: {job['images_per_s']:.2f} images/s ({job['job_seconds']:.1f} s in the job, "
              f"{job['process_wall_seconds']:.1f} s with Python and Ray start-up); first rows after "
              f"{job['first_rows_seconds']:.1f} s, then {job['steady_images_per_s']:.2f} images/s", flush=True)
        print(f"forward only: {forward['images_per_s']:.2f} images/s (" + ", ".join(
            f"{k}: {v:.2f}" for k, v in forward.items() if k != "images_per_s") + ")", flush=True)
        report["speed"] = {
            "images": args.images, "repeats": args.repeats, "best": best, "all_runs": runs,
            "label_over_plain": job["images_per_s"] / plain["images_per_s"],
            "steady_label_over_plain": job["steady_images_per_s"] / plain["images_per_s"],
            "label_time_over_forward_time": forward["images_per_s"] / job["images_per_s"],
            "steady_label_time_over_forward_time": forward["images_per_s"] / job["steady_images_per_s"],
            "plain_images_per_s": plain["images_per_s"], "forward_images_per_s": forward["images_per_s"],
        }
        s = report["speed"]
        print(f"once rows flow (as the plain loop is timed): label / plain loop {s['steady_label_over_plain']:.2f}x "
              f"(target >= 1.3), label time / forward-only time {s['steady_label_time_over_forward_time']:.2f}x "
              f"(target <= 1.25)", flush=True)
        print(f"whole job of {args.images} images, start-up included: label / plain loop {s['label_over_plain']:.2f}x, "
              f"label time / forward-only time {s['label_time_over_forward_time']:.2f}x", flush=True)

    if not args.skip_memory:
        memory = {}
        for n in (args.memory_small, args.memory_large):
            folder = os.path.join(work, f"memory{n}")
            link_first(photos, n, folder)
            memory[n] = run_label(checkpoint, folder, args, sample_memory=True)
            print(f"memory: {n} images, peak PSS {memory[n]['peak_pss_mb']:.0f} MB "
                  f"({memory[n]['images_per_s']:.2f} images/s)", flush=True)
        small, large = memory[args.memory_small], memory[args.memory_large]
        report["memory"] = {"small": small, "large": large,
                            "ratio_large_over_small": large["peak_pss_mb"] / small["peak_pss_mb"]}
        print(f"memory: peak {large['peak_pss_mb']:.0f} MB for {args.memory_large} images vs "
              f"{small['peak_pss_mb']:.0f} MB for {args.memory_small}: ratio "
              f"{report['memory']['ratio_large_over_small']:.2f} (target <= 1.2)", flush=True)
        if "speed" in report:
            s = report["speed"]
            s["large_label_over_plain"] = large["images_per_s"] / s["plain_images_per_s"]
            s["large_label_time_over_forward_time"] = s["forward_images_per_s"] / large["images_per_s"]
            print(f"whole job of {args.memory_large} images, start-up included ({large['images_per_s']:.2f} "
                  f"images/s): label / plain loop {s['large_label_over_plain']:.2f}x, label time / forward-only "
                  f"time {s['large_label_time_over_forward_time']:.2f}x", flush=True)

    if args.runtimes:
        report["runtimes"] = compare_runtimes(checkpoint, photos, work, args)

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "label_speed.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
