"""dobbin.writeback: background syncs while a large stored file is copied."""

import errno
import io
import threading

import pytest
import transaction

import dobbin.log
from dobbin.database import Database
from dobbin.exc import StorageError
from dobbin.log import Log
from dobbin.persistent import Persistent, PersistentFile, checkout
from dobbin.stream import BLOCK
from dobbin.writeback import EarlySync


def test_a_sync_starts_every_so_many_bytes_when_none_is_running():
    running, calls = threading.Event(), []

    def sync():
        calls.append(threading.current_thread().name)
        running.wait(5)

    early = EarlySync(sync, every=10)
    early.wrote(6)
    assert early.started == 0
    early.wrote(6)                    # 12 bytes: one starts
    early.wrote(30)                   # it is still running: none more
    assert early.started == 1
    running.set()
    early.finish()
    assert calls == ["dobbin-early-sync"]
    early.wrote(10)
    early.finish()
    assert early.started == 2 and len(calls) == 2


def test_a_failed_sync_is_raised_by_finish():
    def sync():
        raise OSError(errno.EIO, "Input/output error")

    early = EarlySync(sync, every=1)
    early.wrote(1)
    with pytest.raises(OSError, match="Input/output"):
        early.finish()
    early.finish()  # raised once


def test_none_means_never():
    early = EarlySync(lambda: pytest.fail("synced"), every=None)
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


def test_a_large_file_is_synced_while_it_is_staged(database, monkeypatch):
    monkeypatch.setattr(dobbin.log, "EVERY", BLOCK)
    syncs = []
    real = Log._sync

    def counting(log):
        syncs.append(threading.current_thread().name)
        real(log)

    monkeypatch.setattr(Log, "_sync", counting)
    data = bytes(range(256)) * (8 * BLOCK // 256)
    store(database, data)
    assert "dobbin-early-sync" in syncs
    assert syncs[0] != "dobbin-early-sync"  # the staging header is synced first, in line
    assert b"".join(database.root.file) == data


def test_a_failed_early_sync_fails_the_commit_and_stops_writes(database, monkeypatch):
    monkeypatch.setattr(dobbin.log, "EVERY", BLOCK)
    real = Log._sync

    def failing_in_the_background(log):
        if threading.current_thread().name == "dobbin-early-sync":
            raise OSError(errno.EIO, "Input/output error")
        real(log)

    monkeypatch.setattr(Log, "_sync", failing_in_the_background)
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
