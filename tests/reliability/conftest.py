"""Helpers of the reliability suite: the full-mode flag, workloads with
their expected states, and cheap ways to open a damaged copy and compare.

CI runs every test in a sampled mode that fits in a few minutes; with
``DOBBIN_FULL=1`` in the environment the same tests run exhaustively
(every offset, every byte, hundreds of rounds), which may take an hour.
Every test prints its figures (what it tried, what went wrong) so the
numbers of a full run can be quoted.
"""

import collections
import glob
import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading

import pytest
import transaction

from dobbin.database import Database, PersistentStream
from dobbin.log import CHECKPOINT, Log
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, checkout

from .models import Item

FULL = os.environ.get("DOBBIN_FULL") == "1"


def scaled(ci, full):
    """`full` under DOBBIN_FULL=1, else `ci`."""
    return full if FULL else ci


def figures(name, **numbers):
    """Print a test's figures on one line, for the issue's closing note."""
    mode = "full" if FULL else "ci"
    print("\n[%s %s] %s" % (name, mode, ", ".join("%s=%s" % item for item in numbers.items())))


def pytest_collection_modifyitems(items):
    # Every test here takes seconds: `-m "not slow"` leaves them out.
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def quiet_store_logging():
    """Thousands of recoveries and failed writes would log thousands of lines.

    What recovery cut is checked through `db.recovery` and the saved
    files instead; the warning itself has its own test (test_repair.py).
    """
    logger = logging.getLogger("dobbin")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture
def scratch_dir(tmp_path):
    """A directory for files opened thousands of times.

    In memory (/dev/shm) where there is one: truncation and recovery
    logic don't depend on the file system, and an exhaustive run
    rewrites and fsyncs gigabytes.
    """
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = tempfile.mkdtemp(prefix="dobbin-reliability-", dir="/dev/shm")
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield str(tmp_path)


# -- states ----------------------------------------------------------------


def plain(value, deep=True):
    """A comparable copy of a stored value: objects become (class, state).

    A stream becomes its size and digest, read through the database (so
    every chunk's checksum is checked); with `deep=False` its size and
    where its entry is, for tests whose files hold only pristine bytes
    and that open a copy thousands of times.
    """
    if isinstance(value, Persistent):
        if value._p_ghost:
            value._p_jar._p_activate(value)
        state = dict(value.__dict__)
        return (type(value).__name__, {key: plain(item, deep) for key, item in state.items()})
    if isinstance(value, (PersistentStream, PersistentFile)):
        if not deep:
            return ("stream", value.size, value._offset)
        digest = hashlib.sha256()
        size = 0
        for chunk in value:
            digest.update(chunk)
            size += len(chunk)
        return ("stream", size, digest.hexdigest())
    if isinstance(value, dict):
        return {key: plain(item, deep) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item, deep) for item in value)
    return value


def snapshot(db, deep=True):
    """Everything reachable from the root, as plain values (None: no root)."""
    root = db.root
    return None if root is None else plain(root, deep)


Opened = collections.namedtuple("Opened", "tx_count state recovery")


class OpenError(Exception):
    """Opening or reading a file raised; says how far the open got."""

    def __init__(self, stage, tx_count, error):
        self.stage = stage
        self.tx_count = tx_count
        self.error = error
        opened = "" if tx_count is None else " after opening at transaction %d" % tx_count
        super().__init__("%s raised %s%s: %s" % (stage, type(error).__name__, opened, error))


def open_state(path, deep=True, **options):
    """Open `path`, read everything, close; return what was seen.

    Raises `OpenError` (wrapping what was raised) if opening or reading
    failed.
    """
    options.setdefault("durability", "none")
    try:
        db = Database(path, **options)
    except Exception as error:
        raise OpenError("opening", None, error) from error
    try:
        return Opened(db.tx_count, snapshot(db, deep), db.recovery)
    except Exception as error:
        raise OpenError("reading", db.tx_count, error) from error
    finally:
        db.close()
        transaction.abort()


Span = collections.namedtuple("Span", "tid status offset end")


def layout(path):
    """Every record of the file as (tid, status, offset, end), read from the start."""
    log = Log(path, read_only=True)
    try:
        spans = [Span(record.tid, record.status, record.offset, record.offset + record.length)
                 for record in log.follow()]
        assert log.at_end(), "the workload's own file has an unreadable tail"
    finally:
        log.close()
    return spans


def saved_tails(path):
    """The files recovery saved beside `path` (torn tails, repaired damage)."""
    return sorted(glob.glob(glob.escape(path) + ".torn-*")
                  + glob.glob(glob.escape(path) + ".damaged-*"))


def remove_saved_tails(path):
    for name in saved_tails(path):
        os.remove(name)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


# -- workloads -------------------------------------------------------------


class History:
    """A database built commit by commit, with the state after every tid.

    `states[tid]` is the state a reader must see once the file holds the
    records up to `tid` (failed records repeat the state before them);
    `light[tid]` is the same as `plain(deep=False)` sees it.  The root
    holds a few buckets (PersistentDicts) so that most records are small.
    """

    BUCKETS = 8

    def __init__(self, path, seed=0, durability="none"):
        self.path = path
        self.random = random.Random(seed)
        self.db = Database(path, durability=durability)
        self.states = {0: None}
        self.light = {0: None}
        self.counter = 0

    def note(self):
        self.states[self.db.tx_count] = snapshot(self.db)
        self.light[self.db.tx_count] = snapshot(self.db, deep=False)

    def close(self):
        self.db.close()
        transaction.abort()

    def commit(self, change=None):
        """Run `change(bucket)` on a random bucket and commit (None: touch the root)."""
        root = self.db.root
        if root is None:
            root = PersistentDict({"b%d" % n: PersistentDict() for n in range(self.BUCKETS)})
            self.db.elect(root)
        elif change is None:
            checkout(root)
        else:
            bucket = root["b%d" % self.random.randrange(self.BUCKETS)]
            checkout(bucket)
            change(bucket)
        transaction.commit()
        self.note()

    def _values(self):
        for bucket in self.db.root.values():
            if isinstance(bucket, PersistentDict):
                for key, value in bucket.items():
                    yield bucket, key, value

    def conflict(self):
        """A commit that loses to another database's: a failed record."""
        other = Database(self.path, durability=self.db.durability)
        root = self.db.root
        checkout(root)
        root["lost"] = self.counter

        def win():
            theirs = other.root
            checkout(theirs)
            theirs["won"] = self.counter
            transaction.commit()

        thread = threading.Thread(target=win)
        thread.start()
        thread.join()
        other.close()
        try:
            transaction.commit()
        except Exception:  # the ConflictError we provoked
            transaction.abort()
        else:
            raise AssertionError("the provoked conflict did not happen")
        self.db.sync()
        self.note()
        # Theirs is the record before our failed one, which changes nothing.
        self.states[self.db.tx_count - 1] = self.states[self.db.tx_count]
        self.light[self.db.tx_count - 1] = self.light[self.db.tx_count]

    def checkpoint(self):
        """Have the store write an index checkpoint now, whatever its size rule.

        Small files never reach the size that triggers one; the store's own
        code writes it, told that the last checkpoint is far behind.
        """
        db = self.db
        with db._lock, db._state_lock:
            db._log.checkpoint_end = -(1 << 40)
            db._maybe_checkpoint()
            db._log.flush(db._log.end)
        assert db._log.checkpoint_end == db._log.end, "no checkpoint was written"

    # -- the steps -------------------------------------------------------

    def touch(self):
        """A commit that rewrites the root unchanged."""
        self.commit()

    def set_key(self, size=8):
        self.counter += 1
        key, value = "k%d" % self.counter, self.random.randbytes(size)
        self.commit(lambda bucket: bucket.__setitem__(key, value))

    def delete_key(self):
        keys = [(bucket, key) for bucket, key, _ in self._values()]
        if not keys:
            return self.set_key()
        bucket, key = self.random.choice(keys)
        checkout(bucket)
        del bucket[key]
        transaction.commit()
        self.note()

    def add_items(self, count=1, size=16):
        def change(bucket):
            for _ in range(count):
                self.counter += 1
                name = "item%d" % self.counter
                bucket[name] = Item(name, self.random.randbytes(size))
        self.commit(change)

    def update_item(self, size=16):
        items = [value for _, _, value in self._values() if isinstance(value, Item)]
        if not items:
            return self.add_items(1, size)
        item = self.random.choice(items)
        checkout(item)
        item.payload = self.random.randbytes(size)
        transaction.commit()
        self.note()

    def add_stream(self, size):
        self.counter += 1
        key, data = "stream%d" % self.counter, self.random.randbytes(size)
        self.commit(lambda bucket: bucket.__setitem__(key, PersistentFile(io.BytesIO(data))))

    def drop_large(self):
        """Forget the big objects and streams, so later states read fast."""
        for bucket in self.db.root.values():
            if not isinstance(bucket, PersistentDict):
                continue
            large = [key for key, value in bucket.items()
                     if (isinstance(value, Item) and len(value.payload) > 10000)
                     or (isinstance(value, PersistentStream) and value.size > 10000)]
            if large:
                checkout(bucket)
                for key in large:
                    del bucket[key]
        transaction.commit()
        self.note()


def workload(history, steps):
    """Run `steps` small commits of every kind; yield the tid after each.

    The same seed gives the same commits, so a run that was cut short can
    be checked against the states of a run that was not.
    """
    if history.db.root is None:
        history.commit()
        yield history.db.tx_count
    kinds = [history.touch, history.set_key, history.set_key, history.delete_key,
             history.add_items, history.update_item, lambda: history.set_key(300),
             lambda: history.add_stream(history.random.choice((10, 70000)))]
    for _ in range(steps):
        history.random.choice(kinds)()
        yield history.db.tx_count


def as_bytes(buffers):
    """What a call of Log._write writes: bytes, or a list of buffers."""
    if isinstance(buffers, (bytes, bytearray, memoryview)):
        buffers = [buffers]
    return b"".join(bytes(memoryview(buffer).cast("B")) for buffer in buffers)


def build_history(path, commits, seed=0, big=True):
    """About `commits` transactions of every kind the store writes.

    With `big`: streams of 64 KiB +- 1 and of 1 MiB, a record of 1.05 MiB
    made of many objects (it outgrows the reader's 1 MiB read-ahead), and
    so records that cross 64 KiB and 1 MiB boundaries of the file; they
    are dropped from the root later, so that most states read fast.  A
    conflict leaves a failed record.  The last few commits are small, so
    that testing every offset of the end of the file is cheap.
    """
    history = History(path, seed)
    history.commit()  # elect the root
    specials = []
    if big:
        specials = [lambda: history.add_stream(0), lambda: history.add_stream(1),
                    lambda: history.add_stream(65535), lambda: history.add_stream(65536),
                    lambda: history.add_stream(65537), lambda: history.add_stream(1 << 20),
                    lambda: history.add_items(17, 62000), lambda: history.add_items(1, 65536),
                    history.conflict, history.drop_large]
    else:
        specials = [lambda: history.add_stream(0), lambda: history.add_stream(70),
                    history.conflict]
    ordinary = [history.touch, history.set_key, history.set_key, history.delete_key,
                history.add_items, history.update_item, lambda: history.set_key(300)]
    when = sorted(history.random.sample(range(2, max(commits - 6, len(specials) + 2)),
                                        len(specials)))
    step = 1
    while history.db.tx_count < commits - 3:
        if when and step >= when[0]:
            when.pop(0)
            specials.pop(0)()
        else:
            history.random.choice(ordinary)()
        step += 1
    for step in (history.set_key, history.add_items, history.update_item):
        step()
    history.close()
    return history


def key_history(path, seed, commits, size):
    """A closed History of a root and then `commits` set_key(`size`) commits."""
    history = History(path, seed=seed)
    history.commit()
    for _ in range(commits):
        history.set_key(size)
    history.close()
    return history


def expected_at(spans, cut):
    """(tid, end of the last whole record) of a file cut at `cut` bytes."""
    tid, end = 0, min(cut, 64)
    for span in spans:
        if span.end > cut:
            break
        end = span.end
        if span.status != CHECKPOINT:
            tid = span.tid
    return tid, end
