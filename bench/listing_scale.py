"""Benchmark: `detr label` over N small images under one S3 prefix, how listing scales.

For each N (default 10,000 and 100,000) a fresh moto S3 server (moto's standalone
WSGI server on 127.0.0.1 and a free port, in its own process) holds N copies of one
8x8 PNG as `s3://bench/prefix-N/img_NNNNNNN.png`; its objects are put through
moto's S3 backend in the server's process before it starts serving (far faster
than a PUT request per object; the job only ever reaches the server over HTTP).
The job finds the server through the standard AWS settings only (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION/AWS_REGION), which
pyarrow's S3FileSystem reads.

Per N:

1. Listing: one full listing of the prefix through `pipelines.storage.list_files`
   in this process (what listing costs on this server, for reference; moto scans
   the whole bucket for every page of 1,000 keys, so its listings grow faster than
   linearly where S3's do not).
2. The label job (`jobs.label.label`, a tiny random DETR) in a fresh process that
   starts its own local Ray (`ray.init(num_cpus=2)`), writing to another bucket
   (`s3://bench-out/out-N/`): the seconds from starting that process to the first
   committed labelled part (this process polls OUT/labels/), and the driver
   process's peak resident memory (its kernel high-water mark, VmHWM). The job is
   stopped `--extra-seconds` after its first committed part, so it labels only a
   part of the images; by then the job has consumed the whole listing (one flat
   prefix is listed in one call, before any of its images is planned), so the
   peak covers the listing and the planning of all N images. Commits are forced
   every `--commit-seconds` so the first part says when the first rows arrived
   rather than when a part was full.

The ratios printed compare the largest N to the smallest (driver peak memory: target
< 1.5; first committed row for the largest N: target < 60 s).

    python bench/listing_scale.py [--sizes 10000,100000] [--extra-seconds 20]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUCKET, OUT_BUCKET = "bench", "bench-out"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}


def tiny_png() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.arange(8 * 8 * 3, dtype=np.uint8) * 5).reshape(8, 8, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def object_key(n: int, index: int) -> str:
    return f"prefix-{n}/img_{index:07d}.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_child(port: int, count: int) -> None:
    """Runs in the server's process: put `count` objects through moto's backend, then serve over HTTP."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    backend.create_bucket(OUT_BUCKET, "us-east-1")
    data = tiny_png()
    for i in range(count):
        backend.put_object(BUCKET, object_key(count, i), data)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, in every thread
    server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
    server.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


class MotoServer:
    """A moto S3 server holding `count` images, in a child process, on a free port of 127.0.0.1."""

    def __init__(self, count: int) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "moto-server", str(self.port), str(count)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the moto server did not start: {line!r}")
        self.seconds = time.perf_counter() - start

    def env(self) -> dict:
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_model(path: str) -> None:
    import torch

    import detr
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.training.transforms import TransformsConfig

    torch.manual_seed(0)
    model = detr.build_model(detr.DETRConfig.preset("tiny"), num_classes=5).eval()
    detr.save_checkpoint(model, path, {"categories": None,
                                       "transforms": transforms_to_metadata(TransformsConfig.small())})


def label_child(model: str, input_uri: str, output: str, commit_seconds: float) -> None:
    """Runs in the job's process: a local Ray of 2 CPUs, then `jobs.label.label` (until stopped)."""
    import ray

    from jobs.label import label
    from pipelines.labelling.options import LabelOptions

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = LabelOptions(concurrency=2, cpus_per_actor=0.5, batch_size=8, commit_seconds=commit_seconds)
    label(model, input_uri, output, options)


def peak_rss_mb(pid: int) -> float:
    """The process's resident-memory high-water mark (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def committed_rows(output: str) -> tuple[int, int]:
    """(committed label parts, rows in them) of a label output."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines import storage

    fs, path = storage.resolve(f"{output}/labels")
    parts = [i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
    return len(parts), sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in parts)


def run_label(model: str, n: int, server: MotoServer, args) -> dict:
    """The label job over prefix-N in a fresh process: seconds to its first committed part, driver peak memory."""
    output = f"s3://{OUT_BUCKET}/out-{n}"
    ray_tmp = tempfile.mkdtemp(prefix="bench-listing-ray-")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp, **server.env())
    log_file = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the job runs
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "label-child", model,
                             f"s3://{BUCKET}/prefix-{n}/", output, str(args.commit_seconds)],
                            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    first, finished, seconds, peak = None, False, 0.0, float("nan")
    try:
        first, finished, seconds, peak = _watch(proc, output, start, args)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the job's Ray shuts down with it
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log_file.seek(0)
    log = log_file.read()
    log_file.close()
    if first is None:
        raise RuntimeError(f"no committed part after {seconds:.0f} s (exit {proc.returncode}):\n{log[-3000:]}")
    parts, rows = committed_rows(output)
    return {"first_row_seconds": first, "driver_peak_mb": peak, "stopped_after_seconds": seconds,
            "committed_parts": parts, "committed_rows": rows, "finished": finished}


def _watch(proc: subprocess.Popen, output: str, start: float, args) -> tuple[float | None, bool, float, float]:
    """Poll OUT/labels/ until the first committed part, `--extra-seconds` more, the job's end or the timeout;
    (first part's seconds, whether the job ended, seconds watched, the driver's peak memory so far in MB)."""
    first, finished = None, False
    while True:
        now = time.perf_counter() - start
        if proc.poll() is not None:
            finished = True
            break
        if first is None and committed_rows(output)[0]:
            first = now
        if first is not None and now >= first + args.extra_seconds:
            break
        if first is None and now > args.timeout:
            break
        time.sleep(0.2)
    peak = peak_rss_mb(proc.pid) if not finished else float("nan")
    return first, finished, time.perf_counter() - start, peak


def list_seconds(n: int, server: MotoServer) -> tuple[float, int]:
    from pipelines import storage

    os.environ.update(server.env())
    start = time.perf_counter()
    files = storage.list_files(f"s3://{BUCKET}/prefix-{n}/", extensions=storage.IMAGE_EXTENSIONS)
    return time.perf_counter() - start, len(files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="numbers of images, comma separated")
    parser.add_argument("--extra-seconds", type=float, default=20.0,
                        help="let the job run this long after its first committed part, then stop it")
    parser.add_argument("--commit-seconds", type=float, default=1.0, help="the job's --commit-seconds")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a job without a committed part")
    parser.add_argument("--label", default="", help="a name for this run in the JSON figures")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    work = tempfile.mkdtemp(prefix="bench-listing-")
    model = os.path.join(work, "tiny.pt")
    make_model(model)
    results = {}
    for n in sizes:
        server = MotoServer(n)
        try:
            print(f"N={n}: moto server on {server.endpoint} with {n} images ({server.seconds:.1f} s)", flush=True)
            listing, found = list_seconds(n, server)
            assert found == n, (found, n)
            print(f"N={n}: one full listing takes {listing:.1f} s", flush=True)
            job = run_label(model, n, server, args)
        finally:
            server.stop()
        results[n] = {"listing_seconds": listing, **job}
        print(f"N={n}: first committed row {job['first_row_seconds']:.1f} s after the job's process started; "
              f"driver peak {job['driver_peak_mb']:.0f} MB; stopped after {job['stopped_after_seconds']:.1f} s "
              f"with {job['committed_rows']} of {n} images committed", flush=True)
    small, large = results[min(sizes)], results[max(sizes)]
    ratios = {"listing": large["listing_seconds"] / small["listing_seconds"],
              "first_row": large["first_row_seconds"] / small["first_row_seconds"],
              "driver_peak": large["driver_peak_mb"] / small["driver_peak_mb"]}
    print(f"{max(sizes)} vs {min(sizes)} images: listing {ratios['listing']:.2f}x, first committed row "
          f"{ratios['first_row']:.2f}x ({large['first_row_seconds']:.1f} s, target < 60 s), driver peak memory "
          f"{ratios['driver_peak']:.2f}x (target < 1.5)", flush=True)
    print("(each job was stopped after its first committed part plus "
          f"{args.extra_seconds:g} s; it did not label every image)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    name = f"listing_scale{'-' + args.label if args.label else ''}.json"
    with open(os.path.join(ROOT, "bench", "results", name), "w") as f:
        json.dump({"sizes": sizes, "results": {str(k): v for k, v in results.items()}, "ratios": ratios,
                   "extra_seconds": args.extra_seconds, "commit_seconds": args.commit_seconds}, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "moto-server":
        moto_server_child(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "label-child":
        label_child(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    else:
        sys.exit(main())
