"""The atomic-write helper: replace or leave untouched, keep permissions, clean up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gembatch import fsutil


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "job-info.jsonl"
    target.write_bytes(b"old\n")
    fsutil.atomic_write_bytes(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-info.jsonl"]


def test_atomic_write_creates_a_missing_file_with_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fsutil.atomic_write_bytes(tmp_path / "new.jsonl", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.jsonl").read_bytes() == b"x"
    assert _mode(tmp_path / "new.jsonl") == 0o644  # not mkstemp's 0600


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664])
def test_atomic_write_keeps_the_permissions_of_the_replaced_file(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "job-info.jsonl"
    target.write_bytes(b"old\n")
    target.chmod(mode)
    fsutil.atomic_write_bytes(target, b"new\n")
    assert _mode(target) == mode


def test_failing_writer_leaves_target_untouched_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "job-info.jsonl"
    target.write_bytes(b"old\n")
    with pytest.raises(RuntimeError, match="disk on fire"), fsutil.atomic_writer(target) as out:
        out.write(b"half of the new conte")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-info.jsonl"]


def test_temp_file_is_written_in_the_target_directory(tmp_path: Path) -> None:
    target = tmp_path / "job-info.jsonl"
    with fsutil.atomic_writer(target) as handle:
        temp = Path(handle.name)
        assert temp.parent == tmp_path
        assert temp.name.startswith(".job-info.jsonl.") and temp.name.endswith(".tmp")
        handle.write(b"x")
    assert not temp.exists()


def test_text_mode_writer_encodes_as_asked(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    with fsutil.atomic_writer(target, "w", encoding="utf-8") as handle:
        handle.write("日本語\n")
    assert target.read_bytes() == "日本語\n".encode()


def test_remove_stale_temps_removes_only_the_named_files_temps(tmp_path: Path) -> None:
    stale = [tmp_path / ".job-info.jsonl.abc_1234.tmp", tmp_path / ".job-info.jsonl.zz99yy88.tmp"]
    kept = [
        tmp_path / "job-info.jsonl",
        tmp_path / ".job-info.jsonl.lock.abcd1234.tmp",  # another file's temp
        tmp_path / ".other.jsonl.abcd1234.tmp",
        tmp_path / ".job-info.jsonl.abcd1234.tmp.keep",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = fsutil.remove_stale_temps(tmp_path, "job-info.jsonl")
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def _record_fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Make os.fsync and os.replace log what they were called on, then do their work."""
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = (
            "file" if stat.S_ISREG(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "?"
        )
        calls.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}"), info.st_size))
        real_fsync(fd)

    def replace(src: fsutil.StrPath, dst: fsutil.StrPath) -> None:
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors via /proc")
@pytest.mark.parametrize("writer", ["atomic_write_bytes", "ledger"])
def test_atomic_write_fsyncs_the_full_temp_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    from gembatch.ledger.jsonl import JsonlLedger

    target = tmp_path / "job-info.jsonl"
    target.write_bytes(b'{"id": "a"}\n')
    data = b'{"id": "a"}\n{"id": "b", "pad": "' + b"x" * 100_000 + b'"}\n'
    calls = _record_fsyncs_and_renames(monkeypatch)
    if writer == "ledger":
        assert JsonlLedger(target).add({"id": "b", "pad": "x" * 100_000})
    else:
        fsutil.atomic_write_bytes(target, data)
    assert target.read_bytes() == data

    assert len(calls) == 3, calls
    (fsync, kind, temp, size), (replace, source, destination), last = calls
    # 1. the temp file, in the target's directory, once all of the new bytes are in it
    assert (fsync, kind, size) == ("fsync", "file", len(data))
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".job-info.jsonl.")
    # 2. then the rename of exactly that file over the target
    assert (replace, source, destination) == ("replace", temp, str(target))
    # 3. then the directory that holds the new name
    assert last[:3] == ("fsync", "dir", str(tmp_path))
