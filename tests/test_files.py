"""The user's own data: loaders for arrays, image folders and tables, feature vectors with a
Gaussian likelihood on standardised features, predictions written to files."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_wine

from ppl_cluster import Clusterer
from ppl_cluster.cli import main
from ppl_cluster.data import load_dataset, unit
from ppl_cluster.errors import ConfigError, DataError

TINY = ["--hidden", "16,16", "--latent-dim", "3", "--pretrain-epochs", "1", "--epochs", "2",
        "--init", "gmm", "--gmm-inits", "1", "--quiet"]


def _wine_csv(path, label=True):
    w = load_wine()
    frame = pd.DataFrame(w.data, columns=w.feature_names)
    if label:
        frame["cultivar"] = np.array(["barolo", "grignolino", "barbera"])[w.target]
    frame.to_csv(path, index=False)
    return w


def _image_folder(root, n=12, size=(6, 6), colour=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        label = ["a", "b", "c"][i % 3]
        os.makedirs(root / label, exist_ok=True)
        shape = (*size, 3) if colour else size
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / label / f"{i}.png")


# -- loaders -----------------------------------------------------------------------------------

def test_npy_uint8_images_are_scaled_and_float_vectors_kept(tmp_path):
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    np.save(tmp_path / "img.npy", img)
    ds = load_dataset("file", str(tmp_path / "img.npy"))
    assert ds.x.shape == (2, 1, 3, 4) and ds.y is None
    assert ds.x.dtype == torch.uint8 and torch.equal(ds.x[0, 0], torch.as_tensor(img[0]))  # k / 255
    assert torch.allclose(unit(ds.x)[0, 0], torch.as_tensor(img[0] / 255.0, dtype=torch.float32))
    vec = np.array([[1.5, -2.0, 3.0], [0.0, 4.0, -1.0]], dtype=np.float64)
    np.save(tmp_path / "vec.npy", vec)
    ds = load_dataset("file", str(tmp_path / "vec.npy"))
    assert ds.x.shape == (2, 1, 1, 3) and torch.equal(ds.x[:, 0, 0], torch.as_tensor(vec).float())


def test_npz_labels_are_factors_and_a_wrong_count_is_refused(tmp_path):
    x = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    y, colour = np.array([0, 1, 2, 0, 1, 2]), np.array([5, 5, 7, 7, 9, 9])
    np.savez(tmp_path / "d.npz", x=x, y=y, colour=colour)
    ds = load_dataset("file", str(tmp_path / "d.npz"))
    assert ds.x.shape == (6, 1, 1, 4)
    assert ds.y.tolist() == y.tolist()
    assert ds.factors["colour"].tolist() == [0, 0, 1, 1, 2, 2]  # codes of 5, 7, 9
    np.savez(tmp_path / "bad.npz", x=x, y=y[:5])
    with pytest.raises(DataError, match="label array 'y' has 5 entries for 6"):
        load_dataset("file", str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(DataError, match="name the data array x"):
        load_dataset("file", str(tmp_path / "two.npz"))


def test_image_folder_subfolders_are_labels_and_sizes_must_agree(tmp_path):
    _image_folder(tmp_path / "imgs")
    ds = load_dataset("file", str(tmp_path / "imgs"))
    assert ds.x.shape == (12, 1, 6, 6)  # grey PNGs stay one channel
    assert ds.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # a, b, c in sorted order
    assert ds.x.dtype == torch.uint8  # PNG pixels stay bytes
    Image.fromarray(np.zeros((9, 7), np.uint8)).save(tmp_path / "imgs" / "a" / "odd.png")
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_dataset("file", str(tmp_path / "imgs"))
    ds = load_dataset("file", str(tmp_path / "imgs"), image_size=5, color="rgb")
    assert ds.x.shape == (13, 3, 5, 5)
    _image_folder(tmp_path / "rgb", n=3, colour=True)
    assert load_dataset("file", str(tmp_path / "rgb")).x.shape[1] == 3  # auto finds the colour
    with pytest.raises(DataError, match="holds no images"):
        os.makedirs(tmp_path / "empty")
        load_dataset("file", str(tmp_path / "empty"))


def test_csv_label_columns_and_a_bad_cell_named_by_row_and_column(tmp_path):
    w = _wine_csv(tmp_path / "wine.csv")
    ds = load_dataset("file", str(tmp_path / "wine.csv"), label_columns="cultivar")
    assert ds.x.shape == (178, 1, 1, 13)
    assert np.allclose(ds.x[:, 0, 0].numpy(), w.data, rtol=1e-6)
    # Codes of the sorted names: barbera 0, barolo 1, grignolino 2.
    assert ds.y.tolist() == [[1, 2, 0][t] for t in w.target]
    with pytest.raises(DataError, match="'barolo' is not a number"):
        load_dataset("file", str(tmp_path / "wine.csv"))  # the label column read as a feature
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n3\tx\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column 'b': 'x' is not a number"):
        load_dataset("file", str(tmp_path / "bad.tsv"))
    with pytest.raises(DataError, match="no column nope"):
        load_dataset("file", str(tmp_path / "wine.csv"), label_columns="nope")


def test_split_is_a_fixed_partition(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(50, dtype=np.float32)[:, None])
    train = load_dataset("file", str(tmp_path / "v.npy"), "train").x.flatten().tolist()
    test = load_dataset("file", str(tmp_path / "v.npy"), "test").x.flatten().tolist()
    assert len(train) == 40 and len(test) == 10 and sorted(train + test) == list(range(50))
    assert load_dataset("file", str(tmp_path / "v.npy"), "train").x.flatten().tolist() == train


# -- feature vectors -----------------------------------------------------------------------------

def test_vectors_get_a_gaussian_likelihood_on_standardised_features():
    w = load_wine()
    x = w.data * 100 + 7  # far from unit scale: only standardisation makes it tractable
    clu = Clusterer("vade", 3, hidden=[32, 32], latent_dim=4, pretrain_epochs=30, epochs=20,
                    init="gmm", seed=0).fit(x)
    cfg = clu.fitted.cfg
    assert cfg.likelihood == "gaussian" and cfg.standardize
    s = clu.fitted.info["standardize"]
    assert torch.allclose(s["mean"].flatten(), torch.as_tensor(x.mean(0)).float(), rtol=1e-5)
    assert torch.allclose(s["scale"].flatten(), torch.as_tensor(x.std(0)).float(), rtol=1e-4)
    # Samples come back in the user's units.
    assert abs(clu.sample(500).reshape(500, -1).mean(0) - x.mean(0)).max() < 0.5 * x.std(0).max()
    from ppl_cluster.metrics import cluster_accuracy

    assert cluster_accuracy(w.target, clu.predict(x)) > 0.85  # k-means on standardised: 0.966
    # Images keep the Bernoulli likelihood and their pixels.
    img = Clusterer("vade", 2, hidden=[16], latent_dim=2, pretrain_epochs=1, epochs=1,
                    init="gmm").fit(np.random.default_rng(0).random((20, 5, 5)))
    assert img.fitted.cfg.likelihood == "bernoulli" and not img.fitted.cfg.standardize
    assert "standardize" not in img.fitted.info
    with pytest.raises(ConfigError, match="standardize"):
        Clusterer("vade", 2, likelihood="bernoulli", standardize=True)


def test_standardisation_is_kept_in_the_run_and_applied_to_new_data(tmp_path):
    x = load_wine().data
    clu = Clusterer("vade", 3, hidden=[16], latent_dim=3, pretrain_epochs=2, epochs=2,
                    init="gmm").fit(x)
    clu.save(str(tmp_path / "m.pt"))
    again = Clusterer.load(str(tmp_path / "m.pt"))
    assert np.allclose(again.predict_proba(x), clu.predict_proba(x), atol=1e-6)
    assert np.allclose(again.embed(x[:5]), clu.embed(x[:5]), atol=1e-6)
    # Without the stored standardisation the same weights see other inputs.
    del again.fitted.info["standardize"]
    assert not np.allclose(again.embed(x[:5]), clu.embed(x[:5]), atol=1e-3)


def test_image_only_variants_refuse_vectors_in_one_line():
    x = load_wine().data
    with pytest.raises(ConfigError, match="labels the pixels of images"):
        Clusterer("cgm-pixel", 3, epochs=1).fit(x)
    with pytest.raises(ConfigError, match="pose affine poses images"):
        Clusterer("vc", 3, epochs=1, pose="affine").fit(x)


# -- the CLI: --data, predict, changed files ----------------------------------------------------

def test_fit_predict_and_evaluate_a_csv_from_the_cli(tmp_path, capsys):
    _wine_csv(tmp_path / "wine.csv")
    run = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "wine.csv"), "--label-columns", "cultivar",
                 "--n-clusters", "3", "--out", str(run), *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_samples"] == 178 and metrics["acc"] is not None
    source = json.loads((run / "data.json").read_text())
    assert source["path"] == str(tmp_path / "wine.csv") and len(source["sha256"]) == 64
    assert metrics["data"] == source
    config = json.loads((run / "config.json").read_text())
    assert config["likelihood"] == "gaussian" and config["standardize"] is True

    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), "--out", str(out), "--proba", "--embed"]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns[:3]) == ["row", "cluster", "probability"]
    assert {"p_0", "p_1", "p_2", "elbo", "z_0", "z_2"} <= set(frame.columns)
    clu = Clusterer.load(str(run / "checkpoint.pt"))
    x = load_dataset("file", str(tmp_path / "wine.csv"), label_columns="cultivar").x
    assert frame["cluster"].tolist() == clu.predict(x).tolist()
    assert np.allclose(frame[["p_0", "p_1", "p_2"]].sum(axis=1), 1, atol=1e-5)
    assert np.isfinite(frame["elbo"]).all()
    # The same bound as metrics.json's, from other draws (8 per point against 1).
    assert abs(frame["elbo"].mean() - metrics["elbo"]) < 0.05 * abs(metrics["elbo"])
    capsys.readouterr()
    assert main(["predict", str(run), "--out", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
    npz = tmp_path / "pred.npz"
    assert main(["predict", str(run), "--out", str(npz), "--no-elbo"]) == 0
    with np.load(npz) as f:
        assert f["cluster"].tolist() == frame["cluster"].tolist() and "elbo" not in f.files
    assert main(["predict", str(run), "--out", str(tmp_path / "p.txt")]) == 2

    # A changed file: evaluate warns, resume refuses.
    frame = pd.read_csv(tmp_path / "wine.csv")
    frame.iloc[0, 0] += 1
    frame.to_csv(tmp_path / "wine.csv", index=False)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert "changed since the run" in capsys.readouterr().err
    assert main(["fit", "--resume", "--out", str(run), "--quiet"]) == 2
    assert "--resume needs the same data" in capsys.readouterr().err


def test_fit_an_image_folder_and_bad_files_from_the_cli(tmp_path, capsys):
    _image_folder(tmp_path / "imgs", n=30, size=(8, 8))
    run = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "imgs"), "--image-size", "6", "--n-clusters",
                 "3", "--out", str(run), *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "file" and config["data_options"] == {"image_size": 6}
    assert config["likelihood"] == "bernoulli"
    assert main(["evaluate", str(run)]) == 0  # the run's own folder, resized the same way
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,oops\n")
    capsys.readouterr()
    for args, message in [(["--data", str(tmp_path / "bad.csv")], "column 'b': 'oops'"),
                          (["--data", str(tmp_path / "nope.npy")], "does not exist"),
                          (["--data", str(tmp_path / "imgs"), "--dataset", "digits"],
                           "replaces --dataset"),
                          (["--image-size", "4"], "applies only to --data")]:
        out = tmp_path / "never"
        assert main(["fit", *args, "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not out.exists()
