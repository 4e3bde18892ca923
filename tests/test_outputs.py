import json
import math

import numpy as np
import pytest

from lit_coupling.outputs import read_json, save_npy, stable_hash, write_json


def test_json_is_strict_and_plain(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(3), "z": math.nan})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1, 2], "z": None}


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    from lit_coupling.outputs import _atomic

    path = tmp_path / "m.npy"
    save_npy(path, np.eye(3))

    def killed_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic(path, killed_half_way)
    np.testing.assert_array_equal(np.load(path), np.eye(3))
    assert not list(tmp_path.glob(".*.tmp"))


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_read_back(tmp_path):
    write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert read_json(tmp_path / "x.json") == {"k": [1, 2]}
