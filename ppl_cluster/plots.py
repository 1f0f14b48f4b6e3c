"""Image grids and the diagnostics' figures (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .checkpoint import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """Lay out, write ``fig`` as a PNG atomically, and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_grid(images: np.ndarray, path: str, row_labels: list[str] | None = None,
              title: str | None = None, col_labels: list[str] | None = None) -> None:
    """Save images (rows, cols, C, H, W) in [0, 1] as one PNG, one labelled row per group
    (and optionally labelled columns)."""
    plt = pyplot()
    rows, cols, c, h, w = images.shape
    pad = 1
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = np.transpose(images[i, j], (1, 2, 0))
    canvas = np.clip(canvas, 0, 1)
    scale = max(1.0, 28.0 / h) * 0.04
    fig, ax = plt.subplots(figsize=(max(3.0, cols * w * scale + 1.2), max(2.0, rows * h * scale + 0.4)))
    ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    if col_labels is not None:
        ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(cols)], col_labels, fontsize=7,
                      rotation=90 if max(map(len, col_labels), default=0) > 6 else 0)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(rows)], row_labels, fontsize=7)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    save_figure(fig, path)


# --- the diagnostics' figures (ppl_cluster.diagnostics) -----------------------------------

def plot_khat_hist(khat: np.ndarray, path: str, ok: float, bad: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    finite = khat[np.isfinite(khat)]
    ax.hist(finite, bins=40, color="tab:blue")
    if finite.size < khat.size:
        ax.text(0.98, 0.95, f"{khat.size - finite.size} infinite (not shown)", ha="right",
                va="top", transform=ax.transAxes, fontsize=7, color="tab:red")
    for v, c in ((ok, "tab:orange"), (bad, "tab:red")):
        ax.axvline(v, color=c, ls="--", lw=1)
    ax.set_xlabel("PSIS k̂ per image")
    ax.set_ylabel("images")
    ax.set_title(f"{(khat > bad).mean():.1%} of images with k̂ > {bad}", fontsize=9)
    save_figure(fig, path, dpi=110)


def plot_images(images: np.ndarray, titles: list[str], path: str, title: str, cols: int = 8) -> None:
    plt = pyplot()
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = np.transpose(images[i], (1, 2, 0))
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0, 1),
                      cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)


def plot_latent_pca(means: np.ndarray, pred: np.ndarray, path: str,
                    centers: np.ndarray | None = None) -> None:
    plt = pyplot()
    centered = means - means.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    proj = centered @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(proj[:, 0], proj[:, 1], c=pred, cmap="tab10" if pred.max() < 10 else "tab20",
                    s=3, alpha=0.6)
    if centers is not None:
        cp = (centers - means.mean(0)) @ vt[:2].T
        ax.scatter(cp[:, 0], cp[:, 1], c="k", marker="x", s=40, label="mixture means μ_c")
        for c, (a, b) in enumerate(cp):
            ax.annotate(str(c), (a, b), fontsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.colorbar(sc, ax=ax, label="cluster")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("latent means E[z|x], first two principal components", fontsize=9)
    save_figure(fig, path, dpi=110)


def plot_cluster_sizes(health: dict[str, Any], path: str) -> None:
    plt = pyplot()
    sizes = np.asarray(health["sizes"], dtype=float)
    k = len(sizes)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * k + 1), 3))
    ax.bar(np.arange(k) - 0.2, sizes / sizes.sum(), width=0.4, label="assigned share")
    if health["weights"] is not None:
        ax.bar(np.arange(k) + 0.2, health["weights"], width=0.4, label="mixture weight π_c")
    for f in health["flags"]:
        ax.annotate(f["flag"], (f["cluster"], 0), ha="center", va="bottom", color="tab:red",
                    fontsize=7, rotation=90)
    ax.axhline(1 / k, color="gray", ls=":", lw=1)
    ax.set_xticks(range(k))
    ax.set_xlabel("cluster")
    ax.legend(fontsize=7)
    ax.set_title("cluster sizes", fontsize=9)
    save_figure(fig, path, dpi=110)


def confusion_after_matching(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
    """Counts (true label, cluster) with clusters reordered by their Hungarian-matched label."""
    from .metrics import contingency, hungarian_mapping

    mapping = hungarian_mapping(y, pred)
    m = contingency(y, pred).T  # (labels, clusters)
    clusters = sorted(range(m.shape[1]), key=lambda c: (mapping.get(c, 10**9), c))
    cols = [f"c{c}→{mapping[c]}" if c in mapping else f"c{c}" for c in clusters]
    return m[:, clusters], [str(v) for v in range(m.shape[0])], cols


def plot_confusion(y: np.ndarray, pred: np.ndarray, path: str) -> None:
    plt = pyplot()
    m, rows, cols = confusion_after_matching(y, pred)
    fig, ax = plt.subplots(figsize=(0.45 * len(cols) + 2, 0.45 * len(rows) + 1.5))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("cluster → matched label (Hungarian)")
    ax.set_ylabel("true label")
    acc = np.trace(m[:, : min(m.shape)]) / m.sum() if m.shape[1] else 0.0
    ax.set_title(f"confusion after matching (diagonal = {acc:.1%})", fontsize=9)
    save_figure(fig, path, dpi=110)
