"""Datasets as one float tensor of images in [0, 1] (N, C, H, W) plus optional labels.

Labels are kept only for evaluation; no training code reads them. Multi-factor datasets
(``colored-mnist``, ``colored-fashion-mnist``, ``colored-digits``, ``shapes``, ``3dshapes``)
also carry ``factors``: one
integer label array per generative factor, for scoring multi-facet clusterings.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .files import load_file, source, split_index

SPLITS = ("train", "test", "all")


@dataclass
class Dataset:
    """Images ``x`` (N, C, H, W) float32 in [0, 1], or uint8 pixels k standing for k / 255
    (:func:`unit`: stored as they came, a quarter of the memory, converted a batch at a time);
    ``y`` integer labels (N,) or None.

    ``factors`` maps a factor name to integer labels (N,) for datasets with several known
    generative factors (e.g. ``{"digit": ..., "color": ...}``); ``y`` stays the primary label.
    """

    name: str
    split: str
    x: torch.Tensor
    y: np.ndarray | None
    factors: dict[str, np.ndarray] | None = None
    # For data read from a file (``file``): its path, size and content hash (files.source).
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for key, labels in (self.factors or {}).items():
            if len(labels) != self.x.shape[0]:
                raise DataError(f"factor {key!r} has {len(labels)} labels for {self.x.shape[0]} images")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def label_factors(self) -> dict[str, np.ndarray]:
        """What clusterings are scored against: the factors, else the labels as factor
        ``label``, else nothing."""
        if self.factors:
            return dict(self.factors)
        return {"label": self.y} if self.y is not None else {}

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.split, self.x.to(device), self.y, self.factors, self.source)


# A loader takes (root, split, download, **options) -- options are keyword-only parameters with
# defaults, which load_dataset validates against -- and returns (x, y, factors or None).
Loaded = tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]


def _digits(root: str | None, split: str, download: bool) -> Loaded:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    x, y = _fixed_split(x, d.target.astype(np.int64), split)
    return x[:, None], y, None


def _fixed_split(x: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn ships no split: the fixed, seeded 80/20 partition of :func:`split_index`."""
    idx = split_index(len(y), split)
    return (x, y) if idx is None else (x[idx], y[idx])


def _table(name: str) -> Callable[..., Loaded]:
    """A feature table bundled with scikit-learn (``load_<name>``): (N, D) features, each
    standardised to mean 0 and sd 1 (so fit with ``likelihood="gaussian"``), the class as
    label; ``train``/``test`` are a fixed, seeded 80/20 partition as for ``digits``."""

    def load(root: str | None, split: str, download: bool) -> Loaded:
        import sklearn.datasets

        d = getattr(sklearn.datasets, f"load_{name}")()
        x = np.asarray(d.data, dtype=np.float64)
        x = ((x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)).astype(np.float32)
        x, y = _fixed_split(x, np.asarray(d.target, dtype=np.int64), split)
        return x, y, None

    return load


def _read_idx(path: str, ndim: int, name: str) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (``ndim`` dimensions), checked before any byte is
    used: magic ``00 00 08 ndim``, positive dims and a length of exactly header + data."""
    if not os.path.exists(path):
        raise DataError(f"{name} not found at {path}: put torchvision's raw files there "
                        "or pass --download")
    if not os.path.isfile(path):
        raise DataError(f"{name} file {path} is not a regular file")
    header = 4 + 4 * ndim
    expected_magic = bytes([0, 0, 0x08, ndim])
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < header:
                raise DataError(f"{path} is truncated: {size} bytes, fewer than the {header}-byte "
                                f"IDX header (expected magic {expected_magic.hex(' ')})")
            head = f.read(header)
            if head[:4] != expected_magic:
                raise DataError(f"{path} is not an IDX file of {ndim}-dimensional uint8 data: magic "
                                f"{head[:4].hex(' ')}, expected {expected_magic.hex(' ')}")
            dims = [int(d) for d in np.frombuffer(head, ">i4", count=ndim, offset=4)]
            if min(dims) <= 0:
                raise DataError(f"{path}: IDX dimensions {dims} must all be positive")
            expected = header + math.prod(dims)
            if size != expected:
                problem = "is truncated" if size < expected else "is too long"
                raise DataError(f"{path} {problem}: {size} bytes, expected {expected} "
                                f"({header}-byte header + {' x '.join(map(str, dims))} uint8)")
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) != expected - header:  # the file changed while being read
        raise DataError(f"{path} is truncated: read {header + len(data)} bytes, expected {expected}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _idx_dataset(cls_name: str, folder: str) -> Callable[..., Loaded]:
    """MNIST-style data from torchvision's raw IDX files under ``root/folder/raw/``: the image
    and label files of each part are read and checked against each other before anything is
    used; ``download`` has torchvision fetch missing files first."""

    def load(root: str | None, split: str, download: bool) -> Loaded:
        if root is None:
            raise DataError(
                f"--data-root is required for this dataset (torchvision expects {folder}/raw/ under it)"
            )
        raw = os.path.join(root, folder, "raw")
        parts = []
        for train in _which(split):
            prefix = "train" if train else "t10k"
            images_path = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
            labels_path = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
            if download:
                _download(cls_name, root, train, [images_path, labels_path])
            images = _read_idx(images_path, 3, cls_name)
            labels = _read_idx(labels_path, 1, cls_name)
            if len(images) != len(labels):
                raise DataError(f"{labels_path} has {len(labels)} labels but {images_path} has "
                                f"{len(images)} images")
            bad = np.flatnonzero(labels > 9)
            if len(bad):
                raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is "
                                f"outside 0..9 ({len(bad)} such labels)")
            if parts and images.shape[1:] != parts[0][0].shape[1:]:
                raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images but "
                                f"{parts[0][2]} holds {parts[0][0].shape[1]}x{parts[0][0].shape[2]}")
            parts.append((images, labels, images_path))
        x = np.concatenate([p[0] for p in parts])  # uint8, read as k / 255 (unit)
        y = np.concatenate([p[1] for p in parts]).astype(np.int64)
        return x[:, None], y, None

    return load


def _download(cls_name: str, root: str, train: bool, paths: list[str]) -> None:
    """Have torchvision fetch ``cls_name``'s raw files unless ``paths`` all exist."""
    if all(os.path.isfile(p) for p in paths):
        return
    import torchvision

    try:
        getattr(torchvision.datasets, cls_name)(root, train=train, download=True)
    except (RuntimeError, OSError, AssertionError, TypeError, ValueError) as exc:
        # Files that arrived but that torchvision cannot parse are left to _read_idx to explain.
        if not all(os.path.isfile(p) for p in paths):
            detail = " ".join(str(exc).split())  # torchvision's report spans several lines
            raise DataError(f"{cls_name} download to {os.path.dirname(paths[0])} failed: "
                            f"{detail}") from None


def _svhn(root: str | None, split: str, download: bool) -> Loaded:
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
    x = np.concatenate([p[0] for p in parts])  # uint8
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return x, y, None


def _which(split: str) -> list[bool]:
    return {"train": [True], "test": [False], "all": [True, False]}[split]


def _int_option(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo or (
            hi is not None and value > hi):
        allowed = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise DataError(f"option {name} must be an integer {allowed}, got {value!r}")
    return int(value)


# Foreground colours: every one has a channel at 1, so max over channels of a coloured digit
# (black background) is exactly its grey intensity. The first 7 (RGB-cube corners) are >= 1 apart;
# orange, 0.5 from red and yellow, is added last so n_colors <= 7 stays maximally separated.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
}
# Backgrounds: the RGB-cube corners scaled to 0.4 (0.4 apart). No channel exceeds 0.4, so every
# foreground (a channel at 1) keeps a contrast of at least 0.6 on every background.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "grey": (0.4, 0.4, 0.4),
    "dark-red": (0.4, 0.0, 0.0),
    "dark-green": (0.0, 0.4, 0.0),
    "dark-blue": (0.0, 0.0, 0.4),
    "olive": (0.4, 0.4, 0.0),
    "purple": (0.4, 0.0, 0.4),
    "teal": (0.0, 0.4, 0.4),
}
COLOR_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)


def _colored(grey: Callable[..., Loaded], label: str) -> Callable[..., Loaded]:
    """Colour a grey dataset: pixel = g * palette[color] + (1 - g) * background[bg].

    Colours (and backgrounds) are drawn uniformly and independently of the class label from
    ``np.random.default_rng([color_seed, part])``, part 0 for train and 1 for test, so an image
    gets the same colour whether it is loaded through ``train``/``test`` or ``all`` and the
    global numpy/torch RNGs are neither used nor disturbed.
    """

    def load(root: str | None, split: str, download: bool, *, n_colors: int = 8,
             background: bool = False, n_backgrounds: int = 4, color_seed: int = 0) -> Loaded:
        n_colors = _int_option("n_colors", n_colors, 2, len(COLORS))
        n_backgrounds = _int_option("n_backgrounds", n_backgrounds, 2, len(BACKGROUNDS))
        color_seed = _int_option("color_seed", color_seed, 0)
        if not isinstance(background, bool | np.bool_):
            raise DataError(f"option background must be True or False, got {background!r}")
        xs, ys, colors, bgs = [], [], [], []
        for train in _which(split):
            g, y, _ = grey(root, "train" if train else "test", download)
            g = unit_array(g)
            rng = np.random.default_rng([color_seed, 0 if train else 1])
            color = rng.integers(n_colors, size=len(y))
            # Drawn after the colours, so turning backgrounds on leaves the colours unchanged.
            bg = rng.integers(n_backgrounds, size=len(y)) if background else np.zeros(len(y), np.int64)
            x = g * COLOR_PALETTE[color][:, :, None, None]
            if background:  # the black background adds nothing: skip a full-size temporary
                x += (1.0 - g) * BACKGROUND_PALETTE[bg][:, :, None, None]
            xs.append(x)
            ys.append(y)
            colors.append(color)
            bgs.append(bg)
        y = np.concatenate(ys)
        factors = {label: y, "color": np.concatenate(colors).astype(np.int64)}
        if background:
            factors["background"] = np.concatenate(bgs).astype(np.int64)
        return np.concatenate(xs), y, factors

    return load


SHAPES3D_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_URL = "https://storage.googleapis.com/3d-shapes/3dshapes.h5"
_H5_BLOCK = 4096  # images read from the HDF5 file at a time (50 MB of uint8)


def _shapes3d(root: str | None, split: str, download: bool, *, max_images: int | None = None,
              subsample_seed: int = 0) -> Loaded:
    """DeepMind's 3D Shapes: 480,000 RGB 64x64 images, 6 factors (``SHAPES3D_FACTORS``).

    ``root`` is the folder holding ``3dshapes.h5`` or the file itself. Each factor column is coded
    0..L-1 in increasing order of its value over the whole file, so codes agree across splits.
    ``train``/``test`` are a fixed 90/10 partition (a permutation seeded with 0); ``all`` keeps
    file order. ``max_images`` keeps a random subset of the split, drawn with ``subsample_seed``.
    ``y`` is the ``shape`` factor. All 480,000 images take 5.9 GB (uint8): use max_images.
    """
    if root is None:
        raise DataError("--data-root is required for 3dshapes (the folder holding 3dshapes.h5, or the file)")
    if max_images is not None:
        max_images = _int_option("max_images", max_images, 1)
    subsample_seed = _int_option("subsample_seed", subsample_seed, 0)
    path = root if os.path.isfile(root) else os.path.join(root, "3dshapes.h5")
    if not os.path.isfile(path):
        raise DataError(f"3dshapes not found at {path}: download {SHAPES3D_URL} there "
                        "(--download does not fetch it)")
    try:
        import h5py  # optional at import time: only this dataset needs it
    except ImportError:
        raise DataError("3dshapes needs h5py: pip install 'h5py>=3'") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} is not a readable HDF5 file ({exc})") from None
    with f:
        if "images" not in f or "labels" not in f:
            raise DataError(f"{path} lacks the 3dshapes datasets 'images' and 'labels' (has {list(f)})")
        images, labels = f["images"], f["labels"]
        n = images.shape[0]
        if (images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8
                or labels.shape != (n, len(SHAPES3D_FACTORS))):
            raise DataError(f"{path}: expected images uint8 (N, H, W, 3) and labels (N, 6), got "
                            f"{images.dtype} {images.shape} and {labels.shape}")
        if n == 0:
            raise DataError(f"{path} holds no images")
        values = np.asarray(labels[()], dtype=np.float64)
        # Rounded so values stored with float noise still fall on one code.
        codes = {name: np.unique(np.round(values[:, j], 6), return_inverse=True)[1].reshape(-1)
                 for j, name in enumerate(SHAPES3D_FACTORS)}
        if split == "all":
            idx = np.arange(n)
        else:
            perm = np.random.default_rng(0).permutation(n)
            cut = int(0.9 * n)
            idx = perm[:cut] if split == "train" else perm[cut:]
        if max_images is not None and max_images < len(idx):
            idx = np.random.default_rng(subsample_seed).choice(idx, max_images, replace=False)
        x = _read_rows(images, idx)
    factors = {name: c[idx].astype(np.int64) for name, c in codes.items()}
    return x, factors["shape"], factors


def _read_rows(images: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any order) of an HDF5 uint8 (N, H, W, 3) array as uint8 (n, 3, H, W).

    Reads in increasing file order, a block at a time, so memory stays at the output plus one
    block; a sparse block is read by index (h5py needs increasing indices), a dense one whole.
    """
    order = np.argsort(idx, kind="stable")
    rows = idx[order]
    out = np.empty((len(idx), 3, *images.shape[1:3]), dtype=np.uint8)
    lo = 0
    while lo < len(rows):
        start = int(rows[lo])
        hi = int(np.searchsorted(rows, start + _H5_BLOCK))
        stop = int(rows[hi - 1]) + 1
        if (hi - lo) * 16 < stop - start:
            block = images[rows[lo:hi]]
        else:
            block = images[start:stop][rows[lo:hi] - start]
        out[order[lo:hi]] = block.transpose(0, 3, 1, 2)
        lo = hi
    return out


SHAPES = ("square", "circle", "triangle", "cross")
SHAPES_FACTORS = ("shape", "color", "position", "scale")


def _shape_masks(shape: np.ndarray, cy: np.ndarray, cx: np.ndarray, r: np.ndarray,
                 size: int) -> np.ndarray:
    """Boolean masks (n, size, size) of each image's shape centred at (cy, cx), radius r."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    dy = grid[None, :, None] - cy[:, None, None]
    dx = grid[None, None, :] - cx[:, None, None]
    r = r[:, None, None]
    masks = {
        0: (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r),
        1: dy ** 2 + dx ** 2 <= r ** 2,
        2: (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2),
        3: ((np.abs(dy) <= r) & (np.abs(dx) <= r / 3)) | ((np.abs(dx) <= r) & (np.abs(dy) <= r / 3)),
    }
    return np.select([shape[:, None, None] == k for k in masks], list(masks.values()), False)


def _shapes(root: str | None, split: str, download: bool, *, n_images: int = 4000,
            size: int = 16, shapes_seed: int = 0) -> Loaded:
    """Procedural shapes, generated here (no files): RGB ``size`` x ``size`` images of one shape
    on black, with four independent, uniformly drawn factors (``SHAPES_FACTORS``): shape
    (``SHAPES``), colour (the first 4 ``COLORS``), position (the quadrant of its centre, 4) and
    scale (2 radii), plus a jitter of the centre by up to a pixel. ``train`` holds ``n_images``,
    ``test`` a quarter as many, drawn from ``default_rng([shapes_seed, part])``; ``all`` both.
    """
    n_images = _int_option("n_images", n_images, 1)
    size = _int_option("size", size, 12, 128)
    shapes_seed = _int_option("shapes_seed", shapes_seed, 0)
    xs, factor_parts = [], []
    for train in _which(split):
        n = n_images if train else max(1, n_images // 4)
        rng = np.random.default_rng([shapes_seed, 0 if train else 1])
        f = {name: rng.integers(k, size=n) for name, k in zip(
            SHAPES_FACTORS, (len(SHAPES), 4, 4, 2), strict=True)}
        jitter = rng.uniform(-1.0, 1.0, size=(2, n)).astype(np.float32)
        quarter = size / 4
        cy = (1 + 2 * (f["position"] // 2)) * quarter + jitter[0]
        cx = (1 + 2 * (f["position"] % 2)) * quarter + jitter[1]
        radius = np.where(f["scale"] == 1, 0.85, 0.55).astype(np.float32) * quarter
        mask = _shape_masks(f["shape"], cy, cx, radius, size).astype(np.float32)
        xs.append(mask[:, None] * COLOR_PALETTE[f["color"]][:, :, None, None])
        factor_parts.append(f)
    factors = {name: np.concatenate([f[name] for f in factor_parts]).astype(np.int64)
               for name in SHAPES_FACTORS}
    return np.concatenate(xs), factors["shape"], factors


_MNIST = _idx_dataset("MNIST", "MNIST")
_FASHION = _idx_dataset("FashionMNIST", "FashionMNIST")

DATASETS: dict[str, Callable[..., Loaded]] = {
    "digits": _digits,
    "mnist": _MNIST,
    "fashion-mnist": _FASHION,
    "svhn": _svhn,
    "colored-mnist": _colored(_MNIST, "digit"),
    "colored-fashion-mnist": _colored(_FASHION, "class"),
    "colored-digits": _colored(_digits, "digit"),
    "shapes": _shapes,
    "iris": _table("iris"),
    "wine": _table("wine"),
    "breast-cancer": _table("breast_cancer"),
    "3dshapes": _shapes3d,
    "file": load_file,
}
_FILE_ROOT = {"3dshapes", "file"}  # root may name the data file itself; the loader checks it
TABLES = ("iris", "wine", "breast-cancer")  # real-valued features (N, 1, 1, D), not images


def dataset_options(name: str) -> dict[str, Any]:
    """The keyword options a dataset accepts, with their defaults (empty for most)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    params = inspect.signature(DATASETS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def load_dataset(
    name: str,
    root: str | None = None,
    split: str = "all",
    download: bool = False,
    device: torch.device | str = "cpu",
    **options: Any,
) -> Dataset:
    """Load a named dataset as one tensor on ``device``. Raises :class:`DataError`.

    ``options`` are dataset-specific (see :func:`dataset_options`):

    * ``colored-mnist`` / ``colored-fashion-mnist`` (RGB, from the MNIST / FashionMNIST root):
      ``n_colors`` (2..8, default 8, taken in ``COLORS`` order), ``background`` (default False:
      black), ``n_backgrounds`` (2..8, default 4, ``BACKGROUNDS`` order), ``color_seed`` (default 0).
      ``y`` and ``factors["digit"]`` (``"class"`` for fashion) are the original labels;
      ``factors["color"]`` (and ``["background"]``) index the palettes.
    * ``colored-digits``: scikit-learn's 8x8 digits coloured like ``colored-mnist`` (same options).
    * ``shapes`` (generated, no root): ``n_images`` (default 4000 in train, a quarter in test),
      ``size`` (default 16), ``shapes_seed``; factors shape, color, position, scale.
    * ``iris``, ``wine``, ``breast-cancer``: scikit-learn's feature tables, standardised, as
      (N, 1, 1, D) vectors (``TABLES``; fit them with ``likelihood="gaussian"``).
    * ``file``: the user's own data at path ``root`` (:mod:`ppl_cluster.files`): ``image_size``,
      ``color``, ``label_columns``.
    * ``3dshapes``: ``max_images`` (default None: the whole split), ``subsample_seed`` (default 0);
      ``factors`` holds the six factors of ``SHAPES3D_FACTORS`` as integer codes, ``y`` is shape.
    """
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise DataError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; {takes}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if (root is not None and not download and name not in _FILE_ROOT
            and not os.path.isdir(root)):
        raise DataError(f"data root {root} does not exist (pass an existing folder, or --download)")
    x, y, factors = DATASETS[name](root, split, download, **options)
    origin = source(root) if name == "file" and root is not None else None
    return Dataset(name, split, as_images(x, unit_interval=name not in (*TABLES, "file")).to(device),
                   y, factors, origin)


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the data's units: uint8 pixels k as float32 k / 255 (the very floats a float32
    loader gives), any other tensor as it is. Called on a batch or chunk at a time, so that
    stored bytes never get a full float copy."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """``x`` in consecutive slices of ``size`` rows, each through :func:`unit`: how a whole
    data set is read when it may be stored as bytes."""
    for i in range(0, x.shape[0], size):
        yield unit(x[i : i + size])


def unit_array(a: np.ndarray) -> np.ndarray:
    """:func:`unit` for a numpy array (float32 k / 255 for uint8, else unchanged)."""
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a


def as_images(x: np.ndarray | torch.Tensor, *, unit_interval: bool = True) -> torch.Tensor:
    """Validate user data and return a tensor (N, C, H, W): uint8 as it is (pixels k / 255,
    :func:`unit`), any other number type as float32.

    Accepts (N, D) vectors (treated as 1 x 1 x D), (N, H, W) or (N, C, H, W) images.
    """
    if not isinstance(x, torch.Tensor):
        try:
            arr = np.asarray(x)
        except ValueError:  # ragged nested lists
            raise DataError("data must be a rectangular array (every row the same length)") from None
        if arr.dtype.kind not in "biuf":
            raise DataError(f"data must be numeric, got dtype {arr.dtype}")
        x = torch.from_numpy(np.array(arr, copy=not arr.flags.writeable))
    t = x
    if t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"data must be real numbers, got dtype {t.dtype}")
    if t.dtype != torch.uint8:
        t = t.float()
    if t.dim() == 2:
        t = t[:, None, None, :]
    elif t.dim() == 3:
        t = t[:, None]
    elif t.dim() != 4:
        raise DataError(f"data must have 2, 3 or 4 dimensions (N, ...), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise DataError(f"data is empty (shape {tuple(t.shape)})")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DataError("data contains NaN or infinite values")
    if unit_interval:
        check_unit_interval(t, "bernoulli")
    return t.contiguous()


def check_unit_interval(x: torch.Tensor, likelihood: str | None) -> None:
    """A Bernoulli likelihood needs values in [0, 1] (DataError otherwise; uint8 pixels k / 255
    always are)."""
    if likelihood == "bernoulli" and x.dtype != torch.uint8 and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"data must lie in [0, 1] for a Bernoulli likelihood (found [{x.min():.3g}, {x.max():.3g}]); "
            "rescale it or use likelihood='gaussian'"
        )


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


def load_run_dataset(cfg: Any, dataset: str | None = None, root: str | None = None,
                     split: str | None = None, download: bool = False,
                     device: torch.device | str = "cpu",
                     options: dict[str, Any] | None = None) -> Dataset:
    """The data set of a run's configuration ``cfg`` (a FitConfig), or the one named by
    ``dataset``/``root``/``split``; the run's dataset options (``cfg.data_options``) apply
    whenever the data set is of the run's kind, with ``options`` over them."""
    name = dataset or cfg.dataset
    given = {**(cfg.data_options if name == cfg.dataset else {}), **(options or {})}
    return load_dataset(name, root or cfg.data_root, split or cfg.split, download, device,
                        **given)
