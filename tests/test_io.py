import pytest

from esd_lora.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new cont")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_folder_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a").write_text("x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "b").write_text("y")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_json(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'


def test_what_a_killed_write_left_is_undone_by_the_next_one(tmp_path):
    import os

    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("old")
    os.replace(folder, tmp_path / ".model.old")  # killed between the two renames of a replacement
    (tmp_path / ".model.x1y2z3w4.tmp").mkdir()  # and half-written temporaries (named as mkstemp names them)
    (tmp_path / ".out.txt.a1b2c3d4.tmp").write_text("half")
    (tmp_path / ".model.safetensors.e5f6g7h8.tmp").write_text("another output's, in flight")
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("new")
    with atomic_dir(folder) as tmp:
        assert (folder / "a").read_text() == "old"  # the old state is back before the new one is written
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.safetensors.e5f6g7h8.tmp", "model", "out.txt"]


def test_files_and_folders_get_the_umasks_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inside").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
