import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_cluster.cli import main
from ppl_cluster.data import as_images, load_dataset, unit
from ppl_cluster.errors import DataError


def test_digits_is_one_unit_interval_tensor(digits):
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == torch.float32
    assert 0 <= float(digits.x.min()) and float(digits.x.max()) <= 1
    assert digits.y is not None and sorted(set(digits.y.tolist())) == list(range(10))


def test_digits_splits_partition_the_data():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797


def test_mnist_subset(mnist_root):
    ds = load_dataset("mnist", mnist_root, "all")
    assert ds.x.shape == (10000, 1, 28, 28)
    assert len(load_dataset("mnist", mnist_root, "test")) == 2000
    assert ds.x.dtype == torch.uint8  # pixels k / 255, stored as bytes
    assert np.bincount(ds.y).min() > 700


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "svhn"])
def test_missing_files_name_the_expected_path(tmp_path, name):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset(name, str(tmp_path))


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar-1000")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", split="valid")


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 3), np.nan), "NaN"),
    (np.full((4, 3), 2.0), r"\[0, 1\]"),
    (np.zeros((0, 3)), "empty"),
    (np.zeros(5), "dimensions"),
    (np.array([["a"]]), "numeric"),
])
def test_bad_arrays_are_refused(bad, message):
    with pytest.raises(DataError, match=message):
        as_images(bad)


def test_real_valued_data_allowed_for_gaussian():
    x = as_images(np.linspace(-3, 3, 12).reshape(4, 3), unit_interval=False)
    assert x.shape == (4, 1, 1, 3)


def _write_idx(path: Path, data: np.ndarray, magic: bytes | None = None) -> Path:
    """``data`` (uint8) as an IDX file: magic 00 00 08 ndim, big-endian int32 dims, the bytes."""
    magic = bytes([0, 0, 0x08, data.ndim]) if magic is None else magic
    path.write_bytes(magic + np.asarray(data.shape, ">i4").tobytes() + data.astype(np.uint8).tobytes())
    return path


def _mnist_folder(root: Path, folder: str = "MNIST", n_train: int = 6, n_test: int = 4,
                  size: tuple[int, int] = (7, 5)) -> dict[str, Path]:
    """Small random IDX files under ``root/folder/raw/`` (not 28x28); their paths by role."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        paths[f"{prefix}-images"] = _write_idx(raw / f"{prefix}-images-idx3-ubyte",
                                               rng.integers(0, 256, (n, *size)))
        paths[f"{prefix}-labels"] = _write_idx(raw / f"{prefix}-labels-idx1-ubyte",
                                               rng.integers(0, 10, n))
    return paths


def _refusal(root: Path, name: str = "mnist", split: str = "all") -> str:
    with pytest.raises(DataError) as info:
        load_dataset(name, str(root), split)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_files_of_any_image_size_load_exactly(tmp_path, name, folder):
    paths = _mnist_folder(tmp_path, folder)

    def raw(key: str) -> np.ndarray:
        data = paths[key].read_bytes()
        return np.frombuffer(data, np.uint8, offset=16 if "images" in key else 8)

    ds = load_dataset(name, str(tmp_path), "all")
    images = np.concatenate([raw("train-images"), raw("t10k-images")]).reshape(10, 1, 7, 5)
    assert ds.x.shape == (10, 1, 7, 5) and ds.x.dtype == torch.uint8
    assert torch.equal(unit(ds.x), torch.from_numpy(images.astype(np.float32) / 255.0))
    assert ds.y.dtype == np.int64
    assert ds.y.tolist() == [*raw("train-labels"), *raw("t10k-labels")]
    assert len(load_dataset(name, str(tmp_path), "test")) == 4


def test_label_count_differing_from_image_count_is_refused(tmp_path):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["train-labels"], np.zeros(5))
    message = _refusal(tmp_path)
    assert re.search(r"\b5 labels\b", message) and re.search(r"\b6 images\b", message)
    assert str(paths["train-labels"]) in message and str(paths["train-images"]) in message


def test_cli_refuses_label_count_mismatch_before_training(tmp_path, capsys):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["t10k-labels"], np.zeros(3))
    run = tmp_path / "run"
    assert main(["fit", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(run),
                 "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "3 labels" in err and "4 images" in err
    assert not run.exists() or not any(run.iterdir())


def test_garbage_magic_is_blamed_on_the_images_file(tmp_path):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["train-images"], np.zeros((6, 7, 5)), magic=b"\x12\x34\x56\x78")
    message = _refusal(tmp_path)
    assert str(paths["train-images"]) in message and "12 34 56 78" in message
    assert "labels" not in message


@pytest.mark.parametrize("magic", [bytes([0, 0, 0x0D, 3]), bytes([0, 0, 0x08, 1])])
def test_wrong_type_or_rank_in_the_header_is_refused(tmp_path, magic):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["t10k-images"], np.zeros((4, 7, 5)), magic=magic)
    message = _refusal(tmp_path)
    assert str(paths["t10k-images"]) in message and "expected 00 00 08 03" in message


@pytest.mark.parametrize("cut, word", [(-1, "truncated"), (-35, "truncated"), (3, "too long")])
def test_truncated_or_overlong_file_gives_the_byte_counts(tmp_path, cut, word):
    paths = _mnist_folder(tmp_path)
    data = paths["train-images"].read_bytes()  # 16 + 6 * 7 * 5 = 226 bytes
    paths["train-images"].write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    message = _refusal(tmp_path)
    assert str(paths["train-images"]) in message and word in message
    assert f"{226 + cut} bytes, expected 226" in message and "not found" not in message


def test_file_shorter_than_its_header_is_truncated_not_missing(tmp_path):
    paths = _mnist_folder(tmp_path)
    paths["train-images"].write_bytes(b"\x00\x00\x08")
    message = _refusal(tmp_path)
    assert str(paths["train-images"]) in message and "truncated: 3 bytes" in message


def test_zero_dimension_is_refused(tmp_path):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["train-images"], np.zeros((6, 0, 5)))
    assert "positive" in _refusal(tmp_path)


@pytest.mark.parametrize("bad", ["magic", "value", "truncated"])
def test_bad_labels_file_is_blamed_on_the_labels_file(tmp_path, bad):
    paths = _mnist_folder(tmp_path)
    labels = paths["train-labels"]
    if bad == "magic":
        _write_idx(labels, np.zeros((6, 1)))  # two dimensions: an images-like header
    elif bad == "value":
        _write_idx(labels, np.array([0, 1, 2, 10, 4, 5]))
    else:
        labels.write_bytes(labels.read_bytes()[:-2])
    message = _refusal(tmp_path)
    assert str(labels) in message and str(paths["train-images"]) not in message
    if bad == "value":
        assert "label 10 at index 3" in message and "0..9" in message


def test_image_sizes_must_agree_between_train_and_test(tmp_path):
    paths = _mnist_folder(tmp_path)
    _write_idx(paths["t10k-images"], np.zeros((4, 5, 5)))
    message = _refusal(tmp_path)
    assert str(paths["t10k-images"]) in message and str(paths["train-images"]) in message
    assert len(load_dataset("mnist", str(tmp_path), "test")) == 4  # each part alone is fine


@pytest.mark.parametrize("missing", ["folder", "t10k-labels"])
def test_missing_folder_or_file_says_not_found(tmp_path, missing):
    paths = _mnist_folder(tmp_path / "data")
    if missing == "folder":
        expected = tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
        message = _refusal(tmp_path / "data", "fashion-mnist")
    else:
        expected = paths[missing]
        expected.unlink()
        message = _refusal(tmp_path / "data")
    assert f"not found at {expected}" in message and "--download" in message


def test_download_only_fetches_missing_files_and_fails_in_one_line(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def offline(root, train, download):
        calls.append(train)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried a mirror, got: offline")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    _mnist_folder(tmp_path)
    assert len(load_dataset("mnist", str(tmp_path), "all", download=True)) == 10
    assert calls == []  # the files are there: nothing to fetch
    with pytest.raises(DataError, match="download to .* failed: Error downloading .* offline$") as info:
        load_dataset("mnist", str(tmp_path / "empty"), "train", download=True)
    assert "\n" not in str(info.value) and calls == [True]
