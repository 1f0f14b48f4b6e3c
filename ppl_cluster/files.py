"""The user's own data from files: arrays (``.npy``/``.npz``), image folders, tables
(``.csv``/``.tsv``). Loaded as the data set ``file`` whose root is the path
(``load_dataset("file", PATH)``, ``ppl-cluster fit --data PATH``).

* ``.npy``: one array (N, D), (N, H, W) or (N, C, H, W); ``uint8`` is scaled to [0, 1].
* ``.npz``: the data array is ``x`` (or ``X``, ``data``, ``images``, ``features``, or the only
  array with two or more dimensions); every other integer array of length N is a label,
  used only to score (``y`` is the primary one).
* a folder of images (PNG, JPEG, ...): flat, or torchvision's ``ImageFolder`` layout whose
  sub-folder names become the labels; ``image_size`` resizes every image to a square;
  ``color`` is ``auto`` (RGB if any image has colour), ``grey`` or ``rgb``.
* ``.csv`` / ``.tsv``: a header row, numeric feature columns; ``label_columns`` (comma
  separated) are labels, not features. A non-numeric or empty feature cell is an error naming
  its row and column.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_DATA_NAMES = ("x", "X", "data", "images", "features")

# The type and help of each option of load_file (defaults in its signature); the CLI makes a
# flag of each (--image-size, ...).
OPTIONS: dict[str, tuple[type, str]] = {
    "image_size": (int, "image folders: resize every image to SIZE x SIZE pixels (default: "
                        "keep the size, which must then be the same for all)"),
    "color": (str, "image folders: auto (RGB if any image has colour), grey or rgb"),
    "label_columns": (str, "tables: comma-separated columns that are labels (used only to "
                           "score), not features"),
}


def load_file(root: str | None, split: str, download: bool, *, image_size: int | None = None,
              color: str = "auto", label_columns: str | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]:
    """The data at path ``root`` as (x, y, factors); ``train``/``test`` are a fixed, seeded
    80/20 partition (``all``: everything). DataError for anything unreadable."""
    if root is None:
        raise DataError("a file or folder is required (--data PATH)")
    if color not in ("auto", "grey", "rgb"):
        raise DataError(f"color must be auto, grey or rgb, got {color!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= 4096):
        raise DataError(f"image_size must be an integer in 1..4096, got {image_size!r}")
    path = root
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        x, labels = _folder(path, image_size, color)
    elif not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    elif suffix in (".npy", ".npz"):
        x, labels = _arrays(path, suffix)
    elif suffix in (".csv", ".tsv"):
        x, labels = _table(path, "\t" if suffix == ".tsv" else ",", label_columns)
    else:
        raise DataError(f"{path}: unknown kind of file (expected .npy, .npz, .csv, .tsv or a "
                        "folder of images)")
    if label_columns is not None and suffix not in (".csv", ".tsv"):
        raise DataError("label_columns applies to .csv/.tsv tables only")
    if x.shape[0] < 2:
        raise DataError(f"{path} holds {x.shape[0]} data point(s); at least 2 are needed")
    idx = split_index(x.shape[0], split)
    if idx is not None:
        idx = np.sort(idx)  # the file's own order within each part
        x, labels = x[idx], {k: v[idx] for k, v in labels.items()}
    y = labels.get("y", next(iter(labels.values()), None)) if labels else None
    factors = labels if len(labels) > 1 else None
    return x, y, factors


def split_index(n: int, split: str) -> np.ndarray | None:
    """The fixed, seeded 80/20 partition of ``n`` points without a split of their own: the
    indices of ``split`` (``train``/``test``), or None for ``all``."""
    if split == "all":
        return None
    idx = np.random.default_rng(0).permutation(n)
    cut = int(0.8 * n)
    return idx[:cut] if split == "train" else idx[cut:]


def _scaled(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a  # pixels k / 255, stored as bytes (data.unit)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{what} must be numeric, got dtype {a.dtype}")
    return a.astype(np.float32)


def _codes(values: np.ndarray, what: str) -> np.ndarray:
    """Labels as integer codes 0..L-1 (any hashable values; order of first sorting)."""
    if values.ndim != 1:
        raise DataError(f"{what} must be one label per data point (1-D), got shape {values.shape}")
    _, codes = np.unique(values.astype(str) if values.dtype == object else values,
                         return_inverse=True)
    return codes.astype(np.int64)


def _arrays(path: str, suffix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable NumPy file ({str(exc)[:120]})") from None
    if suffix == ".npy":
        return _scaled(np.asarray(loaded), path), {}
    with loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    name = next((n for n in _DATA_NAMES if n in arrays), None)
    if name is None:
        multi = [k for k, a in arrays.items() if a.ndim >= 2]
        if len(multi) != 1:
            raise DataError(f"{path}: name the data array x (found {', '.join(arrays) or 'none'})")
        name = multi[0]
    x = _scaled(arrays.pop(name), f"{path}[{name}]")
    labels = {}
    for key, a in arrays.items():
        if a.ndim == 1 and len(a) == len(x) and a.dtype.kind in "biu":
            labels[key] = _codes(a, f"{path}[{key}]")
        elif a.ndim == 1 and len(a) != len(x):
            raise DataError(f"{path}: label array {key!r} has {len(a)} entries for {len(x)} "
                            "data points")
    if "y" in labels:
        labels = {"y": labels.pop("y"), **labels}
    return x, labels


def _image_files(path: str) -> tuple[list[str], list[str] | None]:
    """Image paths (sorted) and, in the ImageFolder layout, each one's sub-folder name."""
    entries = sorted(os.listdir(path))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")]
    flat = [os.path.join(path, e) for e in entries if e.lower().endswith(IMAGE_SUFFIXES)]
    if subdirs and not flat:
        files, names = [], []
        for d in subdirs:
            for root, _, fs in sorted(os.walk(os.path.join(path, d))):
                for f in sorted(fs):
                    if f.lower().endswith(IMAGE_SUFFIXES):
                        files.append(os.path.join(root, f))
                        names.append(d)
        return files, names
    return flat, None


def _folder(path: str, image_size: int | None, color: str
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from PIL import Image, UnidentifiedImageError

    files, names = _image_files(path)
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f} is not a readable image ({str(exc)[:100]})") from None
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(rgb))
    sizes = {a.shape[:2] for a in images}
    if len(sizes) > 1:
        raise DataError(f"{path}: images of {len(sizes)} different sizes (e.g. "
                        f"{' and '.join('x'.join(map(str, s)) for s in sorted(sizes)[:2])}); "
                        "pass --image-size")
    x = np.stack(images).transpose(0, 3, 1, 2)  # (N, 3, H, W) uint8
    grey = bool((x[:, :1] == x).all()) if color == "auto" else color == "grey"
    if grey:
        x = np.round(x.astype(np.float32).mean(1, keepdims=True)).astype(np.uint8)
    labels = {"y": _codes(np.asarray(names), "folder names")} if names is not None else {}
    return x, labels  # uint8 pixels k / 255 (data.unit)


def _table(path: str, sep: str, label_columns: str | None
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable table ({str(exc).strip()[:120]})") from None
    wanted = [c.strip() for c in label_columns.split(",") if c.strip()] if label_columns else []
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)} (columns: "
                        f"{', '.join(map(str, frame.columns))})")
    features = [c for c in frame.columns if c not in wanted]
    if not features:
        raise DataError(f"{path} has no feature columns besides the labels")
    values = frame[features].apply(pd.to_numeric, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        cell = frame[features].iat[row, col]
        # Row numbers count data rows from 1 (the header is line 1 of the file).
        raise DataError(f"{path}: row {row + 1} (line {row + 2}), column {features[col]!r}: "
                        f"{cell!r} is not a number")
    labels = {c: _codes(frame[c].to_numpy(dtype=object), f"column {c!r}") for c in wanted}
    return values.to_numpy(dtype=np.float32), labels


def source(path: str) -> dict[str, Any]:
    """What identifies the data at ``path``: its absolute path, its size in bytes and a SHA-256
    of its contents (for a folder: of every file's relative path and bytes, in sorted order)."""
    h, size = hashlib.sha256(), 0
    if os.path.isdir(path):
        for root, dirs, fs in os.walk(path):
            dirs.sort()
            for f in sorted(fs):
                full = os.path.join(root, f)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                size += _hash_file(full, h)
    else:
        size = _hash_file(path, h)
    return {"path": os.path.abspath(path), "bytes": size, "sha256": h.hexdigest()}


def _hash_file(path: str, h: Any) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n
