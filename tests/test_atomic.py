"""codetune/atomic.py: good output is never overwritten in place."""

from pathlib import Path

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


def test_torch_save_on_a_full_disk_is_named_as_one(tmp_path):
    """torch.save reports a full disk only as 'unexpected pos A vs B' (no errno); on a real full tmpfs (a
    private mount namespace) write_error names it ENOSPC, as checkpoint saving reports it."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare for private mounts")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(disk)], capture_output=True)
    if probe.returncode:
        pytest.skip(f"private mounts unavailable here: {probe.stderr.decode().strip()}")
    code = (
        "import sys, torch; from pathlib import Path; from codetune.atomic import write_error\n"
        "d = Path(sys.argv[1]); (d / 'fill').write_bytes(b'x' * (1 << 20))\n"
        "try:\n    torch.save({'w': torch.zeros(1 << 20)}, d / 'optimizer.pt'); print('saved')\n"
        "except RuntimeError as e:\n    print('unexpected pos' in str(e), write_error(d, e))\n"
        "print(write_error(d, RuntimeError('some other failure')))\n")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1200k tmpfs {disk} && "
                        f"{sys.executable} -c \"$0\" {disk}", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()[-2:]
    assert first.startswith("True cannot write") and "(ENOSPC)" in first, r.stdout
    assert second == "None"  # not a disk problem: raised as it is


def test_every_temporary_name_the_writers_make_is_a_leftover(tmp_path):
    # train/state.remove_leftovers cleans up after killed writers by is_leftover: a writer whose naming
    # changed without it would leave its debris in every run folder
    from codetune.atomic import aside, is_leftover, temp_dir_beside, write_file

    seen = []
    write_file(tmp_path / "metrics.jsonl", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    names = [seen[0], aside(tmp_path / "step-000004").name, aside(tmp_path / "adapter").name,
             temp_dir_beside(tmp_path / "adapter").name]
    assert all(is_leftover(n) for n in names), names
    assert not any(is_leftover(n) for n in ("metrics.jsonl", "adapter", "step-000004", ".codetune-run",
                                            "notes.tmp-1", ".tmp-1"))
