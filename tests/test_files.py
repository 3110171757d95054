"""conjure.files: the one rule for atomic writes (temporary beside the target, flushed, renamed, removed on
failure; the mode a plain write leaves)."""

import os
import stat

import pytest

from conjure.files import atomic_folder, atomic_write, atomic_write_bytes, atomic_write_text


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_a_new_file_gets_the_umask_a_replaced_one_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "héllo\n")
        assert (tmp_path / "new.txt").read_bytes() == "héllo\n".encode() and mode(tmp_path / "new.txt") == 0o640
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o604)
        atomic_write_bytes(kept, b"new")
        assert kept.read_bytes() == b"new" and mode(kept) == 0o604
    finally:
        os.umask(old)
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "step-000002"
    atomic_folder(target, lambda tmp: (tmp / "a").write_text("1"))
    atomic_folder(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]

    def fail(tmp):
        (tmp / "c").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_folder(target, fail)
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers(tmp_path) == []
