"""dobbin.fileid: which file a path names, without asking its times."""

import ctypes
import errno
import os
import sys

import pytest

from dobbin import fileid


def identity_by_stat(path):
    status = os.stat(path)
    return status.st_dev, status.st_ino


@pytest.fixture(params=["statx", "stat"])
def route(request, monkeypatch):
    """Each test runs through libc's statx (where there is one) and
    through the os.stat fallback."""
    if request.param == "statx":
        if fileid._statx is None:
            pytest.skip("no statx in this libc")
    else:
        monkeypatch.setattr(fileid, "_statx", None)
    return request.param


def test_a_file_is_named_by_its_device_and_inode(tmp_path, route):
    path = tmp_path / "db.fs"
    path.write_bytes(b"x")
    assert fileid.path_identity(str(path)) == identity_by_stat(path)
    with open(path, "rb") as opened:
        status = os.fstat(opened.fileno())
    assert fileid.path_identity(str(path)) == (status.st_dev, status.st_ino)


def test_a_replaced_file_has_another_identity(tmp_path, route):
    path, other = tmp_path / "db.fs", tmp_path / "other"
    path.write_bytes(b"x")
    other.write_bytes(b"y")
    before = fileid.path_identity(str(path))
    os.rename(other, path)
    assert fileid.path_identity(str(path)) not in (None, before)


def test_a_missing_name_is_none(tmp_path, route):
    assert fileid.path_identity(str(tmp_path / "missing")) is None


def test_other_failures_raise_what_stat_raises(tmp_path, route):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fileid.path_identity(str(tmp_path / "file" / "below"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statx is Linux's")
def test_on_linux_the_times_are_not_asked(tmp_path, monkeypatch):
    """Asking them slows the next fdatasync (see the module's docstring)."""
    if fileid._statx is None:
        pytest.skip("no statx in this libc")
    (tmp_path / "db.fs").write_bytes(b"")

    def refused(*args, **kwargs):
        raise AssertionError("os.stat was called")
    monkeypatch.setattr(os, "stat", refused)
    assert fileid.path_identity(str(tmp_path / "db.fs")) is not None


def test_a_kernel_without_statx_falls_back_to_stat(tmp_path, monkeypatch):
    def unsupported(*args):
        ctypes.set_errno(errno.ENOSYS)
        return -1
    monkeypatch.setattr(fileid, "_statx", unsupported)
    (tmp_path / "db.fs").write_bytes(b"")
    assert fileid.path_identity(str(tmp_path / "db.fs")) == identity_by_stat(tmp_path / "db.fs")
    assert fileid._statx is None
