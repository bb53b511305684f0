"""Cross-worker loss normalisation: 2 DDP workers with half the batch each equal 1 worker with all of it.

Runs two real processes over torch.distributed (gloo), without Ray: this is the
model library's guarantee; the Ray Train job relies on it.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr import SetCriterion, build_model, pad_images

SIZES = [(64, 80), (72, 64), (80, 96), (64, 64)]
COUNTS = [3, 1, 0, 2]  # the two halves hold 4 and 2 objects: local normalisers differ


def make_batch():
    g = torch.Generator().manual_seed(7)
    images = [torch.randn(3, h, w, generator=g) for h, w in SIZES]
    targets = []
    for n in COUNTS:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(1, 5, (n,), generator=g), "boxes": torch.cat([centre, size], 1)})
    return images, targets


def make_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=5, dropout=0.0).train()


def loss_and_grads(model, images, targets):
    criterion = SetCriterion.from_config(model.module.config if hasattr(model, "module") else model.config)
    losses = criterion(model(*pad_images(images)), targets)
    total = criterion.total(losses)
    total.backward()
    named = model.module.named_parameters() if hasattr(model, "module") else model.named_parameters()
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    return total.detach(), grads


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images, targets = make_batch()
        half = len(images) // world
        shard = slice(rank * half, (rank + 1) * half)
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        total, grads = loss_and_grads(model, images[shard], targets[shard])
        torch.save({"total": total, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_workers_with_half_batches_equal_one_worker_with_the_whole(tmp_path):
    images, targets = make_batch()
    single_total, single_grads = loss_and_grads(make_model(), images, targets)

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Each worker's loss is its share: their mean is the whole batch's loss.
    assert torch.stack([r["total"] for r in ranks]).mean().item() == pytest.approx(single_total.item(), rel=1e-5)
    assert ranks[0]["total"].item() != pytest.approx(ranks[1]["total"].item(), rel=1e-3)
    # DDP averages gradients: they equal the single worker's, for every trained parameter.
    assert set(ranks[0]["grads"]) == set(single_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
