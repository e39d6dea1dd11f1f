"""Fixtures shared by the store's tests.

Every test starts and ends outside any transaction, and the databases it
opens through `open_db` are closed after it, so no test sees another's
checkouts or file descriptors.  `start_thread` runs a step in another
thread and hands its exception back to the test; `flip_bit` damages a
file.
"""

import os
import pathlib
import struct
import threading
import tracemalloc
import zlib

import pytest
import transaction

from dobbin.database import Database
from dobbin.log import Log
from dobbin.persistent import checkout


TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


def child_env():
    """The environment for a child Python that imports the project and the tests' modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def peak_bytes_allocated(action):
    """Run `action`; return the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def db_path(tmp_path):
    """A path in a fresh directory where no database exists yet."""
    return str(tmp_path / "test.dobbin")


@pytest.fixture(autouse=True)
def _opened_databases():
    transaction.abort()
    opened = []
    yield opened
    transaction.abort()
    for database in opened:
        database.close()


@pytest.fixture
def open_db(db_path, _opened_databases):
    """Open a Database (on `db_path` unless told otherwise), closed after the test."""

    def open_db(path=db_path, **options):
        database = Database(path, **options)
        _opened_databases.append(database)
        return database

    return open_db


class _Thread(threading.Thread):
    """Runs `target(*args)`; `join()` re-raises what it raised."""

    def __init__(self, target, args):
        super().__init__(daemon=True)
        self._call = (target, args)
        self.error = None
        self.result = None

    def run(self):
        target, args = self._call
        try:
            self.result = target(*args)
        except BaseException as error:
            self.error = error
        finally:
            transaction.abort()  # a thread's checkouts end with it

    def join(self, timeout=30):
        super().join(timeout)
        assert not self.is_alive(), "thread still running after %ss" % timeout
        error, self.error = self.error, None  # raised once, to whoever joins first
        if error is not None:
            raise error
        return self.result


@pytest.fixture
def start_thread():
    """Start `target(*args)` in a thread; its `join()` returns or re-raises."""
    started = []

    def start_thread(target, *args):
        thread = _Thread(target, args)
        thread.start()
        started.append(thread)
        return thread

    yield start_thread
    for thread in started:
        thread.join()


def in_commit_order(*databases):
    """`databases` in the order a transaction locks and finishes them."""
    def identity(db):
        info = os.stat(db.path)
        return info.st_dev, info.st_ino

    return sorted(databases, key=identity)


def two_databases(open_db, directory):
    """Databases a.dobbin and b.dobbin in `directory`, each with a Persistent
    root, in the order a transaction finishes them (by file identity)."""
    from dobbin.persistent import Persistent
    pair = in_commit_order(open_db(str(directory / "a.dobbin")),
                           open_db(str(directory / "b.dobbin")))
    for db in pair:
        db.elect(Persistent())
    transaction.commit()
    return pair


def commit_in_thread(start_thread, obj, **changes):
    """Check out `obj` in another thread, set `changes` and commit there."""

    def run():
        checkout(obj)
        for name, value in changes.items():
            setattr(obj, name, value)
        transaction.commit()

    start_thread(run).join()


def flip_bit(path, offset):
    """Damage a file: flip the lowest bit of its byte at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def forge_file_header(path, offset, value, reseal):
    """Write `value` into the file header at `offset`; with `reseal`, fix its crc."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(64))
        header[offset:offset + len(value)] = value
        if reseal:
            struct.pack_into("<I", header, 60, zlib.crc32(bytes(header[:60])))
        f.seek(0)
        f.write(header)


def append_record(path, status, entries, oid_high=100):
    """Append a record of raw `entries` (sound checksums) to the file at `path`."""
    log = Log(path)
    try:
        list(log.recover())
        log.append(status, oid_high, entries)
    finally:
        log.close()
