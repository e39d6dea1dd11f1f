"""Tests of dobbin.session: a thread's transaction from first checkout to
commit or abort, failed commits, savepoints, threads that commit under
one another, and retries with transaction.manager.attempts()."""

import json
import os
import sys
import threading

import pytest
import transaction

import dobbin.log

from conftest import commit_in_thread, two_databases
from dobbin.btree import OOBTree
from dobbin.exc import (ConflictError, DobbinError, LockTimeoutError, ObjectGraphError,
                        StorageError, WriteConflictError)
from dobbin.log import FAILED, Log
from dobbin.persistent import Persistent, PersistentDict, checked_out, checkout
from dobbin.session import transaction_checkouts

READ_ONLY = "Can't set attribute in read-only mode."


def stored_pair(open_db):
    """A db whose root has two children a and b, with a.x == b.x == 0."""
    db = open_db()
    root, a, b = Persistent(), Persistent(), Persistent()
    for obj in (root, a, b):
        checkout(obj)
    root.a, root.b = a, b
    a.x = b.x = 0
    db.elect(root)
    transaction.commit()
    return db, root, a, b


# -- abort -----------------------------------------------------------------------

def test_abort_leaves_next_transaction_working(open_db):
    db, _root, a, _b = stored_pair(open_db)
    checkout(a)
    a.x = 1
    transaction.abort()
    assert a.x == 0 and not checked_out(a)
    checkout(a)
    a.x = 2
    transaction.commit()
    assert a.x == 2
    db.close()
    assert open_db().root.a.x == 2


# -- failed commits ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same database", "other database"])
def test_failed_commit_shows_latest_committed_state_then_read_only_after_abort(
        open_db, start_thread, where):
    db, _root, a, b = stored_pair(open_db)
    theirs = a if where == "same database" else open_db().root.a
    checkout(a)
    checkout(b)
    a.x, b.x = "ours", "ours"
    commit_in_thread(start_thread, theirs, x="theirs")
    with pytest.raises(ConflictError):
        transaction.commit()
    # Still checked out, now showing the latest committed states.
    assert checked_out(a) and checked_out(b)
    assert (a.x, b.x) == ("theirs", 0)
    transaction.abort()
    for obj in (a, b):
        assert not checked_out(obj)
        with pytest.raises(RuntimeError, match="^Can't set attribute in read-only mode.$"):
            obj.x = "after abort"
    assert (a.x, b.x) == ("theirs", 0)


def test_an_error_names_an_object_by_class_and_oid_not_by_its_repr(open_db, tmp_path):
    # The repr of a mapping shows every item, loading every object in it:
    # one such error was 3.2 MB long, and loaded 20,000 objects first.
    db, root, a, _b = stored_pair(open_db)
    big = PersistentDict({n: PersistentDict(n=n) for n in range(1000)})
    checkout(big)
    with pytest.raises(ObjectGraphError, match="not connected to graph") as caught:
        transaction.commit()
    assert str(caught.value) == "%s not connected to graph." % object.__repr__(big)
    transaction.abort()
    other = open_db(str(tmp_path / "other.dobbin"))
    other.elect(big)
    transaction.commit()
    checkout(a)
    a.x = big
    with pytest.raises(DobbinError, match="another database") as caught:
        transaction.commit()
    transaction.abort()
    assert "(oid %d) of another database" % big._p_oid in str(caught.value)
    assert len(str(caught.value)) < 300


def test_unconnected_new_object_raises_object_graph_error(open_db):
    db, _root, a, _b = stored_pair(open_db)
    count, objects = db.tx_count, len(db)
    orphan = Persistent()
    checkout(orphan)
    orphan.name = "Karla"
    with pytest.raises(ObjectGraphError, match="not connected to graph") as caught:
        transaction.commit()
    assert repr(orphan) in str(caught.value)
    transaction.abort()

    # With a stored object in the same commit: a failed record, nothing applied.
    checkout(orphan)
    checkout(a)
    a.x = 1
    with pytest.raises(ObjectGraphError, match="not connected to graph"):
        transaction.commit()
    assert db.tx_count == count + 1
    assert len(db) == objects
    assert orphan._p_oid is None and orphan._p_jar is None
    transaction.abort()
    assert a.x == 0


class FailingDataManager:
    """Another resource in the transaction, failing in `phase`; `key`
    places it before or after the Dobbin session in the commit order."""

    def __init__(self, phase, key, error=ValueError):
        self.phase, self.key, self.error = phase, key, error
        self.transaction_manager = transaction.manager

    def sortKey(self):
        return self.key

    def _maybe_fail(self, phase):
        if phase == self.phase:
            raise self.error("the other resource refused in " + phase)

    def tpc_begin(self, txn):
        self._maybe_fail("tpc_begin")

    def commit(self, txn):
        self._maybe_fail("commit")

    def tpc_vote(self, txn):
        self._maybe_fail("tpc_vote")

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass

    def abort(self, txn):
        pass


def commit_failing_beside(open_db, manager, expected):
    """Change a stored object, commit with `manager` in the transaction
    (the commit raises `expected`), abort; return (db, a, b, tx_count before)."""
    db, _root, a, b = stored_pair(open_db)
    count = db.tx_count
    checkout(a)
    a.x = "never"
    transaction.get().join(manager)
    with pytest.raises(expected):
        transaction.commit()
    transaction.abort()
    return db, a, b, count


def last_record_note(db):
    log = Log(db.path, read_only=True)
    try:
        record = list(log.follow())[-1]
    finally:
        log.close()
    return record.status, json.loads(record.entries[0].data)


@pytest.mark.parametrize("phase", ["tpc_begin", "commit", "tpc_vote"])
@pytest.mark.parametrize("key", ["a-before-dobbin", "z-after-dobbin"])
def test_another_resource_failing_fails_our_commit_recorded_and_unapplied(
        open_db, phase, key):
    db, a, _b, count = commit_failing_beside(open_db, FailingDataManager(phase, key),
                                             ValueError)
    assert a.x == 0
    if phase == "tpc_begin" and key.startswith("a-"):
        # It failed before our tpc_begin: this database was never locked.
        assert db.tx_count == count
        return
    assert db.tx_count == count + 1  # recorded and counted
    assert last_record_note(db) == (FAILED, {
        "error": "ValueError", "message": "the other resource refused in " + phase})
    db.close()
    assert open_db(db.path).root.a.x == 0


class UnprintableError(Exception):
    """Another store's error: a bytes oid, and a __str__ that fails."""

    oid = b"\x00\x00\x00\x00\x00\x00\x00\x07"

    def __str__(self):
        raise RuntimeError("no message")


def test_a_strange_error_of_another_resource_is_recorded_and_unlocks(open_db, start_thread):
    db, _a, b, count = commit_failing_beside(
        open_db, FailingDataManager("tpc_vote", "z", UnprintableError), UnprintableError)
    assert db.tx_count == count + 1
    assert last_record_note(db) == (FAILED, {
        "error": "UnprintableError", "message": "(its message could not be read)"})
    commit_in_thread(start_thread, b, x="unlocked")  # would time out on a held lock
    assert b.x == "unlocked"


def test_a_database_failing_to_lock_leaves_no_failed_record_in_the_others(
        open_db, tmp_path, monkeypatch):
    first, second = two_databases(open_db, tmp_path)
    counts = [db.tx_count for db in (first, second)]

    def locked_elsewhere():
        raise LockTimeoutError("held by another process")

    monkeypatch.setattr(second, "_p_commit_begin", locked_elsewhere)
    checkout(first.root)
    checkout(second.root)
    first.root.x = second.root.x = 1
    with pytest.raises(LockTimeoutError):
        transaction.commit()
    transaction.abort()
    # Not a commit that failed in a locked database: one that never began.
    assert [db.tx_count for db in (first, second)] == counts
    monkeypatch.undo()
    checkout(first.root)
    first.root.x = 2
    transaction.commit()  # first was unlocked
    assert first.root.x == 2


def test_an_interrupt_in_another_resource_aborts_without_a_failed_record(open_db):
    db, a, _b, count = commit_failing_beside(
        open_db, FailingDataManager("tpc_vote", "z", KeyboardInterrupt), KeyboardInterrupt)
    assert (a.x, db.tx_count) == (0, count)


# -- what runs inside commit() -------------------------------------------------------------

def test_a_subscriber_run_by_the_committing_thread_cannot_check_out_or_write(open_db):
    # It used to join the finishing session: its change was dropped unseen,
    # and a write went into the state just published to every thread.
    db, _root, a, b = stored_pair(open_db)
    errors = []

    def on_commit(tid, oids):
        for change in (lambda: checkout(b), lambda: setattr(a, "x", "in the subscriber")):
            try:
                change()
            except (DobbinError, RuntimeError) as error:
                errors.append(str(error))

    db.subscribe(on_commit)
    checkout(a)
    a.x = 1
    transaction.commit()
    assert "transaction is committing" in errors[0] and errors[1] == READ_ONLY
    assert (a.x, b.x) == (1, 0) and not checked_out(a) and not checked_out(b)
    db.close()
    assert open_db().root.a.x == 1


def test_len_of_a_b_tree_in_the_committing_thread_s_subscriber(open_db):
    from dobbin.btree import OOBTree
    db = open_db()
    tree = OOBTree()
    checkout(tree)
    tree.update((n, n) for n in range(10))
    db.elect(tree)
    transaction.commit()
    seen = []
    db.subscribe(lambda tid, oids: seen.append((len(tree), len(list(tree)))))
    tree[10] = 10
    transaction.commit()
    assert seen == [(11, 11)]  # was (12, 11): this commit's insert counted twice


def test_checking_out_in_an_after_commit_hook_is_a_dobbin_error(open_db):
    db, _root, a, _b = stored_pair(open_db)
    errors = []

    def hook(committed):
        try:
            checkout(a)
        except DobbinError as error:  # was the transaction package's ValueError
            errors.append(str(error))

    checkout(a)
    a.x = 1
    transaction.get().addAfterCommitHook(hook)
    transaction.commit()
    assert "transaction is committed" in errors[0] and not checked_out(a)


# -- threads ----------------------------------------------------------------------------

def test_other_threads_commit_never_discards_our_uncommitted_changes(
        open_db, start_thread):
    db, _root, a, b = stored_pair(open_db)
    checkout(a)
    a.x = "main"
    new = Persistent()
    checkout(new)
    a.new = new
    new.name = "new"
    commit_in_thread(start_thread, b, x="thread")
    assert (a.x, a.new.name) == ("main", "new")
    assert b.x == "thread"
    transaction.commit()
    db.close()
    root = open_db().root
    assert (root.a.x, root.a.new.name, root.b.x) == ("main", "new", "thread")


def test_checked_out_objects_do_not_change_until_transaction_ends(open_db, start_thread):
    db, _root, a, _b = stored_pair(open_db)
    checked = threading.Event()
    committed = threading.Event()

    def reader():
        checkout(a)
        a.y = "reader"
        checked.set()
        assert committed.wait(10)
        seen = (a.x, a.y)
        transaction.abort()
        return seen, a.x, hasattr(a, "y")

    thread = start_thread(reader)
    assert checked.wait(10)
    checkout(a)
    a.x = "main"
    transaction.commit()
    committed.set()
    seen_checked_out, seen_after, has_y = thread.join()
    assert seen_checked_out == (0, "reader")  # the main thread's commit is invisible
    assert seen_after == "main" and not has_y  # until the transaction ends


def test_new_thread_never_inherits_checkouts_of_a_dead_thread(open_db):
    # A thread that dies inside a transaction never ends it.  Thread ids
    # are reused (on Linux at once), so a later thread may get the same
    # id: it must still start with no checkout of its own.
    db, _root, a, _b = stored_pair(open_db)
    seen = {}

    def leave_checked_out():
        seen["dead"] = threading.get_ident()
        checkout(a)
        a.x = "uncommitted"

    def start_afresh():
        if threading.get_ident() != seen["dead"]:
            return
        seen["reused"] = True
        seen["checked out"] = checked_out(a)
        seen["x"] = a.x
        checkout(a)
        a.x = "new thread"
        transaction.commit()

    for _ in range(20):
        for target in (leave_checked_out, start_afresh):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join(30)
        if seen.get("reused"):
            break
    else:
        pytest.skip("this platform did not reuse a thread id in 20 tries")
    assert (seen["checked out"], seen["x"]) == (False, 0)
    assert a.x == "new thread"
    db.close()
    assert open_db().root.a.x == "new thread"


# -- savepoints ------------------------------------------------------------------------------

def test_savepoint_rollback_restores_working_copies(open_db):
    db, _root, a, b = stored_pair(open_db)
    checkout(a)
    a.x = 1
    a.items = [1]
    savepoint = transaction.savepoint()
    a.x = 2
    a.items.append(2)
    del a.items
    checkout(b)  # checked out after the savepoint
    b.x = 2
    savepoint.rollback()
    assert (a.x, a.items) == (1, [1])
    assert checked_out(a)
    assert not checked_out(b) and b.x == 0
    with pytest.raises(RuntimeError, match=READ_ONLY):
        b.x = 3


def test_commit_after_rollback_stores_rolled_back_state(open_db):
    db, _root, a, b = stored_pair(open_db)
    checkout(a)
    a.x = 1
    savepoint = transaction.savepoint()
    a.x = 2
    checkout(b)
    b.x = 2
    savepoint.rollback()
    transaction.commit()
    assert (a.x, b.x) == (1, 0)
    db.close()
    root = open_db().root
    assert (root.a.x, root.b.x) == (1, 0)


def test_nested_savepoints_roll_back_in_turn(open_db):
    db, root, a, _b = stored_pair(open_db)
    checkout(a)
    a.x = 1
    outer = transaction.savepoint()
    a.x = 2
    new = Persistent()
    checkout(new)
    new.name = "new"
    a.new = new
    inner = transaction.savepoint()
    a.x = 3
    new.name = "renamed"
    inner.rollback()
    assert (a.x, a.new.name) == (2, "new")
    outer.rollback()
    assert a.x == 1 and not hasattr(a, "new")
    assert not checked_out(new)
    transaction.commit()
    db.close()
    root = open_db().root
    assert root.a.x == 1 and not hasattr(root.a, "new")


def test_savepoint_before_first_checkout_then_changes_commit(open_db):
    db, _root, a, _b = stored_pair(open_db)
    count = db.tx_count
    savepoint = transaction.savepoint()  # no data manager has joined yet
    checkout(a)
    a.x = 1
    savepoint.rollback()
    assert a.x == 0 and not checked_out(a)
    checkout(a)
    a.x = 2
    transaction.commit()
    assert db.tx_count == count + 1
    assert not checked_out(a)
    db.close()
    assert open_db().root.a.x == 2


# -- retrying conflicts ---------------------------------------------------------------------

def test_attempts_retries_conflict_error(open_db, start_thread):
    db, _root, a, _b = stored_pair(open_db)
    errors = []
    tries = 0
    for attempt in transaction.manager.attempts(3):
        with attempt:
            tries += 1
            checkout(a)
            if tries == 1:  # lose a race, once
                commit_in_thread(start_thread, a, x=a.x + 10)
            a.x += 1
            try:
                transaction.commit()
            except ConflictError as error:
                errors.append(error)
                raise
    assert tries == 2
    assert [type(error) for error in errors] == [WriteConflictError]
    assert a.x == 11
    db.close()
    assert open_db().root.a.x == 11


def test_copy_state_copies_values_and_keeps_references_and_sharing():
    from dobbin.session import copy_state

    other = Persistent()
    flat = [1, "two", other, None]
    nested = [flat, {"deep": [3]}]
    state = {"n": 1, "flat": flat, "again": flat, "nested": nested, "pair": (flat, 2)}
    copied = copy_state(state)
    assert copied == state
    assert copied["flat"] is not flat and copied["flat"][2] is other
    assert copied["again"] is copied["flat"]  # shared inside the state: still shared
    assert copied["nested"][0] is copied["flat"]
    assert copied["nested"][1]["deep"] is not nested[1]["deep"]
    assert copied["pair"][0] is copied["flat"]
    copied["flat"].append("mine")
    copied["nested"][1]["deep"].append(4)
    assert flat == [1, "two", other, None] and nested[1] == {"deep": [3]}


class Label:
    """Hashable by identity and mutable: may sit in a frozenset."""

    def __init__(self, text):
        self.text = text


def test_copy_state_copies_what_frozensets_and_tuples_hold_unless_it_cannot_change():
    from dobbin.session import copy_state

    other = Persistent()
    plain = frozenset(["a", 1, other])
    pair = ("a", other)
    state = {"plain": plain, "pair": pair, "labels": frozenset([Label("kept")]),
             "listed": [frozenset([Label("kept")])], "held": (Label("kept"),)}
    copied = copy_state(state)
    assert copied["plain"] is plain and copied["pair"] is pair
    for value in (next(iter(copied["labels"])), next(iter(copied["listed"][0])),
                  copied["held"][0]):
        value.text = "changed"
    assert [next(iter(state["labels"])).text, next(iter(state["listed"][0])).text,
            state["held"][0].text] == ["kept", "kept", "kept"]


def test_a_state_nested_past_the_recursion_limit_fails_to_copy_clearly():
    # A bare RecursionError came out of checkout() (a value that nests
    # less deeply than that fails as deep in the call stack).
    from dobbin.session import copy_state

    nested = []
    for _ in range(sys.getrecursionlimit()):
        nested = [nested, {}]  # not a list of plain values: deepcopy walks it
    with pytest.raises(DobbinError, match="'nested' nests too deeply to be copied"):
        copy_state({"nested": nested})


class Uncopyable:
    def __deepcopy__(self, memo):
        raise ValueError("not today")


def test_a_value_that_fails_to_copy_fails_the_checkout_clearly():
    # Its own exception came out of checkout() (a TypeError from copy's
    # internals for a value whose reduce does not fit its __init__).
    from dobbin.session import copy_state

    with pytest.raises(DobbinError, match="'odd' cannot be copied: ValueError: not today"):
        copy_state({"odd": [Uncopyable()]})


def test_a_failed_write_to_one_database_lets_the_others_of_the_transaction_go(
        tmp_path, open_db, monkeypatch):
    first, second = two_databases(open_db, tmp_path)
    for db in (first, second):
        checkout(db.root)
        db.root.child = Persistent()
    new_child = second.root.child

    def no_space(buffers, offset):
        raise OSError(28, "No space left on device")

    failed_child = first.root.child
    monkeypatch.setattr(first._log, "_write", no_space)
    with pytest.raises(StorageError):
        transaction.commit()
    transaction.abort()
    assert new_child._p_oid is None, "the second database took its oid back"
    assert failed_child._p_oid is None and failed_child._p_jar is None, \
        "the failing database took its own back too"
    second._lock.acquire(timeout=0)  # not left held
    second._lock.release()
    checkout(second.root)
    second.root.n = 1
    transaction.commit()
    assert second.root.n == 1


def test_a_failing_sync_after_publication_still_publishes_every_database(
        tmp_path, open_db, monkeypatch):
    # The first database published, failed its fsync, and the second was
    # then never written: half a transfer, on disk too.
    first, second = two_databases(open_db, tmp_path)
    checkout(first.root)
    checkout(second.root)
    first.root.balance, second.root.balance = -100, 100

    def failing_sync(fd):
        raise OSError(5, "Input/output error")

    arm = FailingDataManager(None, "z-after-dobbin")
    arm.tpc_vote = lambda txn: monkeypatch.setattr(dobbin.log, "_fdatasync", failing_sync)
    transaction.get().join(arm)
    with pytest.raises(StorageError, match="fsync of .* failed"):
        transaction.commit()
    transaction.abort()
    monkeypatch.undo()
    assert (first.root.balance, second.root.balance) == (-100, 100)
    for db in (first, second):
        db.close()
        assert open_db(db.path).root.balance == db.root.balance


@pytest.mark.parametrize("phase, key", [("commit", "z-after-dobbin"),
                                        ("tpc_vote", "z-after-dobbin"),
                                        ("tpc_vote", "a-before-dobbin")])
@pytest.mark.parametrize("change", ["write", "checkout", "tree"])
def test_changes_made_once_our_states_are_written_are_refused(open_db, phase, key, change):
    # They were published to every thread but never written, or dropped.
    db, root, a, b = stored_pair(open_db)
    checkout(root)
    root.tree = OOBTree()
    transaction.commit()
    count = db.tx_count
    checkout(a)
    a.x = 1
    root.tree[1] = "one"  # checked out, and a shortcut for the next insert
    late = FailingDataManager(None, key)

    def change_late(txn):
        if change == "write":
            a.x = 2
        elif change == "checkout":
            checkout(b)
        else:
            root.tree[2] = "two"

    setattr(late, phase, change_late)
    transaction.get().join(late)
    with pytest.raises(DobbinError, match="committing and has written its objects"):
        transaction.commit()
    transaction.abort()
    assert (a.x, b.x, dict(root.tree)) == (0, 0, {})
    assert db.tx_count == count + 1  # the failed commit, recorded
    checkout(a)  # and the thread may change objects again
    a.x = 3
    transaction.commit()
    db.close()
    assert open_db(db.path).root.a.x == 3


@pytest.mark.parametrize("undo", ["rollback", "elect another"])
def test_an_election_undone_gives_the_object_its_database_back(open_db, tmp_path, undo):
    # It kept the database: stored in another one it failed as "another
    # database's", and checked out unconnected it was written as garbage.
    first, second = two_databases(open_db, tmp_path)
    counts = len(first), len(second)
    checkout(first.root)  # the session has joined: a savepoint covers elect()
    savepoint = transaction.savepoint()
    candidate = PersistentDict()
    first.elect(candidate)
    if undo == "rollback":
        savepoint.rollback()
    else:
        first.elect(first.root)
    assert candidate._p_jar is None
    checkout(candidate)
    with pytest.raises(ObjectGraphError, match="not connected to graph"):
        transaction.commit()
    transaction.abort()
    assert (len(first), len(second)) == counts
    first.elect(candidate)
    first.elect(first.root)
    checkout(second.root)
    second.root.moved = candidate  # another database takes it
    transaction.commit()
    assert candidate._p_jar is second and (len(first), len(second)) == (counts[0], counts[1] + 1)


def test_a_new_transaction_skips_a_database_that_closes_as_it_syncs(open_db, monkeypatch):
    # transaction.begin() raised ReadOnlyError from a database another
    # thread closed during its synchronizer's sync.
    db = open_db()
    db.elect(Persistent())
    transaction.commit()
    follow = db._log.follow

    def closing_follow():
        db.close()
        return follow()
    monkeypatch.setattr(db._log, "follow", closing_follow)
    transaction.begin()
    assert db.closed


def test_two_database_objects_on_one_file_in_one_transaction_are_refused(open_db):
    first = open_db()
    first.elect(Persistent())
    transaction.commit()
    second = open_db(first.path, lock_timeout=2)  # the same file, opened again
    checkout(first.root)
    checkout(second.root)
    first.root.x = second.root.x = 1
    with pytest.raises(DobbinError, match="same file"):
        transaction.commit()  # at once: not a wait for a lock this thread holds
    transaction.abort()
    checkout(second.root)
    second.root.x = 2
    transaction.commit()
    first.sync()
    assert first.root.x == 2


def test_a_full_disk_fails_the_vote_and_half_applies_nothing(tmp_path, open_db):
    first, second = two_databases(open_db, tmp_path)
    counts = [db.tx_count for db in (first, second)]
    checkout(first.root)
    checkout(second.root)
    first.root.balance, second.root.balance = -100, 100  # a transfer: both or neither
    second.root.receipt = "x" * 400_000  # more than the space reserved already

    def no_space(offset, length):
        raise OSError(28, "No space left on device")

    second._log._allocate = no_space
    with pytest.raises(StorageError, match="no room"):
        transaction.commit()
    transaction.abort()
    del second._log._allocate
    for db, count in zip((first, second), counts):
        assert not hasattr(db.root, "balance")
        assert db.tx_count == count + 1  # the failed commit, recorded and counted
    checkout(first.root)
    checkout(second.root)
    first.root.balance, second.root.balance = -100, 100
    transaction.commit()  # neither log was left refusing writes
    assert (first.root.balance, second.root.balance) == (-100, 100)


def test_databases_lock_in_one_order_however_their_paths_are_spelled(
        open_db, tmp_path, monkeypatch):
    # Two processes naming the same files differently must still take
    # their locks in one order, or each may wait for the other's.  The
    # links sort the other way round from the files they name.
    first, second = two_databases(open_db, tmp_path)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    spellings = {}
    for target, name in (("a.dobbin", "z.dobbin"), ("b.dobbin", "0.dobbin")):
        (renamed / name).symlink_to(tmp_path / target)
        spellings[target] = open_db(str(renamed / name))
    locked = []
    for db in (first, second, *spellings.values()):
        begin = db._p_commit_begin
        monkeypatch.setattr(db, "_p_commit_begin",
                            lambda begin=begin, db=db: locked.append(db) or begin())
    for pair in ((first, second), tuple(spellings.values())):
        transaction.begin()  # catches up with the other pair's commit
        for db in pair:
            checkout(db.root)
            db.root.n = len(locked)
        transaction.commit()
    assert [os.stat(db.path).st_ino for db in locked[:2]] == \
        [os.stat(db.path).st_ino for db in locked[2:]]


def test_transaction_checkouts_lists_one_database_s_without_joining(open_db, tmp_path):
    first, second = open_db(), open_db(str(tmp_path / "second.dobbin"))
    for db in (first, second):
        db.elect(PersistentDict())
        transaction.commit()
    txn = transaction.begin()
    assert transaction_checkouts(first) == []
    assert txn._resources == []  # not joined: a commit now writes nothing
    checkout(second.root)
    checkout(first.root)
    assert [entry.obj for entry in transaction_checkouts(first)] == [first.root]
    transaction.commit()
    assert transaction_checkouts(first) == []
