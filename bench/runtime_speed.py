"""CPU inference speed of DETR in each runtime, against the official computation and the CPU's float32 floor.

    python bench/runtime_speed.py [--preset detr_r50] [--sizes 800x1066,512x683] [--batches 1,4]
                                  [--threads 2] [--repeats 3]

Rows, all in one run on the same random weights:
- `official, torch eager`: the official computation (our model with the official padding, norms as layers),
  the baseline every ratio is against;
- `official, onnxruntime plain export`: what a user builds by hand: `torch.onnx.export` of that model and an
  ONNX Runtime session with default options;
- `raydetr, torch`: the Detector's inference copy (norms folded, channels-last);
- `raydetr, onnxruntime` and `raydetr, openvino`: `detr.export`'s graph (`pipelines.inference.runtimes`);
- `... int8`: that graph quantised (`detr export --precision int8`: `pipelines.inference.quantize`), calibrated
  here on a few random images (speed does not depend on the ranges; the AP it costs: bench/export_accuracy.py).
The floor is the model's float32 FLOPs (counted by torch's FlopCounterMode) over a large matmul's measured
rate on these threads: no float32 implementation can beat it by much. Prints a table; figures belong in
bench/RESULTS.md with the date and the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

from detr import DETRConfig, build_model, inference_model, pad_images
from detr.export import export_onnx


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(threads: int, n: int = 2048) -> float:
    """FLOP/s of a large float32 matmul on `threads` threads: the CPU's practical float32 peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_seconds(lambda: a @ b, 5)
    return 2 * n ** 3 / seconds


def model_flops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(images, mask)
    return float(counter.get_total_flops())


def plain_onnx_session(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, path: str, threads: int):
    """The hand-made baseline: the model exported as it is, a session with default options and `threads`."""
    import onnxruntime as ort

    class Outputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, m):
            out = self.inner(x, m)
            return out["pred_logits"], out["pred_boxes"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Outputs(model).eval(), (images, mask), path, dynamo=False, input_names=["images", "mask"],
                          output_names=["pred_logits", "pred_boxes"], opset_version=17,
                          dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}, "mask": {0: "b", 1: "h", 2: "w"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x, m: session.run(None, {"images": x.numpy(), "mask": m.numpy()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="detr_r50")
    parser.add_argument("--sizes", default="800x1066,512x683", help="comma-separated HxW list")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.inference.runtimes import file_runner

    torch.manual_seed(0)
    config = DETRConfig.preset(args.preset)
    official = build_model(config.replace(padding_invariant=False)).eval()
    ours = build_model(config).eval()
    ours.load_state_dict(official.state_dict())
    fast = inference_model(ours)
    rate = matmul_rate(args.threads)
    print(f"# {args.preset}, {args.threads} threads, torch {torch.__version__}; float32 matmul "
          f"{rate / 1e9:.0f} GFLOP/s")
    print(f"{'size':<10} {'batch':>5}  {'path':<36} {'s/image':>8} {'vs official':>11} {'vs plain':>8} "
          f"{'vs floor':>8}")
    with tempfile.TemporaryDirectory() as folder:
        plain_file, our_file = os.path.join(folder, "plain.onnx"), os.path.join(folder, "ours.onnx")
        probe = pad_images([torch.randn(3, 96, 128), torch.randn(3, 128, 96)])
        plain = plain_onnx_session(official, *probe, plain_file, args.threads)
        export_onnx(ours, our_file)
        unpadded_file = os.path.join(folder, "ours_unpadded.onnx")  # what ONNX Runtime runs for unpadded batches
        export_onnx(ours, unpadded_file, padded=False)
        names = [name for name in args.runtimes.split(",") if name]
        runners = {name: file_runner(name, our_file, args.threads, unpadded_file) for name in names}
        # the bench's batches are unpadded: what the graph for them gains, against the padded graph alone
        runners.update({f"{name}, padded graph only": file_runner(name, our_file, args.threads) for name in names})
        if not args.no_int8:
            from pipelines.inference.quantize import quantize_onnx

            int8_file = os.path.join(folder, "int8.onnx")
            h, w = (int(v) for v in args.sizes.split(",")[0].split("x"))
            quantize_onnx(our_file, int8_file, [pad_images([torch.randn(3, h, w)]) for _ in range(4)])
            runners.update({f"{name} int8": file_runner(name, int8_file, args.threads)
                            for name in args.runtimes.split(",") if name})
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            flops = model_flops(official, *pad_images([torch.randn(3, h, w)]))
            floor = flops / rate
            for batch in (int(b) for b in args.batches.split(",")):
                images, mask = pad_images([torch.randn(3, h, w) for _ in range(batch)])
                paths = {"official, torch eager": lambda: official(images, mask),
                         "official, onnxruntime plain export": lambda: plain(images, mask),
                         "raydetr, torch": lambda: fast(images.contiguous(memory_format=torch.channels_last), mask)}
                paths.update({f"raydetr, {name}": (lambda r=r: r(images, mask)) for name, r in runners.items()})
                baseline = plain_seconds = None
                for name, fn in paths.items():
                    with torch.inference_mode():
                        seconds = median_seconds(fn, args.repeats) / batch
                    baseline = baseline or seconds
                    if name == "official, onnxruntime plain export":
                        plain_seconds = seconds
                    versus_plain = f"{plain_seconds / seconds:>7.2f}x" if plain_seconds else f"{'':>8}"
                    print(f"{size:<10} {batch:>5}  {name:<36} {seconds:>8.3f} {baseline / seconds:>10.2f}x "
                          f"{versus_plain} {seconds / floor:>7.2f}x", flush=True)
            print(f"# {size}: {flops / 1e9:.0f} GFLOP per image, floor {floor:.3f} s")


if __name__ == "__main__":
    main()
