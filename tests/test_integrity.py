"""Integrity of what a run writes (issue 20): checkpoints carry a digest of their contents,
JSON files are strictly valid (no NaN), and files get the mode the umask asks for."""

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_cluster import checkpoint as ckpt
from ppl_cluster.cli import main
from ppl_cluster.errors import CheckpointError
from ppl_cluster.report import write_json

TINY = ["--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "256", "--init", "gmm", "--quiet"]
MARK = 1234.5678  # a value whose float64 bytes occur nowhere else in the file


def _state() -> dict:
    return {"model": OrderedDict(w=torch.arange(12, dtype=torch.float32).reshape(3, 4),
                                 mark=torch.full((64,), MARK, dtype=torch.float64)),
            "epoch": 3, "seconds": 1.25, "initialized": True, "note": None,
            "history": {"train": [1.0, float("nan")], "pretrain": []},
            "shape": (1, 8, 8), "rng": {"torch": torch.get_rng_state()}}


def _flip_inside(path: Path, pattern: bytes) -> None:
    """Flip one byte in the middle of the only occurrence of ``pattern`` in ``path``."""
    data = bytearray(path.read_bytes())
    at = data.find(pattern)
    assert at >= 0 and data.find(pattern, at + 1) < 0, "pattern not found exactly once"
    data[at + len(pattern) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# -- checkpoint digest --------------------------------------------------------------------

def test_a_checkpoint_round_trips_without_its_digest_key(tmp_path):
    path = tmp_path / "c.pt"
    state = _state()
    ckpt.save(str(path), state)
    raw = torch.load(path, weights_only=True)  # still a plain weights-only checkpoint
    assert raw["format"] == ckpt.FORMAT and raw[ckpt.DIGEST] == ckpt.digest(
        {"format": ckpt.FORMAT, **state})
    back = ckpt.load(str(path))
    assert ckpt.DIGEST not in back and list(back) == ["format", *state]
    assert ckpt.digest(back) == ckpt.digest({"format": ckpt.FORMAT, **state})
    # A loaded state saves and loads again (callers re-save what they loaded).
    ckpt.save(str(path), back)
    assert ckpt.digest(ckpt.load(str(path))) == ckpt.digest(back)


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save(str(path), _state())
    _flip_inside(path, struct.pack("<d", MARK) * 64)
    torch.load(path, weights_only=True)  # the damage is invisible to torch itself
    with pytest.raises(CheckpointError) as err:
        ckpt.load(str(path))
    assert str(err.value) == (f"{path} is corrupt: its contents do not match the checksum "
                              "saved with them")


def test_a_changed_value_under_the_saved_digest_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save(str(path), _state())
    raw = torch.load(path, weights_only=True)
    raw["epoch"] = 4
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        ckpt.load(str(path))


def test_the_digest_covers_every_value_and_its_type(tmp_path):
    base = ckpt.digest(_state())
    assert ckpt.digest(_state()) == base
    for change in ({"epoch": 4}, {"epoch": 3.0}, {"initialized": 1}, {"note": "None"},
                   {"seconds": 1.2500000001}, {"shape": [1, 8, 8]}, {"history": {}},
                   {"model": OrderedDict(w=torch.zeros(3, 4))}):
        assert ckpt.digest({**_state(), **change}) != base, change
    t = torch.arange(6, dtype=torch.float32)
    assert ckpt.digest(t) != ckpt.digest(t.reshape(2, 3)) != ckpt.digest(t.to(torch.int32))
    assert ckpt.digest(t.reshape(2, 3).t()) == ckpt.digest(t.reshape(2, 3).t().contiguous())
    assert ckpt.digest({"a": 1, "b": 2}) != ckpt.digest({"b": 2, "a": 1})  # order is kept
    with pytest.raises(TypeError):
        ckpt.digest({"x": object()})
    with pytest.raises(TypeError):
        ckpt.save(str(tmp_path / "x.pt"), {"x": np.float64(1.0)})
    assert not (tmp_path / "x.pt").exists()


def test_a_checkpoint_without_a_digest_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": ckpt.FORMAT, "epoch": 2, "w": torch.ones(3)}, path)  # as before
    back = ckpt.load(str(path))
    assert back["epoch"] == 2 and torch.equal(back["w"], torch.ones(3))


def test_a_corrupt_run_checkpoint_fails_evaluate_with_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["fit", "--out", str(run), *TINY]) == 0
    for name in ("metrics.json", "config.json"):
        _strict_json(run / name)
    path = run / "checkpoint.pt"
    weights = max(ckpt.load(str(path))["model"].values(), key=torch.Tensor.numel)
    raw = weights.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    _flip_inside(path, raw[len(raw) // 2:len(raw) // 2 + 64])
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and "checkpoint.pt" in err[0], err


# -- JSON ---------------------------------------------------------------------------------

def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    path = tmp_path / "m.json"
    write_json(str(path), {"elbo": float("nan"), "acc": 0.5,
                           "history": [np.float32("inf"), -np.inf, np.float64(2.0), 1],
                           "nested": {"x": (np.nan, np.int64(3)), "ok": np.float32(0.25)},
                           "name": "vade", "none": None, "flag": np.bool_(True)})
    assert path.read_text().endswith("}\n")
    assert _strict_json(path) == {"elbo": None, "acc": 0.5, "history": [None, None, 2.0, 1],
                                  "nested": {"x": [None, 3], "ok": 0.25},
                                  "name": "vade", "none": None, "flag": True}


# -- file modes and leftover temporary files ----------------------------------------------

@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, monkeypatch, umask, mode):
    monkeypatch.setattr(ckpt, "_IMPORT_UMASK", umask)  # where /proc cannot tell the umask
    old = os.umask(umask)
    try:
        ckpt.atomic_write_bytes(str(tmp_path / "a.bin"), b"x")
        ckpt.save(str(tmp_path / "c.pt"), {"w": torch.ones(2)})
        write_json(str(tmp_path / "m.json"), {"a": 1})
        assert ckpt.current_umask() == umask
    finally:
        os.umask(old)
    for name in ("a.bin", "c.pt", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert ckpt.remove_stale_temps(str(tmp_path)) == []


def test_remove_stale_temps_deletes_only_this_folders_temporary_files(tmp_path):
    for name in (".tmp-abc123checkpoint.pt", ".tmp-x", "keep.json", ".tmpfoo", "tmp-y"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-nested").write_bytes(b"")
    assert ckpt.remove_stale_temps(str(tmp_path)) == [".tmp-abc123checkpoint.pt", ".tmp-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-dir", ".tmpfoo", "keep.json",
                                                          "sub", "tmp-y"]
    assert (tmp_path / "sub" / ".tmp-nested").exists()
    assert ckpt.remove_stale_temps(str(tmp_path)) == []
    assert ckpt.remove_stale_temps(str(tmp_path / "missing")) == []
