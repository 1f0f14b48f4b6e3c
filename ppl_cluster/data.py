"""Datasets as one float tensor of images in [0, 1] (N, C, H, W) plus optional labels.

Labels are kept only for evaluation; no training code reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError

SPLITS = ("train", "test", "all")


@dataclass
class Dataset:
    """Images ``x`` (N, C, H, W) float32 in [0, 1]; ``y`` integer labels (N,) or None."""

    name: str
    split: str
    x: torch.Tensor
    y: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.split, self.x.to(device), self.y)


def _digits(root: str | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = d.target.astype(np.int64)
    if split != "all":
        # sklearn ships no split: a fixed, seeded 80/20 partition.
        idx = np.random.default_rng(0).permutation(len(y))
        cut = int(0.8 * len(y))
        idx = idx[:cut] if split == "train" else idx[cut:]
        x, y = x[idx], y[idx]
    return x[:, None], y


def _torchvision(cls_name: str, folder: str, files: str) -> Callable:
    def load(root: str | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        import torchvision

        if root is None:
            raise DataError(
                f"--data-root is required for this dataset (torchvision expects {folder}/raw/ under it)"
            )
        cls = getattr(torchvision.datasets, cls_name)
        parts = []
        for train in _which(split):
            try:
                ds = cls(root, train=train, download=download)
            except RuntimeError as exc:
                expected = os.path.join(root, folder, "raw", files)
                raise DataError(
                    f"{cls_name} not found at {expected}: put torchvision's raw files there "
                    f"or pass --download ({exc})"
                ) from None
            parts.append((ds.data.numpy(), ds.targets.numpy()))
        x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
        y = np.concatenate([p[1] for p in parts]).astype(np.int64)
        return x[:, None], y

    return load


def _svhn(root: str | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    if root is None:
        raise DataError("--data-root is required for svhn (expects train_32x32.mat / test_32x32.mat)")
    parts = []
    for train in _which(split):
        name = "train" if train else "test"
        try:
            ds = torchvision.datasets.SVHN(root, split=name, download=download)
        except RuntimeError as exc:
            expected = os.path.join(root, f"{name}_32x32.mat")
            raise DataError(f"SVHN not found at {expected}: put it there or pass --download ({exc})") from None
        parts.append((ds.data, ds.labels))
    x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return x, y


def _which(split: str) -> list[bool]:
    return {"train": [True], "test": [False], "all": [True, False]}[split]


DATASETS: dict[str, Callable[[str | None, str, bool], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "mnist": _torchvision("MNIST", "MNIST", "train-images-idx3-ubyte"),
    "fashion-mnist": _torchvision("FashionMNIST", "FashionMNIST", "train-images-idx3-ubyte"),
    "svhn": _svhn,
}


def load_dataset(
    name: str,
    root: str | None = None,
    split: str = "all",
    download: bool = False,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load a named dataset as one tensor on ``device``. Raises :class:`DataError`."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if root is not None and not download and not os.path.isdir(root):
        raise DataError(f"data root {root} does not exist (pass an existing folder, or --download)")
    x, y = DATASETS[name](root, split, download)
    return Dataset(name, split, as_images(x).to(device), y)


def as_images(x: np.ndarray | torch.Tensor, *, unit_interval: bool = True) -> torch.Tensor:
    """Validate user data and return a float32 tensor (N, C, H, W).

    Accepts (N, D) vectors (treated as 1 x 1 x D), (N, H, W) or (N, C, H, W) images.
    """
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"data must be numeric, got dtype {arr.dtype}")
        x = torch.from_numpy(arr)
    t = x
    if t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"data must be real numbers, got dtype {t.dtype}")
    t = t.float()
    if t.dim() == 2:
        t = t[:, None, None, :]
    elif t.dim() == 3:
        t = t[:, None]
    elif t.dim() != 4:
        raise DataError(f"data must have 2, 3 or 4 dimensions (N, ...), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise DataError("data is empty")
    if not torch.isfinite(t).all():
        raise DataError("data contains NaN or infinite values")
    if unit_interval and (t.min() < 0 or t.max() > 1):
        raise DataError(
            f"data must lie in [0, 1] for a Bernoulli likelihood (found [{t.min():.3g}, {t.max():.3g}]); "
            "rescale it or use likelihood='gaussian'"
        )
    return t.contiguous()


def random_affine(x: torch.Tensor, degrees: float = 10.0, translate: float = 0.1,
                  scale: float = 0.1) -> torch.Tensor:
    """Random small rotations, shifts and zooms of a batch (N, C, H, W), on its device.

    Used to pretrain autoencoders on slightly perturbed digits: it makes the embedding ignore
    pose, which is what the GMM initialisation then clusters. Only the torch RNG is used, so
    runs stay deterministic and resumable.
    """
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * degrees * torch.pi / 180
    zoom = 1 + (torch.rand(n, device=x.device) * 2 - 1) * scale
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * translate * 2  # grid spans [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1),
                         torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
