"""Atomic files and directories: a reader sees the old content or the new, a failed write leaves nothing behind."""

import numpy as np
import pytest

from llmcf.files import staged_directory, staged_file, write_atomically


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state" / "position.json"
    write_atomically(path, '{"published": 1}')
    write_atomically(path, b'{"published": 2}')
    assert path.read_text() == '{"published": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["position.json"]


def test_a_failed_write_keeps_the_old_file_and_no_staging(tmp_path):
    path = tmp_path / "position.json"
    write_atomically(path, "old")
    with pytest.raises(RuntimeError), staged_file(path) as staging:
        staging.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["position.json"]


def test_the_staging_name_keeps_the_suffix_so_numpy_writes_there(tmp_path):
    path = tmp_path / "rows.npz"
    with staged_file(path) as staging:
        np.savez(staging, a=np.arange(3))
    assert np.load(path)["a"].tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == ["rows.npz"]


def test_a_directory_is_renamed_into_place(tmp_path):
    target = tmp_path / "models" / "v1"
    with staged_directory(target, complete=lambda d: (d / "model.onnx").is_file()) as staging:
        (staging / "model.onnx").write_bytes(b"onnx")
    assert (target / "model.onnx").read_bytes() == b"onnx" and [p.name for p in target.parent.iterdir()] == ["v1"]


def test_a_complete_directory_another_process_wrote_first_is_kept(tmp_path):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "model.onnx").write_bytes(b"first")
    (target / "more").write_bytes(b"non-empty, so a rename over it fails")
    with staged_directory(target, complete=lambda d: (d / "model.onnx").is_file()) as staging:
        (staging / "model.onnx").write_bytes(b"second")
    assert (target / "model.onnx").read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_an_incomplete_directory_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "partial").write_bytes(b"x")
    with pytest.raises(OSError), staged_directory(target, complete=lambda d: (d / "model.onnx").is_file()) as staging:
        (staging / "model.onnx").write_bytes(b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
