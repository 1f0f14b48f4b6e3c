import numpy as np
import pytest
import torch

from ppl_cluster.data import as_images, load_dataset
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
    assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1
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
