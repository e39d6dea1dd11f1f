"""dobbin.notify: subscribers told in tid order, once each record is durable."""

import logging
import threading

import pytest
from zope.interface.verify import verifyObject

from dobbin.interfaces import INotifier
from dobbin.notify import Notifier


class FakeLog:
    """What a Notifier reads of its log: how far the file is durable."""

    def __init__(self, durability="fsync"):
        self.durability = durability
        self.synced_end = 0
        self.broken = None


def test_implements_interface():
    assert verifyObject(INotifier, Notifier(FakeLog()))


def test_once_the_log_is_broken_notes_wait_for_no_fsync():
    # A failed fsync left its commit's note waiting for a durability that
    # never comes, and every later note (other processes' commits caught up
    # with) behind it: subscribers heard of nothing again.
    log = FakeLog()
    notifier = Notifier(log)
    told = []
    notifier.subscribe(lambda tid, oids: told.append(tid))
    notifier.note(100, 2, frozenset({5}))
    notifier.note(0, 3, frozenset({6}))
    notifier.flush()
    assert told == []
    log.broken = OSError(5, "Input/output error")
    notifier.flush()
    assert told == [2, 3], "the database shows both changes: its subscribers hear of them"


def test_notes_are_told_in_order_once_durable():
    log = FakeLog()
    notifier = Notifier(log)
    told = []
    notifier.subscribe(lambda tid, oids: told.append((tid, oids)))
    notifier.note(100, 1, frozenset({5}))
    notifier.note(200, 2, frozenset({6}))
    notifier.flush()
    assert told == []  # nothing durable yet
    log.synced_end = 150
    notifier.flush()
    assert told == [(1, frozenset({5}))]
    log.synced_end = 200
    notifier.flush()
    assert told == [(1, frozenset({5})), (2, frozenset({6}))]


def test_without_fsync_notes_are_told_at_once_and_clear_drops_them():
    notifier = Notifier(FakeLog(durability="none"))
    told = []
    notifier.subscribe(lambda tid, oids: told.append(tid))
    notifier.note(100, 1, frozenset())
    notifier.clear()
    notifier.note(200, 2, frozenset())
    notifier.flush()
    assert told == [2]


def test_a_failing_subscriber_is_logged_and_the_others_still_run(caplog):
    notifier = Notifier(FakeLog(durability="none"))
    told = []

    def failing(tid, oids):
        raise RuntimeError("subscriber bug")

    notifier.subscribe(failing)
    notifier.subscribe(lambda tid, oids: told.append(tid))
    notifier.note(0, 7, frozenset())
    with caplog.at_level(logging.ERROR, logger="dobbin"):
        notifier.flush()
    assert told == [7] and "failed on transaction 7" in caplog.text
    notifier.unsubscribe(failing)
    with pytest.raises(ValueError):
        notifier.unsubscribe(failing)
    with pytest.raises(TypeError, match="subscriber"):
        notifier.subscribe(5)


def test_a_subscriber_flushing_again_returns_at_once_and_order_holds():
    notifier = Notifier(FakeLog(durability="none"))
    told = []

    def subscriber(tid, oids):
        told.append(tid)
        if tid == 1:
            notifier.note(0, 2, frozenset())
            notifier.flush()  # nested: the outer loop tells 2, after 1
            told.append("after nested flush")

    notifier.subscribe(subscriber)
    notifier.note(0, 1, frozenset())
    notifier.flush()
    assert told == [1, "after nested flush", 2]


def test_holding_the_lock_keeps_subscribers_from_being_told():
    notifier = Notifier(FakeLog(durability="none"))
    told = threading.Event()
    notifier.subscribe(lambda tid, oids: told.set())
    notifier.note(0, 1, frozenset())
    with notifier.lock:
        flusher = threading.Thread(target=notifier.flush)
        flusher.start()
        assert not told.wait(0.2)
    flusher.join(10)
    assert told.is_set()
