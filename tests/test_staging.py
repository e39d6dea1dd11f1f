"""dobbin.staging: a large stored file is copied into the log ahead of its
record, and synced in the background while it is copied."""

import errno
import io
import os
import threading
import time

import pytest
import transaction

from dobbin import staging
from dobbin.database import Database
from dobbin.exc import StorageError, StreamError
from dobbin.log import Log
from dobbin.persistent import Persistent, PersistentFile, checkout
from dobbin.record import chunk_table
from dobbin.staging import EarlySync, ReadAhead
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


def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == "dobbin-read-ahead"]


def test_blocks_read_ahead_of_a_slow_writer_reach_the_log_intact(database, monkeypatch):
    # The reader fills its buffers while the writer still holds older
    # blocks: a buffer reused too soon would store another block's bytes.
    real_write = Log._write
    writes = []

    def slow_write(self, buffers, offset):
        if len(buffers) == BLOCK:
            writes.append(offset)
            time.sleep(0.01)
        real_write(self, buffers, offset)

    monkeypatch.setattr(Log, "_write", slow_write)
    data = os.urandom(9 * BLOCK + 123)
    store(database, data)
    monkeypatch.undo()
    assert len(writes) == 9
    assert b"".join(database.root.file) == data
    assert not read_ahead_threads()


def test_a_failed_write_stops_the_reading_ahead(database, monkeypatch):
    real_write = Log._write

    def failing_second_block(self, buffers, offset):
        if len(buffers) == BLOCK and failing_second_block.blocks == 1:
            raise OSError(errno.EIO, "Input/output error")
        failing_second_block.blocks += len(buffers) == BLOCK
        real_write(self, buffers, offset)

    failing_second_block.blocks = 0
    monkeypatch.setattr(Log, "_write", failing_second_block)
    with pytest.raises(StorageError, match="Input/output error"):
        store(database, bytes(64 * BLOCK))
    transaction.abort()
    assert not read_ahead_threads()


class Blocks:
    """A stored file's stand-in: `count` blocks, then `error` if any."""

    def __init__(self, count, error=None):
        self.count = count
        self.error = error
        self.given = 0

    def __len__(self):
        return self.count * BLOCK

    def blocks(self, buffers):
        for _ in range(self.count):
            self.given += 1
            yield bytes([self.given]) * BLOCK
        if self.error is not None:
            raise self.error


THREADED = ReadAhead.THREAD_MIN // BLOCK  # blocks: the fewest read in a thread


@pytest.mark.parametrize("count", [1, THREADED - 1, THREADED, THREADED + 5])
def test_read_ahead_gives_each_block_with_its_crc_table(count, monkeypatch):
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start",
                        lambda thread: started.append(thread.name) or real_start(thread))
    with ReadAhead(Blocks(count)) as blocks:
        got = list(blocks)
    assert [block[0] for block, _table in got] == list(range(1, count + 1))
    assert all(table == chunk_table(block) for block, table in got)
    # A small file is read in line: a thread costs more than it saves.
    assert started == ([] if count < THREADED else ["dobbin-read-ahead"])
    assert not read_ahead_threads()


@pytest.mark.parametrize("count", [2, THREADED + 2])
def test_read_ahead_raises_what_reading_raised_after_the_blocks_before_it(count):
    got = []
    with pytest.raises(StreamError, match="ended short"):
        with ReadAhead(Blocks(count, StreamError("ended short"))) as blocks:
            for block, _table in blocks:
                got.append(block[0])
    assert got == list(range(1, count + 1))
    assert not read_ahead_threads()


def test_interrupts_while_stopping_wait_for_the_reader_then_raise():
    # A second Ctrl-C used to end the wait: the commit returned while the
    # reader went on reading the user's file.
    ahead = ReadAhead(Blocks(1000))
    real_wait = ahead._done.wait
    waits = []

    def interrupted_wait(timeout=None):
        waits.append(timeout)
        if len(waits) <= 2:
            raise KeyboardInterrupt
        return real_wait(timeout)

    with pytest.raises(KeyboardInterrupt):
        with ahead as blocks:
            next(iter(blocks))
            ahead._done.wait = interrupted_wait
    assert len(waits) == 3
    assert not read_ahead_threads()


def test_leaving_early_stops_the_reader_a_few_blocks_ahead():
    source = Blocks(1000)
    with ReadAhead(source) as blocks:
        next(iter(blocks))
    assert not read_ahead_threads()
    assert source.given <= 2 + ReadAhead.DEPTH
