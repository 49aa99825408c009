"""gie_core.files: text files read with a clear error, sizes for people, a full disk named, and
the one atomic folder swap (checkpoints, released-layout exports and the tiny model set use it)."""

from __future__ import annotations

import errno
import os

import pytest

from gie_core import files


def test_a_file_that_is_not_utf8_names_the_file_and_where(tmp_path):
    path = tmp_path / "jobs.tsv"
    path.write_bytes("a.png\tmake it red\n".encode() + "b.png\tcaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        files.read_text(path, "job list")
    text = str(info.value)
    assert f"job list {path} is not UTF-8" in text
    assert "byte 0xe9 at line 2, column 10 (byte offset 27)" in text and "save it as UTF-8" in text
    with pytest.raises(ValueError, match="config file .*missing.yaml does not exist"):
        files.read_text(tmp_path / "missing.yaml", "config file")
    path.write_bytes(b"\xef\xbb\xbfa.png\tx\n")  # a byte-order mark is not part of the first path
    assert files.read_text(path, "job list") == "a.png\tx\n"


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (1, "1 byte"), (999, "999 bytes"), (1500, "1.5 kB"),
                                     (1 << 20, "1.05 MB"), (999_999, "1 MB"), (3_400_000_000, "3.4 GB"),
                                     (123_000_000_000, "123 GB")])
def test_sizes_read_for_people_and_a_need_is_never_zero(n, text):
    assert files.human_size(n) == text


def test_a_full_disk_names_the_path_and_the_free_space(tmp_path):
    path = tmp_path / "out" / "edit.png"
    path.parent.mkdir()
    (tmp_path / "out" / "edit.png").write_bytes(b"good")

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.DiskFullError) as info:
        files.atomic_write(path, full)
    message = files.describe_os_error(info.value)
    assert f"could not write '{path}'" in message and "the disk is full" in message
    assert "free there" in message and "No space left on device" in message
    assert path.read_bytes() == b"good" and sorted(p.name for p in path.parent.iterdir()) == ["edit.png"]


def test_output_checks_and_the_space_check_walk_up_to_the_same_folder(tmp_path):
    deep = tmp_path / "a" / "b" / "c.png"
    assert files.existing_folder(deep) == tmp_path
    assert files.free_space(deep) == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "release"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_folder(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no temporary folder left
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]  # the old folder untouched
    with files.atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".release.")
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # nothing of the new is visible before it is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    with files.atomic_folder(final, keep_existing=lambda: True) as tmp:  # another process won the race
        (tmp / "other.txt").write_text("other")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    final, new = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real = os.replace

    def fail_second(src, dst):
        if str(src) == str(new):
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_second)
    with pytest.raises(OSError):
        files.replace_folder(new, final, aside=tmp_path / "ckpt.old")
    assert (final / "a").read_text() == "old" and not (tmp_path / "ckpt.old").exists()


def test_inside_keeps_paths_from_data_in_their_folder(tmp_path):
    """A path built from data stays in its folder after '..' and symlinks resolve; else the error
    names where it came from, the path and the folder."""
    root = tmp_path / "run"
    (root / "fullset").mkdir(parents=True)
    assert files.inside(root, "fullset/a/en/k.png", "row 3") == root / "fullset/a/en/k.png"
    assert files.inside(root, "fullset/../k.png", "row 3") == root / "fullset/../k.png"  # still inside
    for bad in ("../victim.png", "fullset/../../victim.png", str(tmp_path / "victim.png"), "/etc/passwd"):
        with pytest.raises(ValueError, match=r"row 3: '.*' resolves to '.*', outside the folder '.*run'"):
            files.inside(root, bad, "row 3")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        (root / "link").symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("this filesystem cannot make symlinks")
    with pytest.raises(ValueError, match="outside the folder"):
        files.inside(root, "link/k.png", "row 4")
