"""dobbin.notify: subscribers told in tid order, once each record is durable."""

import logging
import threading
import time

import pytest
from zope.interface.verify import verifyObject

from dobbin.exc import StorageError
from dobbin.interfaces import INotifier
from dobbin.notify import Notifier


class FakeLog:
    """What a Notifier reads of its log: how far the file is durable."""

    def __init__(self, durability="fsync"):
        self.durability = durability
        self.synced_end = 0
        self.broken = None
        self.path = "fake.dobbin"
        self.flushed = []

    def flush(self, end):
        self.flushed.append(end)
        self.synced_end = max(self.synced_end, end)


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


def test_another_writers_record_is_made_durable_before_subscribers_hear_of_it():
    log = FakeLog()
    notifier = Notifier(log)
    notifier.note(100, 1, frozenset({5}), ours=False)
    notifier.flush()
    assert log.flushed == [], "no subscriber: no fsync for nobody"
    told = []
    notifier.subscribe(lambda tid, oids: told.append((tid, log.synced_end)))
    notifier.note(200, 2, frozenset({6}), ours=False)
    notifier.note(300, 3, frozenset({7}))  # ours: our writer syncs it, then flushes
    notifier.flush()
    assert log.flushed == [200] and told == [(2, 200)]


def test_a_failed_fsync_of_another_writers_record_is_logged_and_told(caplog):
    log = FakeLog()

    def failing_flush(end):
        log.broken = OSError(5, "Input/output error")
        raise StorageError("fsync of fake.dobbin failed")

    log.flush = failing_flush
    notifier = Notifier(log)
    told = []
    notifier.subscribe(lambda tid, oids: told.append(tid))
    notifier.note(100, 1, frozenset(), ours=False)
    with caplog.at_level(logging.WARNING, logger="dobbin"):
        notifier.flush()
    assert told == [1], "as after a failed fsync of our own: the database shows the change"
    assert "could not make transactions up to offset 100 durable" in caplog.text


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


def test_a_second_database_tells_of_a_commit_only_once_it_is_durable(tmp_path, monkeypatch):
    # It told its subscribers as soon as it caught up, while the writer's
    # fsync had not even started: a broker on it broadcast a transaction
    # that a power cut could still take back.
    import transaction

    import dobbin.log
    from dobbin.database import Database
    from dobbin.persistent import PersistentDict, checkout

    path = str(tmp_path / "db")
    writer = Database(path)
    writer.elect(PersistentDict())
    transaction.commit()
    reader = Database(path)
    syncs = []
    real_fdatasync = dobbin.log._fdatasync
    monkeypatch.setattr(dobbin.log, "_fdatasync", lambda fd: (real_fdatasync(fd),
                                                             syncs.append(fd)))
    writer_synced = threading.Event()
    release = threading.Event()
    real_flush = writer._log.flush

    def slow_flush(end):  # a busy disk: the writer's fsync has not started
        release.wait(10)
        real_flush(end)
        writer_synced.set()

    monkeypatch.setattr(writer._log, "flush", slow_flush)
    told = []
    reader.subscribe(lambda tid, oids: told.append((tid, writer_synced.is_set(), list(syncs))))

    def commit():
        checkout(writer.root)
        writer.root["x"] = 1
        transaction.commit()

    thread = threading.Thread(target=commit)
    thread.start()
    try:
        for _ in range(500):
            reader.sync()
            if told:
                break
            time.sleep(0.01)
    finally:
        release.set()
        thread.join(10)
    assert told, "the reader never caught up"
    tid, writer_done, synced_before = told[0]
    assert tid == writer.last_tid
    assert writer_done or reader._log.fd in synced_before, "told before any fsync covered it"
    writer.close()
    reader.close()
