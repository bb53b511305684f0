"""Model speed: forward images/s (eval, batch 1 and 4) and one training step, as a table.

    python bench/model_speed.py [--preset detr_r50] [--repeats 3] [--threads N]

Measures the paper's DETR-R50 at 800x1066 (COCO's typical evaluation size) and
512x683, on whatever device is available (CUDA when present, else the CPU with
all its cores). The training step is forward + loss (with Hungarian matching) +
backward + clipping + AdamW at batch 2. Also reports the cost of exact padding
invariance: a batch of 4 differently sized images with and without it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from detr import DETRConfig, SetCriterion, build_model, pad_images
from detr.optim import OptimizerConfig, build_optimizer, clip_gradients


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_targets(batch: int, num_classes: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        n = 7  # COCO averages about 7 objects per image
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
        labels = torch.randint(1, num_classes, (n,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": boxes.to(device)})
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="detr_r50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--sizes", default="800x1066,512x683", help="comma-separated HxW list")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = DETRConfig.preset(args.preset)
    model = build_model(config).to(device).eval()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"# {args.preset} on {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"{'measurement':<44} {'seconds':>9} {'images/s':>9}")

    for h, w in sizes:
        for batch in (1, 4):
            images, mask = pad_images([torch.randn(3, h, w, device=device) for _ in range(batch)])
            with torch.inference_mode():
                seconds = time_call(lambda: model(images, mask), args.repeats, device)
            print(f"{f'forward eval, batch {batch}, {h}x{w}':<44} {seconds:>9.3f} {batch / seconds:>9.2f}")

    # Padding invariance costs a mask multiply per normalisation layer when a batch has padding.
    h, w = sizes[-1]
    mixed = [torch.randn(3, h - 32 * i, w - 48 * i, device=device) for i in range(4)]
    images, mask = pad_images(mixed)
    official = build_model(config.replace(padding_invariant=False)).to(device).eval()
    official.load_state_dict(model.state_dict())
    with torch.inference_mode():
        t_inv = time_call(lambda: model(images, mask), args.repeats, device)
        t_off = time_call(lambda: official(images, mask), args.repeats, device)
    print(f"{f'forward, 4 mixed sizes <= {h}x{w}, padding-invariant':<44} {t_inv:>9.3f} {4 / t_inv:>9.2f}")
    print(f"{f'forward, 4 mixed sizes <= {h}x{w}, official padding':<44} {t_off:>9.3f} {4 / t_off:>9.2f}")

    train_model = build_model(config).to(device).train()
    criterion = SetCriterion.from_config(config).to(device)
    optim_config = OptimizerConfig()
    optimizer = build_optimizer(train_model, optim_config)
    for h, w in sizes:
        images, mask = pad_images([torch.randn(3, h, w, device=device) for _ in range(2)])
        targets = synthetic_targets(2, config.num_classes, device)

        def step() -> None:
            losses = criterion(train_model(images, mask), targets)
            optimizer.zero_grad(set_to_none=True)
            criterion.total(losses).backward()
            clip_gradients(train_model, optim_config.clip_max_norm)
            optimizer.step()

        seconds = time_call(step, args.repeats, device)
        print(f"{f'training step, batch 2, {h}x{w}':<44} {seconds:>9.3f} {2 / seconds:>9.2f}")
    print(f"# padding invariance overhead: {t_inv / t_off:.3f}x of the official forward")


if __name__ == "__main__":
    main()
