"""Pictures of the analyses in `pipelines.evaluation.analysis` (the DETR paper's Figs. 4, 7 and 12, a confusion
matrix and a grid of the worst images), each a PNG at `path`.

A class has one colour in every picture, the colour `pipelines.inference.drawing` draws its detections in
(`class_colour`), so a reader can follow a class from one picture to the next.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.inference.drawing import class_colour

SMALL_BOX_AREA = 0.1
"""A slot's box is "small" (green in `plot_slot_boxes`) when w * h, normalised, is under a tenth of the image."""
SLOT_COLOURS = {"small": "green", "horizontal": "red", "vertical": "blue"}

ErrorEntry = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]
"""(image HWC uint8, gt_boxes xyxy, gt_labels, pred_boxes xyxy, pred_scores, pred_labels, title)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_layer_ap(rows: Sequence[Mapping[str, float]], path: str) -> str:
    """AP and AP50 against decoder layer, solid without NMS and dashed with it (paper Fig. 4): where the dashed
    line stops rising above the solid one, the decoder has stopped making duplicates."""
    plt = _pyplot()
    layers = [int(row["layer"]) for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for metric, colour in (("AP", "C0"), ("AP50", "C1")):
        ax.plot(layers, [row[metric] for row in rows], color=colour, marker="o", label=metric)
        ax.plot(layers, [row[f"{metric}_nms"] for row in rows], color=colour, marker="o", linestyle="--",
                label=f"{metric} with NMS")
    refined = [row.get("boxes") == "refined" for row in rows]
    ax.set_xlabel("decoder layer, then the box refiner" if any(refined) else "decoder layer")
    ax.set_ylabel("AP")
    ax.set_xticks(layers, ["refined" if r else str(layer) for layer, r in zip(layers, refined)])
    ax.set_title("AP after each decoder layer")
    if rows:
        ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def slot_box_colour(w: float, h: float) -> str:
    """Paper Fig. 7's colours: green for a small box (w * h < SMALL_BOX_AREA), red for a large horizontal one
    (w > h), blue for a large vertical or square one."""
    if w * h < SMALL_BOX_AREA:
        return SLOT_COLOURS["small"]
    return SLOT_COLOURS["horizontal"] if w > h else SLOT_COLOURS["vertical"]


def plot_slot_boxes(slots: Mapping[str, Any], path: str, max_slots: int = 20, columns: int = 5,
                    name: str = "slot") -> str:
    """One small unit square per query slot (the first `max_slots` with boxes), a dot at each box centre
    (cx, 1 - cy: image up is up), coloured by `slot_box_colour` (paper Fig. 7). Accepts `slot_boxes`' dict as
    returned or after a JSON round trip (slot keys as strings). `name` titles each square ("slot"; a
    two-stage model's queries are proposals, "proposal rank")."""
    plt = _pyplot()
    chosen = [(int(q), points) for q, points in sorted(slots["boxes"].items(), key=lambda item: int(item[0]))
              if points][:max_slots]
    rows = max(1, math.ceil(len(chosen) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (q, points) in zip(axes.flat, chosen):
        _slot_axes(ax, f"{name} {q}", np.asarray(points, dtype=np.float64).reshape(-1, 4))
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no boxes", ha="center", va="center")
    return _save(fig, path)


def _slot_axes(ax, title: str, boxes: np.ndarray) -> None:
    ax.set_axis_on()
    ax.scatter(boxes[:, 0], 1 - boxes[:, 1], s=4, c=[slot_box_colour(w, h) for w, h in boxes[:, 2:].tolist()])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="small")


def plot_missed_by_instance_count(data: Mapping[str, Sequence[Mapping[str, float]]],
                                  categories: Sequence[Mapping[str, Any]], path: str) -> str:
    """Mean instances missed against instances of the class in the image, one line per class in its colour
    (paper Fig. 12): a line rising with n means the model saturates on crowded images."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    plotted = False
    for category in categories:
        points = data.get(str(category["name"])) or []
        if points:
            ax.plot([p["instances"] for p in points], [p["mean_missed"] for p in points], marker="o",
                    color=class_colour(category["id"]), label=str(category["name"]))
            plotted = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("instances of the class in the image")
    ax.set_ylabel("mean instances missed")
    ax.set_ylim(bottom=0)
    ax.set_title("Missed instances by instance count")
    if plotted:
        ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def plot_confusion_matrix(cm: Mapping[str, Any], path: str) -> str:
    """`confusion_matrix`'s counts as an annotated heat map: rows true class, columns predicted class."""
    plt = _pyplot()
    matrix = np.asarray(cm["matrix"], dtype=np.int64)
    classes = list(cm["classes"])
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max(initial=0)), 1))
    threshold = matrix.max(initial=0) / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                color="white" if count > threshold else "black")
    ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix\nIoU {cm.get('iou', '')}, score > {cm.get('score', '')}", fontsize="medium")
    return _save(fig, path)


def draw_error_grid(entries: Sequence[ErrorEntry], path: str, columns: int = 4, min_score: float = 0.5) -> str:
    """Images side by side, each with its ground truth (thin, dashed) and its predictions with score > `min_score`
    (solid, score written) in their class colours, under the entry's title (e.g. "12: 3 FP, 1 FN"): a look at the
    images `error_counts` ranks worst."""
    plt = _pyplot()
    columns = max(1, min(columns, len(entries)))
    rows = max(1, math.ceil(len(entries) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, entry in zip(axes.flat, entries):
        _error_axes(ax, entry, min_score)
    if not entries:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    return _save(fig, path)


def _error_axes(ax, entry: ErrorEntry, min_score: float) -> None:
    image, gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels, title = entry
    ax.imshow(np.asarray(image, dtype=np.uint8))
    predictions = zip(np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4), np.asarray(pred_scores).reshape(-1),
                      np.asarray(pred_labels).reshape(-1))
    for box, score, label in predictions:
        if score > min_score:
            _rectangle(ax, box, class_colour(label), linestyle="-", linewidth=2)
            ax.text(box[0], box[1], f"{score:.2f}", color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": class_colour(label), "edgecolor": "none", "pad": 1})
    for box, label in zip(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)):
        _rectangle(ax, box, class_colour(label), linestyle="--", linewidth=1)  # over the predictions: stays visible
    ax.set_title(title, fontsize="small")


def _rectangle(ax, box: np.ndarray, colour: str, linestyle: str, linewidth: float) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=linestyle,
                           linewidth=linewidth))
