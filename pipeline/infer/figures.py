"""Figures people look at: confusion matrices, prediction grids, denoising triplets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure next to `path` and rename it into place: never a half-written PNG."""
    from pipeline.data.atomic import staged

    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def confusion_figure(confusion: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix (rows: truth, columns: prediction)."""
    plt = _pyplot()
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2, 0.5 * len(classes) + 1.5))
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def _class_legend(fig, colours: np.ndarray, classes: list[str]) -> None:
    """A legend under the figure: each class's colour (`colours[class id]`) beside its name."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colours[i] / 255, edgecolor="black", linewidth=0.5, label=name)
               for i, name in enumerate(classes)]
    # Just below the panels; the saved figure's tight bounding box grows to take it in.
    fig.legend(handles=handles, loc="upper center", ncol=min(len(classes), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0), bbox_transform=fig.transFigure)


def prediction_grid(images: torch.Tensor, columns: dict[str, torch.Tensor], colours: np.ndarray,
                    classes: list[str], path: Path) -> None:
    """One row per image: the image, then each label map (truth, teacher, student...) coloured
    by `colours` (256×3, indexed by class id; see pipeline.data.formats.palette_for), with a
    legend of the classes' colours."""
    plt = _pyplot()
    n, ncols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, ncols, figsize=(1.6 * ncols, 1.6 * n), squeeze=False)
    for i in range(n):
        panels = [images[i].permute(1, 2, 0).numpy()] + [colours[m[i].numpy()] for m in columns.values()]
        for j, (panel, title) in enumerate(zip(panels, ["image", *columns])):
            axes[i, j].imshow(panel, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
    _class_legend(fig, colours, classes)
    _save(fig, path)


def pseudo_label_grid(images: list[np.ndarray], labels: list[np.ndarray], confidence: list[np.ndarray],
                      truth: list[np.ndarray | None], colours: np.ndarray, classes: list[str], path: Path) -> None:
    """One row per unlabeled image: the image, its pseudo-label, the teacher's confidence
    (dark = unsure) and, where a held-aside mask exists, the ground truth; a legend of the
    classes' colours."""
    plt = _pyplot()
    names = ["image", "pseudo-label", "confidence", "ground truth"]
    ncols = 4 if any(t is not None for t in truth) else 3
    fig, axes = plt.subplots(len(images), ncols, figsize=(1.6 * ncols, 1.6 * len(images)), squeeze=False)
    for i in range(len(images)):
        panels = [images[i], colours[labels[i]], confidence[i], None if truth[i] is None else colours[truth[i]]]
        for j in range(ncols):
            ax = axes[i, j]
            if panels[j] is not None:
                ax.imshow(panels[j], cmap="gray" if j == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(names[j], fontsize=9)
    _class_legend(fig, colours, classes)
    _save(fig, path)


def per_class_bars(scores: dict[str, dict], classes: list[str], path: Path) -> None:
    """Val IoU per class, one bar per model (teacher, student) side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(classes) * len(scores) + 1.2))
    height = 0.8 / len(scores)
    for k, (name, s) in enumerate(scores.items()):
        ax.barh(np.arange(len(classes)) + k * height, [s["per_class_iou"].get(c, 0.0) for c in classes],
                height=height, label=f"{name} (mIoU {s['miou']:.3f})")
    ax.set_yticks(np.arange(len(classes)) + 0.4 - height / 2, classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("val IoU")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def denoising_triplets(clean: torch.Tensor, noisy: torch.Tensor, predicted: torch.Tensor,
                       target: torch.Tensor, path: Path) -> None:
    """Per row: clean, noisy input, the prediction and its target (the noise, or the clean
    image), all mapped from [-1, 1]."""
    plt = _pyplot()
    def show(t: torch.Tensor) -> np.ndarray:
        return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    names = ["clean", "noisy", "predicted", "target"]
    n = len(clean)
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.6 * n), squeeze=False)
    for i in range(n):
        for j, t in enumerate((clean[i], noisy[i], predicted[i], target[i])):
            axes[i, j].imshow(show(t))
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(names[j], fontsize=9)
    _save(fig, path)


def mean_curves(curves: dict[str, tuple[list[float], list[float], list[float]]], xlabel: str, ylabel: str,
                title: str, path: Path, log_x: bool = False) -> None:
    """One line per curve through its means, with ±1 standard deviation as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (xs, means, spreads) in curves.items():
        ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
