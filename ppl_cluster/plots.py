"""Image grids (matplotlib, headless)."""

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
