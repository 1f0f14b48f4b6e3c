"""Multi-factor datasets (colored MNIST, 3D Shapes) and per-facet scores."""

import json
import sys

import numpy as np
import pytest
import torch

from ppl_cluster import data as data_mod
from ppl_cluster.data import (
    BACKGROUND_PALETTE,
    COLOR_PALETTE,
    SHAPES3D_FACTORS,
    Dataset,
    dataset_options,
    load_dataset,
    unit,
)
from ppl_cluster.errors import DataError
from ppl_cluster.metrics import best_match, facet_table

# --------------------------------------------------------------------------- Dataset.factors


def test_dataset_positional_construction_and_to_carry_factors():
    x = torch.zeros(3, 1, 2, 2)
    plain = Dataset("d", "all", x, np.arange(3))  # the pre-factors signature still works
    assert plain.factors is None and plain.to("cpu").factors is None
    ds = Dataset("d", "all", x, np.arange(3), {"a": np.array([0, 1, 0])})
    assert ds.to("cpu").factors["a"].tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="factor 'a'"):
        Dataset("d", "all", x, None, {"a": np.zeros(2, int)})


# --------------------------------------------------------------------------- colored MNIST


@pytest.fixture(scope="module")
def colored(mnist_root):
    return load_dataset("colored-mnist", mnist_root)


@pytest.fixture(scope="module")
def grey(mnist_root):
    return load_dataset("mnist", mnist_root)


def test_colored_mnist_shapes_and_labels(colored, grey):
    assert colored.x.shape == (10000, 3, 28, 28) and colored.x.dtype == torch.float32
    assert 0 <= float(colored.x.min()) and float(colored.x.max()) <= 1
    assert set(colored.factors) == {"digit", "color"}
    np.testing.assert_array_equal(colored.factors["digit"], grey.y)
    np.testing.assert_array_equal(colored.y, grey.y)
    assert colored.factors["color"].dtype == np.int64
    assert sorted(set(colored.factors["color"].tolist())) == list(range(8))


def test_colored_mnist_keeps_the_grey_image(colored, grey):
    # Every foreground colour has a channel at 1 and the background is black, so the max over
    # channels is exactly the original grey intensity.
    torch.testing.assert_close(colored.x.amax(1), unit(grey.x)[:, 0], rtol=0, atol=1e-6)


def test_colored_mnist_brightest_pixels_show_the_claimed_colour(colored, grey):
    g = unit(grey.x)[:, 0].reshape(len(grey), -1)  # (N, P)
    rgb = colored.x.reshape(len(colored), 3, -1)  # (N, 3, P)
    bright = (g > 0.9).float()
    assert bright.sum(1).min() > 0
    mean_rgb = (rgb * bright[:, None]).sum(2) / bright.sum(1, keepdim=True)
    want = torch.from_numpy(COLOR_PALETTE[colored.factors["color"]])
    err = (mean_rgb - want).abs().amax(1)
    assert float(err.max()) < 0.1  # g > 0.9: at most 10% off the pure colour


def test_colored_mnist_is_seeded_and_independent_of_global_rng(mnist_root, colored):
    torch.manual_seed(123)
    np.random.seed(123)
    again = load_dataset("colored-mnist", mnist_root)
    np.testing.assert_array_equal(again.factors["color"], colored.factors["color"])
    assert torch.equal(again.x, colored.x)
    other = load_dataset("colored-mnist", mnist_root, color_seed=1)
    assert (other.factors["color"] != colored.factors["color"]).mean() > 0.8  # ~7/8 by chance


def test_colored_mnist_colour_is_independent_of_digit(colored):
    from ppl_cluster.metrics import scores

    digit, color = colored.factors["digit"], colored.factors["color"]
    counts = np.zeros((10, 8), int)
    np.add.at(counts, (digit, color), 1)
    assert counts.min() >= 80  # every digit in every colour (~125 expected)
    share = counts / counts.sum(1, keepdims=True)
    assert np.abs(share - 1 / 8).max() < 0.05
    assert scores(digit, color)["nmi"] < 0.01


def test_colored_mnist_splits_agree_with_all(mnist_root, colored):
    train = load_dataset("colored-mnist", mnist_root, "train")
    test = load_dataset("colored-mnist", mnist_root, "test")
    assert len(train) == 8000 and len(test) == 2000
    both = np.concatenate([train.factors["color"], test.factors["color"]])
    np.testing.assert_array_equal(both, colored.factors["color"])


def test_colored_mnist_with_backgrounds(mnist_root, colored, grey):
    ds = load_dataset("colored-mnist", mnist_root, "all", n_colors=6, background=True,
                      n_backgrounds=3)
    assert set(ds.factors) == {"digit", "color", "background"}
    assert sorted(set(ds.factors["color"].tolist())) == list(range(6))
    assert sorted(set(ds.factors["background"].tolist())) == list(range(3))
    g = unit(grey.x)[:, 0]
    fg = torch.from_numpy(COLOR_PALETTE[ds.factors["color"]])[:, :, None, None]
    bg = torch.from_numpy(BACKGROUND_PALETTE[ds.factors["background"]])[:, :, None, None]
    torch.testing.assert_close(ds.x, g[:, None] * fg + (1 - g[:, None]) * bg, rtol=0, atol=1e-6)
    # Backgrounds are drawn after the colours: the same seed gives the same colours with n_colors 8.
    with_bg = load_dataset("colored-mnist", mnist_root, background=True)
    np.testing.assert_array_equal(with_bg.factors["color"], colored.factors["color"])


@pytest.mark.parametrize("options, message", [
    ({"n_colour": 3}, "unknown option.*n_colour.*n_colors"),
    ({"n_colors": 1}, "n_colors must be an integer in 2..8"),
    ({"n_colors": 9}, "n_colors"),
    ({"n_colors": 2.5}, "n_colors"),
    ({"color_seed": -1}, "color_seed"),
    ({"background": "yes"}, "background must be True or False"),
])
def test_colored_mnist_bad_options(tmp_path, options, message):
    with pytest.raises(DataError, match=message):
        load_dataset("colored-mnist", str(tmp_path), **options)


def test_plain_datasets_take_no_options():
    assert dataset_options("mnist") == {}
    with pytest.raises(DataError, match="it takes none"):
        load_dataset("digits", n_colors=3)


@pytest.mark.parametrize("name, folder", [("colored-mnist", "MNIST"),
                                          ("colored-fashion-mnist", "FashionMNIST")])
def test_colored_missing_files_name_the_expected_path(tmp_path, name, folder):
    with pytest.raises(DataError, match=str(tmp_path / folder / "raw")):
        load_dataset(name, str(tmp_path))


# --------------------------------------------------------------------------- 3D Shapes

N_SHAPES = 50


def _write_3dshapes(path, n=N_SHAPES):
    """A tiny file in the published schema; image i carries i in its first pixel."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    grids = [np.linspace(0, 0.9, 10), np.linspace(0, 0.9, 10), np.linspace(0, 0.9, 10),
             np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30, 30, 15)]
    labels = np.stack([rng.choice(g, n) for g in grids], 1)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=labels)
    return images, labels


@pytest.fixture()
def shapes(tmp_path):
    images, labels = _write_3dshapes(tmp_path / "3dshapes.h5")
    return tmp_path, images, labels


def _ids(ds):
    return ds.x[:, 0, 0, 0].numpy().astype(int)  # the id is written into the first pixel


def test_3dshapes_loads_images_and_factor_codes(shapes):
    root, images, labels = shapes
    ds = load_dataset("3dshapes", str(root))
    assert ds.x.shape == (N_SHAPES, 3, 64, 64) and ds.x.dtype == torch.uint8  # as stored
    np.testing.assert_array_equal(ds.x.numpy(), images.transpose(0, 3, 1, 2))
    assert tuple(ds.factors) == SHAPES3D_FACTORS
    for j, name in enumerate(SHAPES3D_FACTORS):
        codes = ds.factors[name]
        assert codes.dtype == np.int64 and codes.min() == 0
        # Codes follow the sorted factor values.
        np.testing.assert_array_equal(np.unique(labels[:, j])[codes], labels[:, j])
    np.testing.assert_array_equal(ds.y, ds.factors["shape"])
    np.testing.assert_array_equal(ds.y, labels[:, 4].astype(int))


def test_3dshapes_root_may_be_the_file(shapes):
    root, images, _ = shapes
    ds = load_dataset("3dshapes", str(root / "3dshapes.h5"), split="test")
    assert len(ds) == 5


def test_3dshapes_splits_partition_and_codes_agree(shapes, monkeypatch):
    root, _, labels = shapes
    monkeypatch.setattr(data_mod, "_H5_BLOCK", 7)  # several blocks, dense and sparse reads
    train, test = (load_dataset("3dshapes", str(root), s) for s in ("train", "test"))
    assert len(train) == 45 and len(test) == 5
    ids = np.concatenate([_ids(train), _ids(test)])
    assert sorted(ids.tolist()) == list(range(N_SHAPES))
    full = load_dataset("3dshapes", str(root))
    for name in SHAPES3D_FACTORS:  # an image has the same codes whichever split it came from
        np.testing.assert_array_equal(train.factors[name], full.factors[name][_ids(train)])
        np.testing.assert_array_equal(test.factors[name], full.factors[name][_ids(test)])
    np.testing.assert_array_equal(_ids(load_dataset("3dshapes", str(root), "train")), _ids(train))


def test_3dshapes_subsample_is_seeded(shapes, monkeypatch):
    root, _, _ = shapes
    monkeypatch.setattr(data_mod, "_H5_BLOCK", 7)
    train_ids = set(_ids(load_dataset("3dshapes", str(root), "train")).tolist())
    a = load_dataset("3dshapes", str(root), "train", max_images=10)
    b = load_dataset("3dshapes", str(root), "train", max_images=10)
    c = load_dataset("3dshapes", str(root), "train", max_images=10, subsample_seed=1)
    assert len(a) == 10 and len(set(_ids(a).tolist())) == 10
    assert set(_ids(a).tolist()) <= train_ids
    np.testing.assert_array_equal(_ids(a), _ids(b))
    assert not np.array_equal(_ids(a), _ids(c))
    assert len(load_dataset("3dshapes", str(root), "test", max_images=1000)) == 5  # capped
    with pytest.raises(DataError, match="max_images"):
        load_dataset("3dshapes", str(root), max_images=0)


@pytest.mark.parametrize("block", [1, 7, 1000])
@pytest.mark.parametrize("idx", [[3, 45], [45, 3, 4, 5, 6, 7, 8, 0], list(range(49, -1, -1))])
def test_read_rows_any_order_sparse_or_dense(shapes, monkeypatch, block, idx):
    # [3, 45] in one block is read by index (sparse), the others by slices (dense).
    h5py = pytest.importorskip("h5py")
    root, images, _ = shapes
    monkeypatch.setattr(data_mod, "_H5_BLOCK", block)
    with h5py.File(root / "3dshapes.h5", "r") as f:
        out = data_mod._read_rows(f["images"], np.array(idx))
    np.testing.assert_array_equal(out, images[idx].transpose(0, 3, 1, 2))


def test_3dshapes_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "3dshapes.h5")):
        load_dataset("3dshapes", str(tmp_path))
    with pytest.raises(DataError, match="--data-root is required"):
        load_dataset("3dshapes")


def test_3dshapes_bad_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "3dshapes.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5"):
        load_dataset("3dshapes", str(tmp_path))
    with h5py.File(tmp_path / "3dshapes.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((4, 8, 8, 3), np.uint8))
        f.create_dataset("labels", data=np.zeros((4, 5)))
    with pytest.raises(DataError, match=r"labels \(N, 6\)"):
        load_dataset("3dshapes", str(tmp_path))


def test_3dshapes_without_h5py(shapes, monkeypatch):
    root, _, _ = shapes
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(DataError, match="pip install 'h5py>=3'"):
        load_dataset("3dshapes", str(root))


# --------------------------------------------------------------------------- facet scores


def test_facet_table_hand_worked():
    digit = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    color = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    facets = [
        np.array([5, 5, 3, 3, 9, 9, 5, 3]),  # digit relabelled
        (1 - color) * 7,  # colour relabelled, labels 7 and 0
    ]
    table = facet_table(facets, {"digit": digit, "color": color})
    assert [row["k"] for row in table] == [3, 2] and [row["k_used"] for row in table] == [3, 2]
    d0, d1 = table[0]["scores"], table[1]["scores"]
    assert d0["digit"]["acc"] == 1.0 and d0["digit"]["nmi"] == pytest.approx(1.0)
    assert d0["digit"]["ari"] == pytest.approx(1.0)
    assert d1["color"]["acc"] == 1.0 and d1["color"]["nmi"] == pytest.approx(1.0)
    # Facet 0 vs colour: contingency (digit x colour) [[1,2],[2,1],[1,1]] -> best match 2+2 of 8.
    assert d0["color"]["acc"] == pytest.approx(0.5)
    best = best_match(table)
    assert best["digit"]["facet"] == 0 and best["color"]["facet"] == 1
    assert best["color"] == {"facet": 1, **d1["color"]}
    json.dumps({"table": table, "best": best})  # plain ints/floats only
    assert all(type(v) is float for row in table for s in row["scores"].values() for v in s.values())


def test_facet_table_given_k_and_independent_facet():
    rng = np.random.default_rng(0)
    factor = rng.integers(0, 10, 20000)
    noise = rng.integers(0, 4, 20000)
    table = facet_table([noise], {"f": factor}, n_clusters=[6])
    assert table[0]["k"] == 6 and table[0]["k_used"] == 4  # K asked for vs clusters used
    assert table[0]["scores"]["f"]["nmi"] < 0.005
    assert abs(table[0]["scores"]["f"]["ari"]) < 0.005


def test_facet_table_ties_and_errors():
    y = np.array([0, 0, 1, 1])
    table = facet_table([y, y + 1], {"y": y})
    assert best_match(table)["y"]["facet"] == 0  # a tie goes to the first facet
    with pytest.raises(ValueError):
        facet_table([], {"y": y})
    with pytest.raises(ValueError):
        facet_table([y], {"y": y}, n_clusters=[2, 2])
    with pytest.raises(ValueError):
        facet_table([y[:3]], {"y": y})


def test_dataset_options_from_the_cli_travel_with_the_run(mnist_root, tmp_path, capsys):
    from ppl_cluster.cli import main
    from ppl_cluster.config import FitConfig
    from ppl_cluster.data import load_run_dataset

    out = tmp_path / "run"
    args = ["fit", "--dataset", "colored-mnist", "--data-root", mnist_root, "--split", "test",
            "--data-option", "n_colors=3", "--data-option", "color_seed=2", "--hidden", "16",
            "--latent-dim", "2", "--n-clusters", "3", "--pretrain-epochs", "1", "--epochs", "1",
            "--init", "gmm", "--gmm-inits", "1", "--batch-size", "500", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    cfg = FitConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.data_options == {"n_colors": 3, "color_seed": 2}
    ds = load_run_dataset(cfg)
    assert set(np.unique(ds.factors["color"])) == {0, 1, 2}
    # evaluate reads the run's own colours back; a resume with other options is refused.
    assert main(["evaluate", str(out)]) == 0
    m = json.loads((out / "eval-colored-mnist-test.json").read_text())
    assert {f["k"] for f in m["facets"]} == {3}
    capsys.readouterr()
    assert main(["fit", "--data-option", "n_colors=4", "--resume", "--out", str(out)]) == 2
    assert "differs from the run" in capsys.readouterr().err
    assert main(["fit", "--dataset", "colored-mnist", "--data-root", mnist_root,
                 "--data-option", "n_colours=3", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown option(s) n_colours" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
