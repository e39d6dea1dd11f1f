"""Sharing one file: several Database instances, in one process and in
several, see each other's commits, wait for each other's write lock, and
count right under contention.

Run with -s to see the conflict figures of the counter runs."""

import multiprocessing
import os
import traceback

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import ConflictError, LockTimeoutError
from dobbin.persistent import Persistent, PersistentDict, checkout

SPAWN = multiprocessing.get_context("spawn")
PROCESSES = 4
INCREMENTS = 150


class Counter(Persistent):
    def __init__(self):
        self.value = 0


def shared_tree(db):
    """Commit a root dict with two independent children, a and b."""
    root = PersistentDict(a=Counter(), b=Counter())
    db.elect(root)
    transaction.commit()
    return root


def set_value(obj, value):
    checkout(obj)
    obj.value = value
    transaction.commit()


def run_children(target, args_list):
    """Run `target(*args, results)` in spawned processes; return the dict
    each put on `results`, after checking that none reported an error."""
    results = SPAWN.Queue()
    children = [SPAWN.Process(target=target, args=args + (results,)) for args in args_list]
    for child in children:
        child.start()
    reports = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    for report in reports:
        assert report.get("error") is None, report["error"]
    return reports


# -- seeing each other's commits ---------------------------------------------------------------

def test_two_databases_in_one_process_see_commits_at_begin_and_at_commit(open_db):
    first = open_db()
    root = shared_tree(first)
    second = open_db()
    other = second.root
    assert other is not root
    assert other["a"].value == 0

    set_value(root["a"], 1)
    assert other["a"].value == 0  # not before its next transaction
    transaction.begin()
    assert other["a"].value == 1

    set_value(other["a"], 2)
    assert root["a"].value == 1
    set_value(root["b"], 3)  # committing catches `first` up too
    assert root["a"].value == 2
    transaction.begin()
    assert other["b"].value == 3
    assert first.tx_count == second.tx_count == 4


def _child_sees_and_commits(path, connection):
    db = Database(path)
    root = db.root
    connection.send(root["a"].value)          # 1: as found on opening
    assert connection.recv() == "committed a"
    connection.send(root["a"].value)          # 2: still the old state...
    transaction.begin()
    connection.send(root["a"].value)          # 3: ...until the next transaction
    set_value(root["b"], "child")
    connection.send("committed b")
    db.close()


def test_two_processes_see_each_others_commits(open_db):
    db = open_db()
    root = shared_tree(db)
    parent_end, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=_child_sees_and_commits, args=(db.path, child_end))
    child.start()

    def receive():
        assert parent_end.poll(60), "the child failed or hangs; see its stderr"
        return parent_end.recv()

    assert receive() == 0
    set_value(root["a"], "parent")
    parent_end.send("committed a")
    assert receive() == 0
    assert receive() == "parent"
    assert receive() == "committed b"
    child.join(60)
    assert child.exitcode == 0
    assert root["b"].value == 0  # not before our next transaction...
    set_value(root["a"], "parent again")
    assert root["b"].value == "child"  # ...or our next commit


# -- waiting for the write lock ------------------------------------------------------------------

def _hold_write_lock(path, ready, release, seconds, marker):
    """Hold `path`'s write lock until `release` is set or `seconds` pass;
    create `marker` just before letting go."""
    db = Database(path)
    db._lock.acquire()
    ready.set()
    release.wait(seconds)
    with open(marker, "w"):
        pass
    db._lock.release()
    db.close()


def hold_lock_in_child(path, tmp_path, seconds):
    ready, release = SPAWN.Event(), SPAWN.Event()
    marker = str(tmp_path / "released")
    child = SPAWN.Process(target=_hold_write_lock, args=(path, ready, release, seconds, marker))
    child.start()
    assert ready.wait(60), "the child never took the lock"
    return child, release, marker


def test_second_writer_waits_for_the_lock_of_another_process(open_db, tmp_path):
    db = open_db()
    root = shared_tree(db)
    child, _release, marker = hold_lock_in_child(db.path, tmp_path, 0.3)
    set_value(root["a"], 1)  # waits until the child lets go
    assert os.path.exists(marker), "committed while another process held the lock"
    child.join(60)
    assert child.exitcode == 0
    db.close()
    assert open_db().root["a"].value == 1


def test_lock_timeout_raises_lock_timeout_error(open_db, tmp_path):
    db = open_db(lock_timeout=0.1)
    root = shared_tree(db)
    child, release, marker = hold_lock_in_child(db.path, tmp_path, 60)
    try:
        checkout(root["a"])
        root["a"].value = 1
        with pytest.raises(LockTimeoutError) as caught:
            transaction.commit()
        message = str(caught.value)
        assert db.path in message and "write lock" in message and "0.1" in message
        assert not os.path.exists(marker)
        transaction.abort()
    finally:
        release.set()
        child.join(60)
    assert child.exitcode == 0
    set_value(root["a"], 2)  # the lock is free again
    assert db.tx_count == 2


# -- counting under contention --------------------------------------------------------------------

def commit_counting_conflicts(tally):
    """transaction.commit(), counting the ConflictErrors it raises."""
    try:
        transaction.commit()
    except ConflictError:
        tally["conflicts"] += 1
        raise


def _increment(path, key, times, start, results):
    """Increment root[key] `times` times, retrying conflicts; report the tally."""
    try:
        db = Database(path, durability="none")
        counter = db.root[key]
        start.wait(60)  # all together, for contention
        tally = {"conflicts": 0, "tries": 0, "key": key}
        for _ in range(times):
            for attempt in transaction.manager.attempts(100):
                with attempt:
                    tally["tries"] += 1
                    checkout(counter)
                    counter.value += 1
                    commit_counting_conflicts(tally)
        db.close()
        results.put(tally)
    except BaseException:
        results.put({"error": traceback.format_exc()})


def counters_db(open_db, keys):
    db = open_db(durability="none")
    root = PersistentDict((key, Counter()) for key in keys)
    db.elect(root)
    transaction.commit()
    return db, root


def test_processes_incrementing_one_counter_end_at_exact_total(open_db):
    db, root = counters_db(open_db, ["shared"])
    start = SPAWN.Barrier(PROCESSES)
    reports = run_children(_increment, [(db.path, "shared", INCREMENTS, start)] * PROCESSES)
    transaction.begin()
    assert root["shared"].value == PROCESSES * INCREMENTS == 600
    conflicts = sum(report["conflicts"] for report in reports)
    tries = sum(report["tries"] for report in reports)
    assert tries == PROCESSES * INCREMENTS + conflicts  # every conflict was retried
    print("\nshared counter: %d processes x %d increments = %d; %d conflicts retried (%s)"
          % (PROCESSES, INCREMENTS, root["shared"].value, conflicts,
             ", ".join(str(report["conflicts"]) for report in reports)))


def test_processes_incrementing_disjoint_counters_never_conflict(open_db):
    keys = ["counter %d" % n for n in range(PROCESSES)]
    db, root = counters_db(open_db, keys)
    start = SPAWN.Barrier(PROCESSES)
    reports = run_children(_increment, [(db.path, key, INCREMENTS, start) for key in keys])
    transaction.begin()
    assert [root[key].value for key in keys] == [INCREMENTS] * PROCESSES
    assert [report["conflicts"] for report in reports] == [0] * PROCESSES
    assert sum(report["tries"] for report in reports) == PROCESSES * INCREMENTS
    print("\ndisjoint counters: %d processes x %d increments; 0 conflicts"
          % (PROCESSES, INCREMENTS))
