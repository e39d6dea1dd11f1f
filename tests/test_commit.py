"""Tests of dobbin.commit: a big commit pauses the cyclic GC while it holds
the commit lock, a small one never does, and pauses nest across threads;
streams are laid out first in the record."""

import gc
import os
import threading
import warnings

import pytest
import transaction

from dobbin.commit import BIG_COMMIT, Commit, gc_paused
from dobbin.exc import ObjectGraphError
from dobbin.persistent import Persistent, checkout
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
