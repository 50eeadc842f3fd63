"""Atomic writes: a reader sees the old content or the new, and no temporary is left behind."""
import pytest

from llave_kit.files import atomic_path, staged_directory, write_text


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_replaces_the_file_whole(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "old")  # the folder is made as needed
    write_text(path, "new")
    assert path.read_text() == "new" and names(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old" and names(tmp_path) == ["a.txt"]


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with staged_directory(out) as stage:
        (stage / "a").write_text("1")
        assert not out.exists()
    with pytest.raises(RuntimeError), staged_directory(out, overwrite=True) as stage:
        (stage / "b").write_text("2")
        raise RuntimeError
    assert names(out) == ["a"]
    with staged_directory(out, overwrite=True) as stage:
        (stage / "b").write_text("2")
    assert names(out) == ["b"] and names(tmp_path) == ["out"]


def test_a_staged_directory_refuses_what_it_would_destroy(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"), staged_directory(tmp_path / "out"):
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"), staged_directory(tmp_path / "file", True):
        pass
    assert names(tmp_path) == ["file", "out"] and names(tmp_path / "out") == ["keep"]
