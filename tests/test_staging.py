"""dobbin.staging: a large stored file is copied into the log ahead of its
record, and synced in the background while it is copied."""

import errno
import io
import os
import threading

import pytest
import transaction

from dobbin import staging
from dobbin.database import Database
from dobbin.exc import StorageError
from dobbin.log import Log
from dobbin.persistent import Persistent, PersistentFile, checkout
from dobbin.staging import EarlySync
from dobbin.stream import BLOCK


@pytest.fixture
def synced(monkeypatch):
    """The descriptors the early syncs sync, and when (with `hold` set,
    each waits for `go`)."""
    record = {"fds": [], "hold": False, "go": threading.Event()}
    real = staging._fdatasync

    def fdatasync(fd):
        record["fds"].append(fd)
        if record["hold"]:
            record["go"].wait(5)
        real(fd)

    monkeypatch.setattr(staging, "_fdatasync", fdatasync)
    return record


def test_a_sync_starts_every_so_many_bytes_when_none_is_running(tmp_path, synced):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    synced["hold"] = True
    early = EarlySync(str(path), every=10)
    early.wrote(6)
    assert early.started == 0
    early.wrote(6)                    # 12 bytes: one starts
    early.wrote(30)                   # it is still running: none more
    assert early.started == 1
    synced["go"].set()
    early.finish()
    early.wrote(10)
    early.finish()
    assert early.started == 2 and len(synced["fds"]) == 2


def test_a_failed_sync_is_raised_by_finish(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(staging, "_fdatasync", failing)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    early = EarlySync(str(path), every=1)
    early.wrote(1)
    with pytest.raises(OSError, match="Input/output"):
        early.finish()
    early.finish()  # raised once


def test_no_descriptor_to_spare_means_no_early_syncs(tmp_path):
    early = EarlySync(str(tmp_path / "missing"), every=1)  # cannot be opened
    early.wrote(10)
    early.wrote(10)
    early.finish()
    assert early.started == 0 and early.every is None


def test_none_means_never(tmp_path):
    early = EarlySync(str(tmp_path / "never-opened"), every=None)
    early.wrote(1 << 40)
    early.finish()
    assert early.started == 0


def store(db, data):
    checkout(db.root)
    db.root.file = PersistentFile(io.BytesIO(data))
    transaction.commit()


@pytest.fixture
def database(tmp_path):
    db = Database(str(tmp_path / "w.dobbin"))
    db.elect(Persistent())
    transaction.commit()
    yield db
    transaction.abort()
    db.close()


def test_a_large_file_is_synced_on_a_descriptor_of_its_own_while_staged(
        database, monkeypatch, synced):
    monkeypatch.setattr(staging, "EVERY", BLOCK)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    data = bytes(range(256)) * (8 * BLOCK // 256)
    store(database, data)
    assert synced["fds"], "no early sync"
    # Not the log's descriptor: a writeback error is reported to one sync
    # of a descriptor only, and the log's own syncs must see it.
    assert database._log.fd not in synced["fds"]
    assert b"".join(database.root.file) == data
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before  # closed again


def test_a_failed_early_sync_fails_the_commit_and_stops_writes(database, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(staging, "EVERY", BLOCK)
    monkeypatch.setattr(staging, "_fdatasync", failing)
    count = database.tx_count
    with pytest.raises(StorageError):
        store(database, bytes(4 * BLOCK))
    transaction.abort()
    monkeypatch.undo()
    assert database.tx_count == count and not hasattr(database.root, "file")
    with pytest.raises(StorageError, match="refuses writes"):
        store(database, b"x")
    reopened = Database(database.path)
    assert reopened.tx_count == count and reopened.verify()["ok"]
    reopened.close()


def test_a_full_disk_fails_the_commit_of_a_large_file_before_any_write(database, monkeypatch):
    # It broke the log (writes refused until reopened), as a failed write
    # must; space allocated first fails this commit alone.
    real_write = Log._write

    def disk_full(self, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_small_only(self, buffers, offset):
        if len(buffers) >= BLOCK:  # the staged bytes: past what the disk holds
            disk_full(self, offset, len(buffers))
        real_write(self, buffers, offset)

    monkeypatch.setattr(Log, "_allocate", disk_full)
    monkeypatch.setattr(Log, "_write", write_small_only)
    count = database.tx_count
    with pytest.raises(StorageError, match="no room"):
        store(database, bytes(4 * BLOCK))
    transaction.abort()
    monkeypatch.undo()
    assert database.tx_count == count + 1  # the failure, recorded
    assert not hasattr(database.root, "file")
    store(database, b"x")
    assert b"".join(database.root.file) == b"x"
