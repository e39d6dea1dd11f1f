"""Tests of dobbin.commit: a big commit pauses the cyclic GC while it holds
the commit lock, a small one never does, and pauses nest across threads;
streams are laid out first in the record; a state that would not load
back is not stored."""

import datetime
import decimal
import gc
import os
import threading
import warnings

import pytest
import transaction

from dobbin import commit as commit_module
from dobbin.commit import BIG_COMMIT, Commit, gc_paused
from dobbin.exc import ObjectGraphError, UnstorableError
from dobbin.persistent import Persistent, PersistentDict, checkout
from dobbin.record import TX_HEADER_SIZE, stream_entry_size


class SeesTheCollector:
    """Pickles as itself, noting whether the cyclic collector was on."""

    seen = []

    def __reduce__(self):
        SeesTheCollector.seen.append(gc.isenabled())
        return SeesTheCollector, ()


def watched_objects(count):
    objects = []
    for _ in range(count):
        obj = Persistent()
        checkout(obj)
        obj.watch = SeesTheCollector()
        objects.append(obj)
    return objects


def test_only_a_big_commit_pauses_the_collector(open_db):
    db = open_db()
    root = Persistent()
    checkout(root)
    root.children = watched_objects(1)
    db.elect(root)
    SeesTheCollector.seen = []
    transaction.commit()
    assert SeesTheCollector.seen == [True]  # small: the collector stays on
    checkout(root)
    root.children = watched_objects(BIG_COMMIT + 10)
    SeesTheCollector.seen = []
    transaction.commit()
    assert SeesTheCollector.seen[:BIG_COMMIT - 1] == [True] * (BIG_COMMIT - 1)
    assert SeesTheCollector.seen[-10:] == [False] * 10  # paused from the thousandth on
    assert gc.isenabled()


def test_a_big_commit_that_fails_resumes_the_collector(open_db):
    db = open_db()
    root = Persistent()
    checkout(root)
    root.children = watched_objects(BIG_COMMIT + 10)
    db.elect(root)
    stray = Persistent()
    checkout(stray)  # never connected: the vote fails after the states are laid out
    SeesTheCollector.seen = []
    with pytest.raises(ObjectGraphError):
        transaction.commit()
    assert SeesTheCollector.seen[-1] is False  # it did pause
    assert gc.isenabled()
    transaction.abort()


def test_gc_paused_nests_and_restores_the_collector(start_thread):
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def pause_in_thread():
        with gc_paused:
            inside.set()
            leave.wait(10)

    with gc_paused:
        assert not gc.isenabled()
        thread = start_thread(pause_in_thread)
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause still holds
    leave.set()
    thread.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused:
            pass
        assert not gc.isenabled()  # off before: stays off
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        with gc_paused:
            raise ValueError("the pause ends anyway")
    assert gc.isenabled()




def test_a_child_forked_during_a_pause_has_its_collector_back(start_thread):
    inside, leave = threading.Event(), threading.Event()

    def pause_in_thread():  # a big commit in another thread, say
        with gc_paused:
            inside.set()
            leave.wait(10)

    thread = start_thread(pause_in_thread)
    inside.wait(10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # forking with threads
            pid = os.fork()
        if pid == 0:
            os._exit(0 if gc.isenabled() else 1)
        assert os.waitpid(pid, 0)[1] == 0, "the child's collector stayed off"
    finally:
        leave.set()
        thread.join()
    assert gc.isenabled()


def test_streams_are_laid_out_first_one_after_another():
    commit = Commit(known_tid=3, offset=1000, oid_high=7)
    first = commit.add_stream("a", b"x" * 10, None)
    second = commit.add_stream("b", b"", "owner")
    assert first == 1000 + TX_HEADER_SIZE
    assert second == first + stream_entry_size(10)
    assert commit.stream_offsets == {"a": first, "b": second}
    assert [entry.data for entry in commit.streams] == [b"x" * 10, b""]
    assert commit.stream_owners == [(None, first, 10), ("owner", second, 0)]


@pytest.mark.parametrize("stream", [False, True])
def test_the_claimed_length_is_the_length_of_the_record_written(open_db, monkeypatch, stream):
    import io
    from dobbin.log import Log
    from dobbin.persistent import PersistentFile
    claimed = []
    real = Log.claim

    def recording(log, offset, length):
        claimed.append((offset, length))
        return real(log, offset, length)

    monkeypatch.setattr(Log, "claim", recording)
    db = open_db()
    root = Persistent()
    checkout(root)
    root.child = Persistent()  # a new object, stored too
    if stream:
        root.file = PersistentFile(io.BytesIO(b"stored bytes" * 1000))
    db.elect(root)             # a root entry
    transaction.commit()
    [(offset, length)] = claimed
    assert db._log.end == offset + length


# -- a state must load back ------------------------------------------------------------------

class CodedError(Exception):
    """Pickles (BaseException keeps only the message in args) but does not
    load: its __init__ wants two arguments.  A classic."""

    def __init__(self, code, detail):
        super().__init__("code %s" % code)
        self.code = code
        self.detail = detail


class Holder:
    """A plain object that holds a persistent one, rebuilt by its own reduce."""

    def __init__(self, held):
        self.held = held

    def __reduce__(self):
        return Holder, (self.held,)


def test_a_state_that_would_not_load_back_is_not_stored(open_db, db_path):
    # It was: the object could no longer be checked out (a stray TypeError
    # from copying it), and after a restart the root failed to load, and
    # with it every object of the database.
    db = open_db()
    db.elect(PersistentDict(users=1))
    transaction.commit()
    before = db.tx_count
    checkout(db.root)
    db.root["last_error"] = CodedError(42, "disk full")
    with pytest.raises(UnstorableError, match="would not load back .*TypeError: .*detail"):
        transaction.commit()
    transaction.abort()
    assert db.tx_count == before + 1  # the failed commit is recorded
    checkout(db.root)
    db.root["users"] = 2
    transaction.commit()
    db.close()
    db = open_db(db_path)
    assert dict(db.root) == {"users": 2}


def test_values_rebuilt_by_their_reduce_are_loaded_back_with_their_references(
        open_db, monkeypatch):
    checked = []
    check = commit_module._check_loads_back

    def counted(obj, data, references):
        checked.append(obj)
        return check(obj, data, references)

    monkeypatch.setattr(commit_module, "_check_loads_back", counted)
    db = open_db()
    child = PersistentDict(n=1)
    db.elect(PersistentDict(holder=Holder(child), child=child))
    transaction.commit()
    assert checked == [db.root]  # the child holds only plain values
    checkout(db.root)
    db.root["when"] = datetime.datetime(2026, 11, 23, tzinfo=datetime.timezone.utc)
    db.root["amount"] = decimal.Decimal("1.10")
    del db.root["holder"]
    transaction.commit()
    assert checked == [db.root]  # values of types that always load back: no check
    assert db.load_state(db.root._p_oid)[1]["_data"]["amount"] == decimal.Decimal("1.10")
