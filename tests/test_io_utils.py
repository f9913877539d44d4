import os

import pytest

from bs_keras.io_utils import atomic_path


def _names(d):
    return sorted(os.listdir(d))


def test_atomic_path_renames_a_file_on_success(tmp_path):
    target = tmp_path / "last.weights.h5"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert tmp.endswith(".weights.h5") and ".tmp-" in tmp  # the extension is kept
        assert not os.path.exists(tmp)
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["last.weights.h5"]


def test_atomic_path_on_error_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["report.json"]


def test_atomic_path_replaces_a_directory(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "previous.txt").write_text("old")
    with atomic_path(target) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert _names(target) == ["new.txt"]
    assert _names(tmp_path) == ["export"]  # no temp or old directory left


def test_atomic_path_on_error_removes_a_temp_directory(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "previous.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            os.makedirs(os.path.join(tmp, "saved_model"))
            raise ValueError
    assert _names(target) == ["previous.txt"]
    assert _names(tmp_path) == ["export"]


def test_atomic_path_creates_a_new_file(tmp_path):
    with atomic_path(tmp_path / ".hidden") as tmp:
        assert os.path.basename(tmp).startswith(".hidden.tmp-")
        open(tmp, "w").close()
    assert _names(tmp_path) == [".hidden"]
