"""codetune/atomic.py: good output is never overwritten in place."""

import pytest

from codetune.atomic import replace_dir, write_file, write_text


def test_write_text_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "results.json"
    p.write_text("old")
    write_text(p, "new")
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    p = tmp_path / "chart.png"
    p.write_text("good")

    def broken(tmp):
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that pick a format by suffix still can
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(p, broken)
    assert p.read_text() == "good" and sorted(x.name for x in tmp_path.iterdir()) == ["chart.png"]


def test_replace_dir_swaps_folders(tmp_path):
    new, dst = tmp_path / "new", tmp_path / "dst"
    new.mkdir()
    (new / "a").write_text("2")
    dst.mkdir()
    (dst / "a").write_text("1")
    replace_dir(new, dst)
    assert (dst / "a").read_text() == "2" and sorted(x.name for x in tmp_path.iterdir()) == ["dst"]


def test_replace_dir_moves_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    from codetune import atomic

    new, dst = tmp_path / "new", tmp_path / "dst"
    for d, v in ((new, "2"), (dst, "1")):
        d.mkdir()
        (d / "a").write_text(v)
    real = os.replace

    def fail_second(a, b):
        if a == new:
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", fail_second)
    with pytest.raises(OSError):
        replace_dir(new, dst)
    assert (dst / "a").read_text() == "1" and sorted(x.name for x in tmp_path.iterdir()) == ["dst", "new"]
