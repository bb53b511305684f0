"""The files an evaluation leaves behind: a per-class table (CSV) and a precision-recall plot (PNG)."""
from __future__ import annotations

import csv
import math
from typing import Mapping, Sequence

DETECTION_COLUMNS = ("AP",)
PANOPTIC_COLUMNS = ("PQ", "SQ", "RQ", "TP", "FP", "FN", "mask_AP")


def write_per_class_table(path: str, per_class: Mapping[int, Mapping[str, float]],
                          categories: Sequence[Mapping], columns: Sequence[str]) -> str:
    """One row per category id: its name, whether it is a thing (panoptic categories), then `columns`
    (empty where not a number)."""
    names = {int(c["id"]): str(c["name"]) for c in categories}
    things = {int(c["id"]): int(bool(c["isthing"])) for c in categories if "isthing" in c}
    kind = ["isthing"] if things else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category_id", "name", *kind, *columns])
        for cat_id, values in sorted(per_class.items()):
            cells = [_cell(values.get(name, float("nan"))) for name in columns]
            writer.writerow([cat_id, names.get(cat_id, ""), *([things.get(cat_id, 1)] if kind else []), *cells])
    return path


def _cell(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "" if math.isnan(value) else f"{value:.6f}"


def plot_precision_recall(pr_curves: Mapping[int, Sequence[float]], categories: Sequence[Mapping], path: str) -> str:
    """Precision at 101 recall points (IoU 0.5), one line per category, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = {int(c["id"]): str(c["name"]) for c in categories}
    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for cat_id, precision in sorted(pr_curves.items()):
        ax.plot(recall, precision, label=names.get(cat_id, str(cat_id)))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per class (IoU 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if pr_curves:
        ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
