"""HungarianMatcher: optimal assignment (checked by brute force), empty targets, bad values."""
import itertools

import pytest
import torch

from detr import HungarianMatcher


def random_case(generator, batch, queries, counts, classes=4):
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25,
    }
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, classes, (n,), generator=generator),
                         "boxes": torch.cat([centre, size], 1)})
    return outputs, targets


def brute_force_cost(cost):
    """Minimum total cost of assigning each target (column) to a distinct query (row)."""
    queries, n = cost.shape
    if n == 0:
        return 0.0
    if n <= queries:
        return min(sum(float(cost[q, t]) for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n))
    return min(sum(float(cost[q, t]) for q, t in enumerate(perm)) for perm in itertools.permutations(range(n), queries))


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    counts = [int(x) for x in torch.randint(0, 5, (3,), generator=g)]
    outputs, targets = random_case(g, batch=3, queries=5, counts=counts)
    matcher = HungarianMatcher(1, 5, 2)
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets)
    for i, ((rows, cols), c) in enumerate(zip(indices, cost.split(counts, -1))):
        c = c[i].double()
        assert len(rows) == len(cols) == min(5, counts[i])
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        found = c[rows, cols].sum().item()
        assert found == pytest.approx(brute_force_cost(c), abs=1e-5)


def test_more_targets_than_queries_matches_every_query_once():
    g = torch.Generator().manual_seed(1)
    outputs, targets = random_case(g, batch=1, queries=3, counts=[5])
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert sorted(rows.tolist()) == [0, 1, 2] and len(set(cols.tolist())) == 3


def test_images_without_targets_match_nothing():
    g = torch.Generator().manual_seed(2)
    outputs, targets = random_case(g, batch=3, queries=4, counts=[0, 2, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 2, 0]
    assert all(r.dtype == torch.int64 and c.dtype == torch.int64 for r, c in indices)
    outputs, targets = random_case(g, batch=2, queries=4, counts=[0, 0])
    assert [len(r) for r, _ in HungarianMatcher()(outputs, targets)] == [0, 0]


def test_each_cost_term_drives_the_match():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(1, 2, 3)
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.79, 0.8, 0.1, 0.1]])}]
    out = {"pred_logits": logits, "pred_boxes": boxes}
    assert HungarianMatcher(1, 5, 2)(out, target)[0][0].tolist() == [1]  # the overlapping box
    logits[0, 0, 0] = 10.0  # query 0 is sure of class 0; only the class cost counts
    assert HungarianMatcher(1, 0, 0)(out, target)[0][0].tolist() == [0]


def test_non_finite_predictions_raise_a_clear_error():
    g = torch.Generator().manual_seed(3)
    outputs, targets = random_case(g, batch=1, queries=3, counts=[2])
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianMatcher()(outputs, targets)


def test_all_zero_costs_are_refused():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
