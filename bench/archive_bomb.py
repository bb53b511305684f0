"""Benchmark: memory while an archive's oversized member is rejected, against reading a normal archive.

Two `.tar.gz` files are written to a temporary folder: a normal one (one small PNG) and a bomb (one
member of `--member-gb` gigabytes of zeros, about a thousandth of that compressed). Each is read by
`pipelines.sources.iter_records(open_source(path))` in a fresh Python process, which reports its own
peak resident memory (the kernel's high-water mark, VmHWM) and the seconds spent reading. The bomb's
member is over the 256 MB member limit, so it must come back as one `too_large` record. The ratio
printed is the bomb's peak over the normal archive's (target: about 1, i.e. the member is never held).

    python bench/archive_bomb.py --member-gb 1.2
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READER = """
import re, sys, time
from pipelines.sources import iter_records, open_source
start = time.perf_counter()
rows = [r["error_reason"] or "ok" for r in iter_records(open_source(sys.argv[1]))]
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(",".join(rows), peak, round(seconds, 2))
"""


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_tar(path: str, name: str, data: io.RawIOBase, size: int) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(data))


def read(path: str) -> tuple[str, int, float]:
    done = subprocess.run([sys.executable, "-c", READER, path], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    rows, peak_kb, seconds = done.stdout.split()
    return rows, int(peak_kb), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member-gb", type=float, default=1.2)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        normal, bomb = os.path.join(tmp, "normal.tar.gz"), os.path.join(tmp, "bomb.tar.gz")
        png = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(png, "PNG")
        write_tar(normal, "image.png", io.BytesIO(png.getvalue()), len(png.getvalue()))
        size = int(args.member_gb * 1024 ** 3)
        write_tar(bomb, "bomb.png", Zeros(size), size)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; bomb: a {size / 1024 ** 3:.1f} GB "
              f"member in {os.path.getsize(bomb) / 1024 ** 2:.1f} MB")
        results = {name: read(path) for name, path in (("normal", normal), ("bomb", bomb))}
    for name, (rows, peak_kb, seconds) in results.items():
        print(f"{name:7s} records: {rows:10s} peak memory {peak_kb / 1024:7.1f} MB  read in {seconds:5.2f} s")
    assert results["bomb"][0] == "too_large", results["bomb"]
    print(f"ratio bomb/normal peak memory: {results['bomb'][1] / results['normal'][1]:.2f}")


if __name__ == "__main__":
    main()
