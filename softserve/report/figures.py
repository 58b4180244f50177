"""The report's figures, drawn with matplotlib's Agg backend from a :class:`ReportData`.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state) and rendered to
PNG without the Software tag, so the same numbers give the same bytes. Each axes carries
a label (``Axes.get_label``) naming what it shows, which is how tests find it.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from softserve.report.numbers import ReportData

HARD_COLOR = "#d1495b"
BAR_COLOR = "#4f6d7a"
DPI = 100


def _name(names: list[str], cls: int, width: int = 14) -> str:
    """A class name shortened to ``width``, shown as typed: its ``$`` would start
    matplotlib's mathtext, which fails on a name such as ``$x^{$``."""
    text = names[cls] if cls < len(names) else str(cls)
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _show(ax, image: np.ndarray) -> None:
    """An image (C, H, W) in [0, 1] or uint8, grey for one channel."""
    if image.shape[0] == 1:
        vmax = 255 if image.dtype == np.uint8 else 1.0
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def views_figure(data: ReportData) -> Figure:
    """The grid of views: rows are classes, columns stored epochs; under each view, the
    teacher's top-3 probabilities, the hard label's bar in red."""
    grid = data.numbers["grid"]
    names = data.numbers["label_set"]["class_names"]
    rows, cols = len(grid["classes"]), len(grid["epochs"])
    height = 2.9 * rows + 0.6
    fig = Figure(figsize=(2.1 * cols + 0.6, height), dpi=DPI)
    spec = fig.add_gridspec(
        2 * rows, cols, height_ratios=[3, 1.2] * rows, hspace=0.75, wspace=0.6,
        top=1 - 0.75 / height, bottom=0.25 / height, left=0.12, right=0.97,
    )  # fmt: skip
    for i, cell in enumerate(grid["cells"]):
        r, c = grid["classes"].index(cell["class"]), grid["epochs"].index(cell["epoch"])
        ax = fig.add_subplot(spec[2 * r, c], label=f"view-{i}")
        _show(ax, data.grid_images[i])
        mix = cell.get("mix")  # mixed sets: the partner, and how much of the view is its own
        mixed = f" · #{mix['partner']} λ {mix['lambda']:.2f}" if mix and mix["lambda"] < 1 else ""
        ax.set_title(
            f"{_name(names, cell['class'])} #{cell['sample']}\nepoch {cell['epoch']}{mixed}",
            fontsize=8,
        )
        bars = fig.add_subplot(spec[2 * r + 1, c], label=f"top3-{i}")
        classes = [cls for cls, _ in cell["top3"]]
        probs = [p for _, p in cell["top3"]]
        colors = [HARD_COLOR if cls == cell["class"] else BAR_COLOR for cls in classes]
        ypos = np.arange(len(classes))[::-1]
        bars.barh(ypos, probs, color=colors)
        bars.set_yticks(ypos, [_name(names, cls, 10) for cls in classes], fontsize=6)
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=6)
        if cell["class"] not in classes:
            bars.text(0.98, 0.05, f"hard {cell['hard_prob']:.2f}", color=HARD_COLOR,
                      fontsize=6, ha="right", transform=bars.transAxes)  # fmt: skip
    fig.suptitle(
        "Views the teacher saw, with its top-3 classes (hard label in red)", fontsize=10,
        y=1 - 0.2 / height,
    )
    return fig


def agreement_figure(data: ReportData) -> Figure:
    """Share of views whose teacher class is the hard label, per class and per epoch."""
    agreement = data.numbers["agreement"]
    names = data.numbers["label_set"]["class_names"]
    fig = Figure(figsize=(10, 3.4), dpi=DPI, layout="constrained")
    by_class, by_epoch = fig.subplots(1, 2, width_ratios=[3, 2])
    by_class.set_label("agreement-per-class")
    by_epoch.set_label("agreement-per-epoch")
    per_class = agreement["per_class"]
    by_class.bar(np.arange(len(per_class)), per_class, color=BAR_COLOR)
    if len(per_class) <= 20:
        labels = [_name(names, i) for i in range(len(per_class))]
        by_class.set_xticks(np.arange(len(per_class)), labels, rotation=45, ha="right", fontsize=7)
    by_class.set_ylim(0, 1)
    by_class.set_ylabel("teacher class = hard label")
    by_class.set_title(f"per class (overall {agreement['overall']:.3f})", fontsize=10)
    per_epoch = agreement["per_epoch"]
    by_epoch.plot(np.arange(len(per_epoch)), per_epoch, color=BAR_COLOR, marker="." if
                  len(per_epoch) <= 50 else None)  # fmt: skip
    by_epoch.set_ylim(0, 1)
    by_epoch.set_xlabel("stored epoch")
    by_epoch.set_title("per stored epoch", fontsize=10)
    return fig


def entropy_figure(data: ReportData) -> Figure:
    """Per class, the distribution of the teacher's entropy over views (rows sum to 1)."""
    entropy = data.numbers["entropy"]
    names = data.numbers["label_set"]["class_names"]
    counts = np.asarray(entropy["counts"], dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(counts)
    fig = Figure(figsize=(8, 1.2 + 0.28 * min(k, 40)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(label="entropy-per-class")
    shown = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(0, entropy["max"], k - 0.5, -0.5))  # fmt: skip
    ax.plot(entropy["mean_per_class"], np.arange(k), "w|", markersize=8, label="mean")
    if k <= 40:
        ax.set_yticks(np.arange(k), [_name(names, i) for i in range(k)], fontsize=7)
    ax.set_xlabel("entropy of softmax(teacher logits), nats (right edge: ln K, uniform)")
    ax.set_title("Teacher entropy per class (share of the class's views; | = mean)", fontsize=10)
    fig.colorbar(shown, ax=ax, label="share of views")
    return fig


def _histogram(ax, edges: list[float], counts: list[int]) -> None:
    edges_a = np.asarray(edges)
    ax.bar(edges_a[:-1], counts, width=np.diff(edges_a), align="edge", color=BAR_COLOR)
    ax.set_ylabel("views")


def cosine_figure(data: ReportData) -> Figure:
    """How far GIFT's refinement moves labels: cos(teacher logits, refined label)."""
    cosine = data.numbers["refinement_cosine"]
    fig = Figure(figsize=(6, 3), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(label="refinement-cosine")
    _histogram(ax, cosine["edges"], cosine["counts"])
    ax.set_xlabel("cos(teacher logits, refined label); the range is [√(1-β²), 1]")
    ax.set_title("GIFT refinement: how far each label moves", fontsize=10)
    return fig


def hardest_figure(data: ReportData) -> Figure:
    """The samples with the lowest mean hard-label probability, as base images."""
    hardest = data.numbers["hardest"]
    names = data.numbers["label_set"]["class_names"]
    cols = min(6, max(1, len(hardest)))
    rows = -(-len(hardest) // cols)
    fig = Figure(figsize=(1.9 * cols, 2.2 * rows + 0.3), dpi=DPI, layout="constrained")
    for i, item in enumerate(hardest):
        ax = fig.add_subplot(rows, cols, i + 1, label=f"hardest-{i}")
        _show(ax, data.hardest_images[i])
        ax.set_title(
            f"#{item['sample']} {_name(names, item['hard'], 10)}\n"
            f"p̄ {item['mean_hard_prob']:.3f} → {_name(names, item['teacher_class'], 10)}",
            fontsize=7,
        )
    fig.suptitle("Hardest samples: mean p(hard label) over epochs → teacher's usual class",
                 fontsize=10)  # fmt: skip
    return fig


def storage_figure(data: ReportData) -> Figure:
    """Stored bytes per view (label, norm, order and view) for each codec at this K."""
    storage = data.numbers["storage"]
    table = storage["codecs"]
    fig = Figure(figsize=(6, 0.6 + 0.35 * len(table)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(label="storage")
    ypos = np.arange(len(table))[::-1]
    colors = [HARD_COLOR if row["codec"] == storage["codec"] else BAR_COLOR for row in table]
    ax.barh(ypos, [row["bytes_per_view"] for row in table], color=colors)
    ax.set_yticks(ypos, [row["codec"] for row in table], fontsize=8)
    ax.set_xlabel("bytes per stored view (this set's codec in red)")
    return fig


def topk_figure(data: ReportData) -> Figure:
    """For a top-k set: the teacher's probability mass on the k stored classes."""
    mass = data.numbers["topk_mass"]
    fig = Figure(figsize=(6, 3), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(label="topk-mass")
    _histogram(ax, mass["edges"], mass["counts"])
    ax.set_xlabel(f"mass of softmax(logits) on the stored classes (mean {mass['mean']:.3f})")
    return fig


def build_figures(data: ReportData) -> dict[str, Figure]:
    """Every figure of the report, by file stem, in the page's order."""
    figures = {
        "views": views_figure(data),
        "agreement": agreement_figure(data),
        "entropy": entropy_figure(data),
        "refinement_cosine": cosine_figure(data),
        "hardest": hardest_figure(data),
        "storage": storage_figure(data),
    }
    if data.numbers["topk_mass"] is not None:
        figures["topk_mass"] = topk_figure(data)
    return figures


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG, with no metadata that varies between runs."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()
