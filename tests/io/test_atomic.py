"""Atomic writes: the usual modes once in place, nothing half-written or left behind on error."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from multitoken.io.atomic import (
    atomic_folder,
    atomic_path,
    umask,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


@pytest.fixture
def mask_022():
    before = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_reads_without_changing_it(mask_022):
    assert umask() == 0o022 and umask() == 0o022


def test_files_replace_the_old_one_with_the_usual_mode(tmp_path, mask_022):
    path = tmp_path / "f.json"
    path.write_text("old")
    write_json_atomic(path, {"ü": 1}, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{\n  "ü": 1\n}\n'
    assert mode(path) == 0o644  # not mkstemp's 0600
    write_text_atomic(path, "text")
    write_bytes_atomic(tmp_path / "b", b"\x00\x01")
    assert path.read_text() == "text" and (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, mask_022):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})  # fails before anything is written
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_writer_that_wants_a_name_gets_a_hidden_temporary(tmp_path, mask_022):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.")
        assert tmp.name.endswith(".tmp")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png" and mode(tmp_path / "plot.png") == 0o644


def test_folders_appear_whole_with_the_usual_mode(tmp_path, mask_022):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1" and mode(out) == 0o755  # not mkdtemp's 0700
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_folder_replaces_an_empty_one_and_only_with_replace_a_full_one(tmp_path, mask_022):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_folder(out) as tmp:  # an empty folder there is taken over
        (tmp / "new").write_text("1")
    with pytest.raises(OSError), atomic_folder(out) as tmp:  # a full one is not
        (tmp / "newer").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new"]
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "newer").write_text("2")
    assert [p.name for p in out.iterdir()] == ["newer"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_folder_is_removed_and_the_old_one_kept(tmp_path, mask_022):
    out = tmp_path / "step"
    out.mkdir()
    (out / "old").write_text("0")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out, replace=True) as tmp:
        (tmp / "half").write_text("1")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["step"]
    assert json.loads((out / "old").read_text()) == 0
