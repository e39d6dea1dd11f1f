"""Tests of dobbin.database: oids, failed records, snapshots, conflicts
and their resolution, and the errors that wrong use of the API gets."""

import contextlib
import fcntl
import glob
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

import pytest
import transaction
from transaction.interfaces import TransientError

from conftest import (child_env, commit_in_thread, flip_bit, in_commit_order,
                      peak_bytes_allocated)
from dobbin.commit import Commit
from dobbin.database import CHECKPOINT_MIN_BYTES, Database, PersistentStream
from dobbin.exc import (ConflictError, CorruptionError, DobbinError, HistoryError, LoadError,
                        LockTimeoutError, ReadConflictError, ReadOnlyError, StorageError,
                        UnstorableError, WriteConflictError)
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, checkout
from dobbin.log import COMMITTED, Log, RootEntry
from dobbin.stream import BLOCK


class Container(Persistent):
    def __init__(self):
        self.items = []


class Tag(Persistent):
    def __init__(self, name):
        self.name = name
        self.owner = None


class TagKey:
    """A plain dict key whose hash reads a persistent Tag: loading a dict
    of them loads the tags."""

    def __init__(self, tag):
        self.tag = tag

    def __hash__(self):
        return hash(self.tag.name)

    def __eq__(self, other):
        return isinstance(other, TagKey) and self.tag.name == other.tag.name


class Recorded(Persistent):
    """Remembers every oid the database ever hands to one of its kind
    (see `_fresh_records`)."""

    handed = []


class Counter(Persistent):
    """Merges concurrent increments; records what the resolver was given."""

    calls = []

    def __init__(self):
        self.value = 0

    def _p_resolve_conflict(self, old, saved, new):
        Counter.calls.append((dict(old), dict(saved), dict(new)))
        return dict(new, value=saved["value"] + new["value"] - old["value"])


class MutatingCounter(Counter):
    """A resolver in a common style: it changes the states it is given,
    then refuses anyway."""

    def _p_resolve_conflict(self, old, saved, new):
        saved["value"] += new["value"] - old["value"]
        old["value"] = -1
        raise ConflictError("refused after changing its arguments")


class RefusingCounter(Counter):
    def _p_resolve_conflict(self, old, saved, new):
        raise ConflictError("refused")


class UndecidedCounter(Counter):
    def _p_resolve_conflict(self, old, saved, new):
        return None


class BrokenCounter(Counter):
    def _p_resolve_conflict(self, old, saved, new):
        return {}["missing"]  # a bug in the resolver


@pytest.fixture(autouse=True)
def _fresh_records(monkeypatch):
    Recorded.handed = []
    Counter.calls = []
    assign_oid = Commit._assign_oid

    def recording_assign_oid(self, obj):
        oid = assign_oid(self, obj)
        if isinstance(obj, Recorded):
            Recorded.handed.append(oid)
        return oid

    monkeypatch.setattr(Commit, "_assign_oid", recording_assign_oid)


def new_container_db(open_db, path=None, **options):
    db = open_db(**options) if path is None else open_db(path, **options)
    root = Container()
    db.elect(root)
    transaction.commit()
    return db, root


def add_new(container, count, cls=Persistent):
    """Append `count` new objects to a container in this transaction."""
    checkout(container)
    new = [cls() for _ in range(count)]
    container.items.extend(new)
    return new


def all_oids(db):
    """The oids of every object reachable from the root, by walking states."""
    seen, todo = set(), [db.root._p_oid]
    while todo:
        oid = todo.pop()
        if oid in seen:
            continue
        seen.add(oid)
        for value in db.load_state(oid)[1].get("items", []):
            todo.append(value._p_oid)
    return seen


# -- oids --------------------------------------------------------------------------------

def test_oids_unique_across_reopens(open_db):
    handed = []
    for _round in range(3):
        db = open_db()
        if db.root is None:
            db.elect(Container())
            transaction.commit()
            handed.append(db.root._p_oid)
        for _ in range(2):
            new = add_new(db.root, 3)
            transaction.commit()
            handed.extend(obj._p_oid for obj in new)
        db.close()
    assert all(isinstance(oid, int) for oid in handed)
    assert len(handed) == len(set(handed)) == 1 + 3 * 2 * 3
    db = open_db()
    assert all_oids(db) == set(handed)
    assert len(db) == len(handed)


def test_oids_unique_across_two_databases_alternating_commits(open_db):
    first, _root = new_container_db(open_db)
    second = open_db()
    handed = [first.root._p_oid]
    for _round in range(3):
        for db in (first, second):
            transaction.begin()  # both catch up with each other
            new = add_new(db.root, 2)
            transaction.commit()
            handed.extend(obj._p_oid for obj in new)
    assert len(handed) == len(set(handed)) == 13
    transaction.begin()
    assert all_oids(first) == all_oids(second) == set(handed)


def _add_objects_in_process(path, key, count, results, durability):
    try:
        db = Database(path, durability=durability)
        oids = []
        for _ in range(count):
            for attempt in transaction.manager.attempts(50):
                with attempt:
                    new = add_new(db.root[key], 1)
            oids.append(new[0]._p_oid)
        db.close()
        results.put((key, oids, None))
    except BaseException:
        results.put((key, None, traceback.format_exc()))


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_oids_unique_across_processes(open_db, durability):
    # With fsync every writer also reserves space after the records, and
    # writes its records into space another one reserved.
    db = open_db()
    root = PersistentDict(one=Container(), two=Container())
    db.elect(root)
    transaction.commit()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_add_objects_in_process,
                                 args=(db.path, key, 20, results, durability))
                 for key in ("one", "two")]
    for process in processes:
        process.start()
    ours = []
    for _ in range(10):  # this process adds objects meanwhile
        for attempt in transaction.manager.attempts(50):
            with attempt:
                new = add_new(root["one"], 1)
        ours.append(new[0]._p_oid)
    reports = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    handed = list(ours)
    for key, oids, error in reports:
        assert error is None, error
        assert len(oids) == 20
        handed.extend(oids)
    assert len(handed) == len(set(handed))
    transaction.begin()
    stored = {obj._p_oid for key in root for obj in root[key].items}
    assert set(handed) <= stored
    assert len(db) == len(stored) + 3
    assert db.verify()["ok"] and glob.glob(db.path + ".*") == []


def _elect_root_in_process(path, owner):
    db = Database(path, durability="none")
    if db.root is None:
        db.elect(PersistentDict(owner=owner))
        transaction.commit()
    db.close()


def _elect_or_join_root(db, name, elect_elsewhere):
    """The README's pattern under attempts(); `elect_elsewhere()` runs in
    the first attempt, after this one saw no root."""
    attempts = 0
    for attempt in transaction.manager.attempts(5):
        with attempt:
            attempts += 1
            if db.root is None:
                if attempts == 1:
                    elect_elsewhere()
                db.elect(PersistentDict())
                transaction.commit()
            root = db.root
            checkout(root)
            root[name] = True
    return attempts


def test_racing_root_elections_conflict_between_processes(open_db, db_path):
    db = open_db(durability="none")

    def elect_in_process():
        process = multiprocessing.get_context("spawn").Process(
            target=_elect_root_in_process, args=(db_path, "child"))
        process.start()
        process.join(60)
        assert process.exitcode == 0

    # Our election would orphan the child's root: it conflicts, and the
    # retry sees that root and adds to it.
    assert _elect_or_join_root(db, "parent", elect_in_process) == 2
    reopened = open_db(durability="none")
    assert dict(reopened.root) == {"owner": "child", "parent": True}


def test_electing_a_stored_object_keeps_its_state_loaded_or_not(open_db, db_path):
    db = open_db(durability="none")
    db.elect(PersistentDict(child=PersistentDict(name="kept")))
    transaction.commit()
    db.close()
    db = open_db(durability="none")
    child = db.root["child"]  # a ghost: its state is not loaded
    other = open_db(durability="none")
    later = other.root["child"]
    checkout(later)
    later["more"] = 1  # committed after db last read it
    transaction.commit()
    db.elect(child)
    transaction.commit()
    assert dict(db.root) == {"name": "kept", "more": 1}
    db.elect(db.root)  # again, while its state is loaded (and not checked out)
    transaction.commit()
    db.close()
    assert dict(open_db().root) == {"name": "kept", "more": 1}


def test_racing_root_elections_conflict_between_threads(open_db, start_thread):
    db = open_db(durability="none")
    other = open_db(durability="none")

    def elect_in_thread(database):
        def run():
            database.elect(PersistentDict(owner="thread"))
            transaction.commit()
        return lambda: start_thread(run).join()

    assert _elect_or_join_root(db, "first", elect_in_thread(db)) == 2
    transaction.begin()
    assert dict(db.root) == {"owner": "thread", "first": True}
    # Through another Database instance on the file too, and when the
    # transaction elects without having read the root (it saw it at elect).
    fresh = PersistentDict(owner="replacement")
    other.elect(fresh)
    start_thread(lambda: (db.elect(PersistentDict(owner="thread")),
                          transaction.commit())).join()
    with pytest.raises(ConflictError):
        transaction.commit()
    transaction.abort()
    assert other.root["owner"] == "thread"


def test_subscribers_may_sync_and_run_without_the_write_lock(open_db, start_thread):
    db = open_db(durability="none")
    root = PersistentDict(n=0, child=PersistentDict())
    db.elect(root)
    transaction.commit()
    other = open_db(durability="none")
    calls = []

    def on_commit(tid, oids):
        # sync() flushes notes too: it re-enters the notify lock.
        calls.append((tid, db.sync(), db._lock.held))
    db.subscribe(on_commit)

    def commit_through(database, value):
        def run():
            database.sync()
            theirs = database.root
            checkout(theirs)
            theirs["n"] = value
            transaction.commit()
        start_thread(run).join()
    commit_through(db, 1)  # our own commit
    assert calls == [(2, 2, False)]
    # Another instance's commits, learned while our commit catches up
    # under the lock: the callback runs once the lock is released, after a
    # commit and after a conflict alike.
    commit_through(other, 2)
    checkout(root["child"])
    root["child"]["m"] = 1
    transaction.commit()
    assert calls[1:] == [(3, 4, False), (4, 4, False)]
    checkout(root)
    root["n"] = 5
    commit_through(other, 3)
    with pytest.raises(ReadConflictError):
        transaction.commit()
    transaction.abort()
    assert calls[3:] == [(5, 6, False)]


def test_a_thread_joins_the_catch_up_at_a_load_or_any_database_call(open_db, db_path,
                                                                      start_thread):
    db = open_db(durability="none")
    db.elect(PersistentDict(n=0, child=PersistentDict(n=0)))
    transaction.commit()
    other = open_db(durability="none")  # stands for another process

    def commit_elsewhere(value):
        def run():
            other.sync()
            for obj in (other.root, other.root["child"]):
                checkout(obj)
                obj["n"] = value
            transaction.commit()
        start_thread(run).join()

    reader = open_db(durability="none")
    root = reader.root
    child = root["child"]  # a ghost: no thread has touched it yet
    seen = []

    def read(first_call):
        first_call()  # this thread's only call into the database
        for value in (1, 2):
            commit_elsewhere(value)
            transaction.begin()  # catches up, having joined
            seen.append(child["n"])
    start_thread(read, lambda: child["n"]).join()  # loading the ghost
    assert seen == [1, 2]
    for call in (reader.sync, lambda: reader.load_state(child._p_oid),
                 lambda: reader.prefetch([child])):
        seen.clear()
        start_thread(read, call).join()
        assert seen == [1, 2]


def test_a_catch_up_takes_a_whole_record_though_one_state_cannot_load(open_db, db_path,
                                                                       tmp_path, monkeypatch):
    # Another process (running newer code) commits a state that this
    # process's older version of its class cannot load, in the same record
    # as a change this process can load.
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "newer_code.py").write_text(
        "class Gadget:\n    def __setstate__(self, state):\n"
        "        raise ValueError('the older code')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "older"))
    monkeypatch.delitem(sys.modules, "newer_code", raising=False)
    db = open_db()
    db.elect(PersistentDict(first=PersistentDict(n=0), second=PersistentDict(n=0)))
    transaction.commit()
    first, second = db.root["first"], db.root["second"]
    assert (first["n"], second["n"]) == (0, 0)  # both loaded
    checkout(first)
    first["mine"] = True
    (tmp_path / "newer_code.py").write_text(
        "class Gadget:\n    def __init__(self):\n        self.size = 1\n")
    writer = (
        "import sys, transaction\n"
        "import newer_code\n"
        "from dobbin.database import Database\n"
        "from dobbin.persistent import checkout\n"
        "db = Database(sys.argv[1])\n"
        "first, second = db.root['first'], db.root['second']\n"
        "checkout(first); checkout(second)\n"
        "first['n'] = 1; first['gadget'] = newer_code.Gadget(); second['n'] = 1\n"
        "transaction.commit(); db.close()\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    subprocess.run([sys.executable, "-c", writer, db_path], env=env, check=True, timeout=60)

    with pytest.raises(ConflictError):
        transaction.commit()  # over the record it could not load: a conflict
    transaction.abort()
    transaction.begin()  # catches up, having learned of nothing more
    assert second["n"] == 1
    with pytest.raises(LoadError, match="the older code"):
        first["n"]
    sys.modules.pop("newer_code", None)
    checkout(second)
    second["n"] += 10
    transaction.commit()
    assert open_db(read_only=True).load_state(second._p_oid)[1]["_data"]["n"] == 11


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_commit_is_refused_once_the_file_was_deleted_or_replaced(open_db, db_path, how):
    db = open_db()
    db.elect(PersistentDict(n=1))
    transaction.commit()
    if how == "deleted":
        os.remove(db_path)
    else:  # a backup restored by renaming it over the file
        with open(db_path, "rb") as source, open(db_path + ".copy", "wb") as copy:
            copy.write(source.read())
        os.rename(db_path + ".copy", db_path)
    checkout(db.root)
    db.root["n"] = 2
    with pytest.raises(StorageError, match="no longer the file this database opened .it was %s"
                       % how):
        transaction.commit()  # it would have gone to a file nobody opens
    transaction.abort()
    db.close()
    if how == "replaced":
        assert Database(db_path, read_only=True).root["n"] == 1


def test_a_relative_path_keeps_naming_the_file_after_a_chdir(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    db = Database("relative.dobbin")
    monkeypatch.chdir(tmp_path / "elsewhere")
    db.elect(PersistentDict(n=1))
    transaction.commit()
    assert db.path == str(tmp_path / "relative.dobbin") and db.verify()["ok"]
    db.close()
    assert os.listdir(tmp_path / "elsewhere") == []


def test_close_waits_for_a_commit_another_thread_is_writing(open_db, db_path,
                                                            start_thread):
    # Closing under the write could send its bytes to whatever file took
    # the descriptor next; the commit must rather finish, durable.
    db = open_db()
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    writing, finish = threading.Event(), threading.Event()
    write = db._log._write

    def slow_write(buffers, offset):
        writing.set()
        finish.wait(30)
        write(buffers, offset)
    db._log._write = slow_write

    def commit():
        checkout(root)
        root["written"] = "before the close"
        transaction.commit()
    committer = start_thread(commit)
    assert writing.wait(30)
    closer = threading.Thread(target=db.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting: the writer waits for us
    finish.set()
    committer.join()
    closer.join(30)
    assert not closer.is_alive() and db._log.fd is None
    with pytest.raises(ReadOnlyError, match="closed"):
        checkout(root)
        root["after"] = 1
        transaction.commit()
    transaction.abort()
    assert open_db(db_path).root["written"] == "before the close"


def test_oids_handed_out_by_failed_conflicting_commit_never_reused(
        open_db, tmp_path, start_thread):
    # Commits lock databases in file order: "a" hands the new object an
    # oid before "b" finds the conflict.
    path_a, path_b = [db.path for db in in_commit_order(
        open_db(str(tmp_path / "1.dobbin")), open_db(str(tmp_path / "2.dobbin")))]
    db_a, root_a = new_container_db(open_db, path_a)
    _db_b, root_b = new_container_db(open_db, path_b)
    [lost] = add_new(root_a, 1, Recorded)
    checkout(root_b)
    root_b.items = ["ours"]
    commit_in_thread(start_thread, root_b, items=["theirs"])
    count_a = db_a.tx_count
    with pytest.raises(ConflictError):
        transaction.commit()
    assert Recorded.handed, "the failed commit handed out no oid: nothing tested"
    assert lost._p_oid is None
    assert db_a.tx_count == count_a + 1  # a failed record in "a" too
    failed = set(Recorded.handed)
    transaction.abort()

    later = add_new(root_a, 3) + [lost]
    root_a.items.append(lost)
    transaction.commit()
    assert not failed & {obj._p_oid for obj in later}
    db_a.close()
    reopened = open_db(path_a)
    more = add_new(reopened.root, 3)
    transaction.commit()
    assert not failed & {obj._p_oid for obj in more}
    assert not failed & all_oids(reopened)


def test_oids_handed_out_by_commit_failing_on_graph_never_reused(open_db):
    db, root = new_container_db(open_db)
    add_new(root, 2, Recorded)
    checkout(Persistent())  # unconnected: the commit fails in tpc_vote
    with pytest.raises(DobbinError, match="not connected to graph"):
        transaction.commit()
    assert len(Recorded.handed) == 2, "the failed commit handed out no oid: nothing tested"
    failed = set(Recorded.handed)
    transaction.abort()
    later = add_new(root, 3)
    transaction.commit()
    assert not failed & {obj._p_oid for obj in later}
    db.close()
    reopened = open_db()
    more = add_new(reopened.root, 3)
    transaction.commit()
    assert not failed & {obj._p_oid for obj in more}


# -- failed commits leave a record that is never applied ---------------------------------------

def test_failed_commit_is_counted_and_never_applied(open_db, start_thread):
    db = open_db()
    root = PersistentDict(a=Container(), b=Container())
    db.elect(root)
    transaction.commit()
    watcher = open_db()  # reads the log later by following it
    a, b = root["a"], root["b"]
    checkout(a)
    checkout(b)
    a.items = ["ours"]
    b.items = ["ours"]
    commit_in_thread(start_thread, a, items=["theirs"])
    count = db.tx_count
    with pytest.raises(ConflictError):
        transaction.commit()
    assert db.tx_count == count + 1
    transaction.abort()
    assert (a.items, b.items) == (["theirs"], [])
    report = db.verify()
    assert (report["ok"], report["failed"], report["records"]) == (True, 1, count + 1)

    assert watcher.sync() == count + 1
    assert watcher.tx_count == count + 1
    assert (watcher.root["a"].items, watcher.root["b"].items) == (["theirs"], [])
    db.close()
    watcher.close()
    reopened = open_db()  # reads the log from the start, under the lock
    assert reopened.tx_count == count + 1
    assert (reopened.root["a"].items, reopened.root["b"].items) == (["theirs"], [])
    assert reopened.load_state(reopened.root["b"]._p_oid)[1] == {"items": []}


def test_a_commit_leaves_nothing_of_itself_in_the_reused_writer(open_db):
    db = open_db()
    root = PersistentDict(big=["x" * 1000] * 100)
    db.elect(root)
    transaction.commit()
    # The writer's hook would hold the commit (all its states) until the next one.
    assert db._writer.reference_id is None
    checkout(root)
    root["bad"] = threading.Lock()  # unpicklable: the commit fails while pickling
    with pytest.raises(TypeError, match="pickle"):
        transaction.commit()
    transaction.abort()
    assert db._writer.reference_id is None


def test_verify_waits_for_a_record_half_written_by_a_live_writer(open_db, monkeypatch):
    writer = open_db()
    root = PersistentDict()
    writer.elect(root)
    transaction.commit()
    half_written, go = threading.Event(), threading.Event()
    real = Log._write

    def slow_write(log, buffers, offset):
        data = b"".join(bytes(b) for b in ([buffers] if isinstance(buffers, bytes) else buffers))
        real(log, data[:len(data) // 2], offset)  # into reserved space: zeros after it
        half_written.set()
        go.wait(10)
        real(log, data[len(data) // 2:], offset + len(data) // 2)

    def commit_one():
        checkout(root)
        root["n"] = 1
        transaction.commit()

    monkeypatch.setattr(Log, "_write", slow_write)
    thread = threading.Thread(target=commit_one)
    thread.start()
    assert half_written.wait(10)
    monkeypatch.undo()
    watcher = open_db(writer.path, read_only=True)
    threading.Timer(0.2, go.set).start()  # the writer finishes while verify waits
    report = watcher.verify()
    thread.join(10)
    assert report["ok"], report["errors"]
    assert report["committed"] == 2 and "incomplete_tail" not in report


def test_commit_failing_on_unpicklable_state_writes_failed_record(open_db):
    db, root = new_container_db(open_db)
    count = db.tx_count
    checkout(root)
    root.items = [threading.Lock()]
    with pytest.raises(UnstorableError, match="cannot store a Container: .*pickle"):
        transaction.commit()
    transaction.abort()
    checkout(root)
    root.items = [lambda: None]  # pickle says AttributeError of this one
    with pytest.raises(UnstorableError, match="cannot store a Container: .*lambda"):
        transaction.commit()
    transaction.abort()
    assert db.verify()["failed"] == 2
    assert db.tx_count == count + 2


@pytest.mark.parametrize("read_only", [False, True])
def test_closing_leaves_no_lock_with_a_child_forked_while_open(db_path, read_only):
    # close() took the file lock to tidy up and let it go only by closing
    # its descriptor: a child forked meanwhile kept it, and every writer
    # timed out for as long as the child lived.
    with Database(db_path) as db:
        db.elect(PersistentDict())
        transaction.commit()
    db = Database(db_path, read_only=read_only)
    pid = fork_with_threads()
    if pid == 0:
        time.sleep(30)  # a worker of a pool, say, never touching the database
        os._exit(0)
    try:
        db.close()
        with Database(db_path, lock_timeout=1) as writer:
            checkout(writer.root)
            writer.root["after"] = 1
            transaction.commit()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- snapshots -----------------------------------------------------------------------------------

def describe(db):
    """Every object reachable from the root as {oid: (class, state)}, with
    references as ("oid", n) and streams as ("stream", bytes)."""
    described, todo = {}, [db.root._p_oid]

    def plain(value):
        if isinstance(value, Persistent):
            todo.append(value._p_oid)
            return ("oid", value._p_oid)
        if isinstance(value, PersistentStream):
            return ("stream", b"".join(value))
        if isinstance(value, dict):
            return {plain(key): plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, [plain(item) for item in value])
        return value

    while todo:
        oid = todo.pop()
        if oid not in described:
            described[oid] = None
            described[oid] = (type(db.get(oid)), plain(db.load_state(oid)[1]))
    return described


def build_graph(db):
    """A root with a cycle, a dict, shared objects and two streams, over
    several transactions."""
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    child, leaf = Container(), Container()
    checkout(root)
    root["child"] = child
    root["leaf"] = leaf
    root["numbers"] = (1, 2.5, "three", b"four", None)
    transaction.commit()
    checkout(child)
    checkout(leaf)
    child.items = [leaf, root, {"nested": [leaf]}]
    leaf.items = [child]
    leaf.big = PersistentFile(io.BytesIO(bytes(range(256)) * 300))  # crosses a chunk
    leaf.small = PersistentFile(io.BytesIO(b"abc"))
    transaction.commit()
    checkout(root)
    root["counter"] = 7
    transaction.commit()
    return root


def test_snapshot_cold_reopen_gives_same_graph_in_one_transaction(open_db, tmp_path):
    db = open_db()
    build_graph(db)
    target_path = str(tmp_path / "target.dobbin")
    target = open_db(target_path)
    db.snapshot(target)
    target.close()
    target = open_db(target_path)
    assert target.tx_count == 1
    assert len(target) == len(db) == 3
    assert describe(target) == describe(db)
    assert target.root._p_oid == db.root._p_oid
    assert target.verify()["ok"]


def test_snapshot_copies_stream_bytes_into_target(open_db, db_path, tmp_path):
    db = open_db()
    build_graph(db)
    expected = describe(db)
    target_path = str(tmp_path / "target.dobbin")
    target = open_db(target_path)
    db.snapshot(target)
    db.close()
    target.close()
    os.remove(db_path)
    with open(db_path, "wb") as garbage:  # whatever sits there now is not read
        garbage.write(os.urandom(1 << 18))
    target = open_db(target_path)
    assert describe(target) == expected
    leaf = target.root["leaf"]
    leaf.big.open()
    assert leaf.big.read() == bytes(range(256)) * 300
    assert b"".join(leaf.small) == b"abc"


def test_snapshot_holds_small_streams_in_memory_up_to_a_bound(open_db, tmp_path, monkeypatch):
    # Every stream under the staging size was held whole until the one
    # record was written: memory grew with the database.
    import dobbin.snapshot
    monkeypatch.setattr(dobbin.snapshot, "HELD_STREAM_BYTES", 256 << 10)
    db = open_db()
    root = Container()
    checkout(root)
    files = [os.urandom(100 << 10) for _ in range(12)]  # 1.2 MiB, each held if alone
    root.items = [PersistentFile(io.BytesIO(data)) for data in files]
    db.elect(root)
    transaction.commit()
    target = open_db(str(tmp_path / "target.dobbin"))
    assert peak_bytes_allocated(lambda: db.snapshot(target)) < 700 << 10
    target.close()
    target = open_db(target.path)
    assert [b"".join(stream) for stream in target.root.items] == files
    assert target.verify()["ok"]


def test_snapshot_copies_a_large_stream_block_by_block(open_db, tmp_path):
    data = os.urandom(6 * BLOCK + 5)
    db = open_db()
    root = Persistent()
    checkout(root)
    root.big = PersistentFile(io.BytesIO(data))
    db.elect(root)
    transaction.commit()
    target = open_db(str(tmp_path / "target.dobbin"))
    # A few chunks, never the whole stream (6 blocks).
    assert peak_bytes_allocated(lambda: db.snapshot(target)) < BLOCK
    target.close()
    target = open_db(target.path)
    assert b"".join(target.root.big) == data and target.verify()["ok"]


def test_snapshot_until_gives_state_as_of_that_transaction(open_db, tmp_path):
    db, root = new_container_db(open_db)
    first = add_new(root, 2)
    transaction.commit()
    until = db.last_tid
    expected = describe(db)
    add_new(root, 1)
    checkout(first[0])
    first[0].changed = True
    checkout(root)
    root.stream = PersistentFile(io.BytesIO(b"later"))
    transaction.commit()
    other = Container()
    db.elect(other)  # a new root, later still
    transaction.commit()

    target_path = str(tmp_path / "target.dobbin")
    target = open_db(target_path)
    db.snapshot(target, until=until)
    target.close()
    target = open_db(target_path)
    assert target.tx_count == 1
    assert len(target) == 3
    assert describe(target) == expected
    assert not hasattr(target.root, "stream")
    assert not hasattr(target.get(first[0]._p_oid), "changed")


def test_a_big_snapshot_is_opened_from_a_checkpoint_not_replayed(open_db, tmp_path):
    # Its one record had no checkpoint after it: every open replayed it,
    # reading and checking every state and every stored file's bytes.
    db, root = new_container_db(open_db)
    checkout(root)
    root.big = PersistentFile(io.BytesIO(os.urandom(CHECKPOINT_MIN_BYTES * 4)))
    add_new(root, 200)
    transaction.commit()
    target = open_db(str(tmp_path / "target.dobbin"))
    db.snapshot(target)
    target.close()
    log = Log(target.path, read_only=True)
    try:
        checkpoint = log.open_checkpoint()
        assert checkpoint is not None and checkpoint.tid == 1
        assert list(log.recover()) == []  # nothing left to replay
    finally:
        log.close()
    target = open_db(target.path)
    assert len(target) == len(db) and target.verify()["ok"]


def test_a_root_entry_naming_no_stored_object_is_corruption(db_path):
    # Checksums all sound (only a forged file has one): a bare KeyError
    # came out of db.root, and verify() called the file sound.
    log = Log(db_path, durability="none")
    log.append(COMMITTED, 5, [RootEntry(3)])
    log.close()
    with Database(db_path) as db:
        report = db.verify()
        assert not report["ok"] and "root is oid 3" in report["errors"][0]
        with pytest.raises(CorruptionError, match="root is oid 3, which no record stores"):
            db.root


@pytest.mark.parametrize("until", [True, 1.0, "1", -1, 99])
def test_snapshot_until_must_be_a_transaction_id(open_db, tmp_path, until):
    db, _root = new_container_db(open_db)
    target = open_db(str(tmp_path / "target.dobbin"))
    with pytest.raises(ValueError, match="until must be a transaction id"):
        db.snapshot(target, until=until)  # True passed as tid 1
    assert target.tx_count == 0


def test_snapshot_into_non_empty_target_raises(open_db, tmp_path):
    db, _root = new_container_db(open_db)
    target = open_db(str(tmp_path / "target.dobbin"))
    target.elect(Container())
    transaction.commit()
    with pytest.raises(DobbinError, match="not empty"):
        db.snapshot(target)
    assert target.tx_count == 1
    assert target.verify()["records"] == 1


# -- conflicts -----------------------------------------------------------------------------------

def test_conflict_error_is_transient_and_names_oid_and_class(open_db, start_thread):
    db, root = new_container_db(open_db)
    checkout(root)
    root.items = ["ours"]
    commit_in_thread(start_thread, root, items=["theirs"])
    with pytest.raises(ConflictError) as caught:
        transaction.commit()
    error = caught.value
    assert isinstance(error, TransientError)
    assert error.oid == root._p_oid
    assert error.class_name == "Container"
    assert "oid %d" % root._p_oid in str(error) and "Container" in str(error)


def test_write_conflict_between_threads_of_one_database(open_db, start_thread):
    db, root = new_container_db(open_db)
    checkout(root)
    root.items = ["ours"]
    commit_in_thread(start_thread, root, items=["theirs"])
    with pytest.raises(WriteConflictError):
        transaction.commit()
    transaction.abort()
    assert root.items == ["theirs"]


def test_read_conflict_across_database_instances(open_db, start_thread):
    db, root = new_container_db(open_db)
    other = open_db()
    checkout(root)
    root.items = ["ours"]
    commit_in_thread(start_thread, other.root, items=["theirs"])
    with pytest.raises(ReadConflictError):
        transaction.commit()
    transaction.abort()
    assert root.items == ["theirs"]


@pytest.mark.parametrize("where", ["same database", "other database"])
def test_resolve_conflict_receives_committed_states(open_db, start_thread, where):
    db = open_db()
    counter = Counter()
    db.elect(counter)
    transaction.commit()
    theirs = counter if where == "same database" else open_db().root
    checkout(counter)
    counter.value += 1
    counter.note = "ours"
    commit_in_thread(start_thread, theirs, value=5, note="theirs")
    transaction.commit()
    assert Counter.calls == [({"value": 0},                  # ours at checkout
                              {"value": 5, "note": "theirs"},  # the other commit
                              {"value": 1, "note": "ours"})]   # our working copy
    assert (counter.value, counter.note) == (6, "ours")
    db.close()
    assert open_db().root.value == 6


def test_resolved_conflict_commits_both_concurrent_increments(open_db, start_thread):
    db = open_db()
    counter = Counter()
    db.elect(counter)
    transaction.commit()
    both_checked_out = threading.Barrier(2, timeout=10)

    def increment():
        checkout(counter)
        counter.value += 1
        both_checked_out.wait()
        transaction.commit()

    threads = [start_thread(increment) for _ in range(2)]
    for thread in threads:
        thread.join()
    assert len(Counter.calls) == 1
    assert counter.value == 2
    db.close()
    assert open_db().root.value == 2


def test_a_resolver_changing_its_arguments_changes_no_shared_state(open_db, start_thread):
    # It was handed the shared committed state itself: a failed commit's
    # merge showed in every thread's reads, and reached the next commit.
    db = open_db()
    counter = MutatingCounter()
    db.elect(counter)
    transaction.commit()
    checkout(counter)
    counter.value += 100
    commit_in_thread(start_thread, counter, value=1)
    with pytest.raises(WriteConflictError):
        transaction.commit()
    transaction.abort()
    assert counter.value == 1
    commit_in_thread(start_thread, counter, value=2)
    db.close()
    assert open_db().root.value == 2


@pytest.mark.parametrize("cls", [RefusingCounter, UndecidedCounter, BrokenCounter])
def test_resolver_refusing_fails_the_commit_with_conflict_error(open_db, start_thread, cls):
    db = open_db()
    counter = cls()
    db.elect(counter)
    transaction.commit()
    checkout(counter)
    counter.value += 1
    commit_in_thread(start_thread, counter, value=5)
    count = db.tx_count
    with pytest.raises(WriteConflictError) as caught:
        transaction.commit()
    assert caught.value.oid == counter._p_oid
    assert db.tx_count == count + 1
    transaction.abort()
    assert counter.value == 5


# -- the bounded cache never changes what a reader or a checkout sees --------------------------

def store_large_root(open_db):
    """A root whose loaded state costs more than a 4 KiB cache; closed."""
    db, root = new_container_db(open_db)
    checkout(root)
    root.big = "x" * 10000
    root.n = 1
    transaction.commit()
    db.close()


def test_object_larger_than_the_cache_stays_readable(open_db):
    store_large_root(open_db)
    small = open_db(cache_size=4096)
    root = small.root
    assert root.n == 1
    assert len(root.big) == 10000


def test_checkout_of_object_larger_than_the_cache_copies_its_whole_state(open_db):
    store_large_root(open_db)
    small = open_db(cache_size=4096)
    root = small.root
    checkout(root)
    root.n = 2  # only n changes; big must be stored unchanged
    transaction.commit()
    small.close()
    root = open_db().root
    assert (root.n, len(root.big), root.items) == (2, 10000, [])


# -- wrong use of the API -----------------------------------------------------------------------

def test_elect_non_persistent_raises_type_error(open_db):
    db = open_db()
    for value in ({}, [], object()):
        with pytest.raises(TypeError, match="persistent"):
            db.elect(value)
    assert db.root is None


def test_reference_to_object_of_another_database_raises_dobbin_error(open_db, tmp_path):
    db, root = new_container_db(open_db)
    _other, foreign = new_container_db(open_db, str(tmp_path / "other.dobbin"))
    with pytest.raises(DobbinError, match="another database"):
        db.elect(foreign)
    count = db.tx_count
    checkout(root)
    root.items = [foreign]
    with pytest.raises(DobbinError, match="another database"):
        transaction.commit()
    transaction.abort()
    assert db.tx_count == count + 1
    assert root.items == []


def test_electing_a_ghost_of_a_closed_database_names_it_without_loading_it(open_db, tmp_path):
    # The message was built with repr(): a ghost of a closed database said
    # "... is closed" instead, and a big mapping's message held every item.
    _other, foreign = new_container_db(open_db, str(tmp_path / "other.dobbin"))
    _other.close()
    other = open_db(_other.path)
    ghost = other.get(foreign._p_oid)
    other.close()
    db = open_db()
    with pytest.raises(DobbinError, match=r"\(oid %d\) belongs to another database \(.*other"
                       % ghost._p_oid):
        db.elect(ghost)


def test_closing_a_database_inside_its_own_commit_fails_the_commit_as_closed(open_db):
    # Another data manager of the transaction closed it: the vote raised a
    # TypeError from os.lseek(None, ...).
    db = open_db()
    db.elect(PersistentDict())
    transaction.commit()

    class Closer:
        transaction_manager = transaction.manager

        def sortKey(self):
            return "~ after dobbin"

        def tpc_begin(self, txn):
            db.close()

        commit = tpc_vote = tpc_finish = tpc_abort = abort = lambda self, txn: None

    checkout(db.root)
    db.root["x"] = 1
    transaction.get().join(Closer())
    with pytest.raises(ReadOnlyError, match="is closed"):
        transaction.commit()
    transaction.abort()


def test_bogus_durability_raises_value_error(db_path):
    with pytest.raises(ValueError, match="durability"):
        Database(db_path, durability="bogus")
    assert not os.path.exists(db_path)


@pytest.mark.parametrize("timeout, error", [("30", TypeError), (None, TypeError),
                                              (-1, ValueError), (float("inf"), ValueError),
                                              (float("nan"), ValueError)])
def test_a_wrong_lock_timeout_is_refused_before_the_file_is_opened(db_path, timeout, error):
    with pytest.raises(error, match="lock timeout"):
        Database(db_path, lock_timeout=timeout)
    assert not os.path.exists(db_path)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_lock_timeout_past_what_threading_can_wait_opens_and_closes(db_path, read_only):
    Database(db_path).close()
    db = Database(db_path, lock_timeout=1e10, read_only=read_only)
    db.close()
    assert db._log.fd is None


def fork_with_threads():
    """os.fork(), without the warning that forking a process with threads gets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@contextlib.contextmanager
def state_lock_held_in_another_thread(db):
    """`db`'s state lock held by another thread for the block, as during a
    load or a commit's publication."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with db._state_lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


def test_a_child_forked_while_a_thread_syncs_and_loads_opens_anew_and_closes(db_path):
    # The child once hung for ever: in close(), on the parent's sync in
    # progress, and in begin(), whose catch-up of the inherited database
    # waited on a lock a parent thread held.
    db = Database(db_path, durability="none")
    db.elect(PersistentDict())
    transaction.commit()
    with state_lock_held_in_another_thread(db):
        with db._log._sync_done:
            db._log._syncing = True  # as during a parent thread's fsync
        pid = fork_with_threads()
        if pid == 0:
            code = 1
            try:
                fresh = Database(db_path, durability="none")
                transaction.begin()
                checkout(fresh.root)
                fresh.root["child"] = os.getpid()
                transaction.commit()
                fresh.close()
                db.close()
                code = 0 if not db.in_this_process else 2
            finally:
                os._exit(code)
        try:
            for _ in range(1000):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            with db._log._sync_done:
                db._log._syncing = False
                db._log._sync_done.notify_all()
    transaction.begin()
    assert db.in_this_process and db.root["child"] == pid
    db.close()


def test_a_forked_child_cannot_probe_the_write_lock_its_parent_holds(db_path):
    # The probe once took the flock the child shares with its parent and
    # dropped it: another writer then committed inside the parent's commit,
    # and both transactions were cut off as a torn tail at the next open.
    db = Database(db_path, durability="none")
    db._lock.acquire()  # as during a commit
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                db.write_lock_busy()
            except DobbinError:
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        probe = os.open(db_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still ours
        finally:
            os.close(probe)
    finally:
        db._lock.release()
    db.close()


def test_a_forked_child_is_refused_what_takes_its_parents_state_lock(db_path):
    # sync() and recent_transactions() ran in the child, and hung for ever
    # when the fork caught a parent thread holding the state lock.
    db = Database(db_path, durability="none")
    db.elect(PersistentDict(a=PersistentDict()))
    transaction.commit()
    oid = db.root["a"]._p_oid
    db.close()
    db = Database(db_path, durability="none")
    with state_lock_held_in_another_thread(db):
        pid = fork_with_threads()
        if pid == 0:
            refused = 0
            try:
                signal.alarm(10)
                for use in (db.sync, db.recent_transactions, lambda: db.root,
                            lambda: db.get(oid), lambda: db.load_state(oid)):
                    try:
                        use()
                    except DobbinError as error:
                        refused += "open it anew in process %d" % os.getpid() in str(error)
                db.close()
            finally:
                os._exit(0 if refused == 5 else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert db.root["a"]._p_oid == oid, "the parent's database works on"
    db.close()


def test_a_close_that_times_out_leaves_the_database_open_to_close_again(db_path):
    db = Database(db_path, durability="none", lock_timeout=0.2)
    holding, release = threading.Event(), threading.Event()

    def write_for_long():  # as a commit staging a big file does
        db._lock.acquire()
        holding.set()
        release.wait(30)
        db._lock.release()

    writer = threading.Thread(target=write_for_long)
    writer.start()
    holding.wait(10)
    try:
        with pytest.raises(LockTimeoutError):
            db.close()
        assert not db.closed  # once: closed, its file open for good
    finally:
        release.set()
        writer.join()
    db.close()
    assert db.closed and db._log.fd is None


@pytest.mark.parametrize("read_only", [False, True])
def test_subscribers_hear_of_commits_after_the_open_only(open_db, db_path, read_only):
    writer = open_db()
    writer.elect(PersistentDict(n=0))
    transaction.commit()
    for n in range(1, 4):
        checkout(writer.root)
        writer.root["n"] = n
        transaction.commit()
    reader = open_db(read_only=read_only)
    heard = []
    reader.subscribe(lambda tid, oids: heard.append(tid))
    checkout(writer.root)
    writer.root["n"] = 4
    transaction.commit()
    reader.sync()
    assert heard == [writer.last_tid]  # not the commits the open read


@pytest.mark.parametrize("interrupted", ["sync", "commit"])
def test_an_interrupted_catch_up_refuses_to_go_on_behind_the_file(open_db, db_path, monkeypatch,
                                                                  interrupted):
    # KeyboardInterrupt (or a timeout's exception) raised while another
    # writer's record was taken in: the log had read it, the index never
    # did, and the next commit overwrote it with no conflict.
    mine, theirs = open_db(), open_db()
    mine.elect(PersistentDict(n=0))
    transaction.commit()
    theirs.sync()
    checkout(theirs.root)
    theirs.root["theirs"] = True
    transaction.commit()
    real_apply = Database._apply

    def interrupted_once(db, record, *args, **kwargs):
        monkeypatch.setattr(Database, "_apply", real_apply)
        raise KeyboardInterrupt

    monkeypatch.setattr(Database, "_apply", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        if interrupted == "sync":
            mine.sync()
        else:
            checkout(mine.root)
            mine.root["n"] = 1
            transaction.commit()
    transaction.abort()
    with pytest.raises(StorageError, match="interrupted.*open it again"):
        mine.sync()
    checkout(mine.root)
    mine.root["n"] = 2
    with pytest.raises(StorageError, match="interrupted"):
        transaction.commit()
    transaction.abort()
    mine.close()
    assert open_db().root["theirs"] is True


def test_a_subscriber_must_be_callable(db_path):
    db = Database(db_path, durability="none")
    with pytest.raises(TypeError, match="subscriber"):
        db.subscribe(5)  # once accepted, then every commit logged a TypeError
    db.close()


def _commit_change(db, oid):
    root = db.root
    db.close()
    checkout(root)
    root.items = ["changed"]
    transaction.commit()


def _elect(db, oid):
    db.close()
    db.elect(Container())


def _sync(db, oid):
    db.close()
    db.sync()


def _get_unloaded(db, oid):
    db.close()
    db.get(oid)


def _root_unloaded(db, oid):
    db.close()
    db.root


@pytest.mark.parametrize("use", [
    _commit_change, _elect, _sync,
    _get_unloaded, _root_unloaded,
], ids=lambda use: use.__name__.strip("_"))
def test_closed_database_raises_read_only_error(open_db, use):
    db, root = new_container_db(open_db)
    [child] = add_new(root, 1)
    transaction.commit()
    with pytest.raises(ReadOnlyError, match="closed"):
        use(open_db(), child._p_oid)


def test_write_lock_busy_sees_another_writer_and_not_a_closed_file(open_db, db_path):
    db = open_db()
    assert not db.write_lock_busy()
    fd = os.open(db_path, os.O_RDWR)  # another open file: as another process would
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert db.write_lock_busy()
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert not db.write_lock_busy()
    finally:
        os.close(fd)
    db.close()
    assert not db.write_lock_busy()


def test_closed_database_stream_read_raises_read_only_error(open_db):
    db, root = new_container_db(open_db)
    checkout(root)
    root.stream = PersistentFile(io.BytesIO(b"abc"))
    transaction.commit()
    reader = open_db()
    stream = reader.root.stream
    reader.close()
    with pytest.raises(ReadOnlyError, match="closed"):
        b"".join(stream)


# -- lazy loading and the bounded cache --------------------------------------------------------

def root_of_children(db, count, **fields):
    """Commit a PersistentDict root holding `count` PersistentDicts of `fields`
    plus ``n``; return the root."""
    root = PersistentDict()
    checkout(root)
    db.elect(root)
    for n in range(count):
        root[n] = PersistentDict(fields, n=n)
    transaction.commit()
    return root


def test_opening_unpickles_no_state(open_db, monkeypatch):
    db = open_db()
    root_of_children(db, 200)
    db.close()
    loads = []
    import dobbin.database as module
    real = module.load_state
    monkeypatch.setattr(module, "load_state", lambda *a, **k: loads.append(1) or real(*a, **k))
    db = open_db()
    assert loads == [] and len(db) == 201
    assert db.root[7]["n"] == 7
    assert len(loads) == 2  # the root and the one child touched


def _children_reopened(open_db, path, count):
    db = open_db(path)
    root_of_children(db, count)
    db.close()
    db = open_db(path)
    return db, [db.root[n] for n in range(count)]


def test_prefetch_loads_the_ghosts_among_its_arguments_in_one_read(open_db, db_path,
                                                                   monkeypatch):
    db, children = _children_reopened(open_db, db_path, 20)
    _other, strangers = _children_reopened(open_db, db_path + ".other", 1)
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda *args: reads.append(args) or real(*args))
    db.prefetch(children[:10] + [1, "not persistent", None, PersistentDict(), strangers[0],
                                 children[0]])
    assert len(reads) == 1  # ten small states written together: one read
    ghosts = [object.__getattribute__(child, "_p_ghost") for child in children]
    assert ghosts == [False] * 10 + [True] * 10
    assert object.__getattribute__(strangers[0], "_p_ghost")  # another database's: left alone
    assert [child["n"] for child in children] == list(range(20))
    reads.clear()
    db.prefetch(children)  # all loaded now: nothing to read
    assert reads == []
    db.close()
    db.prefetch(children)  # nor on a closed database, whose loaded states still read
    assert [child["n"] for child in children] == list(range(20))


def test_a_database_larger_than_its_cache_works_and_stays_bounded(open_db):
    db = open_db()
    root_of_children(db, 300, payload="x" * 1000)
    db.close()
    small = open_db(cache_size=50_000)
    total = sum(small.root[n]["n"] for n in range(300))
    assert total == sum(range(300))
    assert small._cache.loaded_bytes <= 50_000 or len(small._cache.loaded) == 1
    assert len(small._cache.loaded) < 300
    # Evicted states load again, right, when touched.
    assert [small.root[n]["payload"][:3] for n in (0, 150, 299)] == ["xxx"] * 3


def test_commit_larger_than_the_cache_is_evicted_once_no_longer_checked_out(open_db):
    small = open_db(cache_size=50_000)
    root = root_of_children(small, 300, payload="x" * 1000)
    for n in range(300):
        child = root[n]
        checkout(child)
        child["payload"] = "y" * 1000
    transaction.commit()  # every state checked out while it is installed
    assert small._cache.loaded_bytes > 50_000
    # Later loads find the committed states evictable and bring the cache
    # back within its bound.
    other = open_db()
    checkout(other.root)
    for n in range(300, 400):
        other.root[n] = PersistentDict(payload="z" * 1000, n=n)
    transaction.commit()
    transaction.begin()  # small catches up
    assert sum(small.root[n]["n"] for n in range(400)) == sum(range(400))
    assert small._cache.loaded_bytes <= 50_000 or len(small._cache.loaded) == 1


def test_identity_holds_while_reachable_even_after_eviction(open_db):
    db = open_db()
    root_of_children(db, 100, payload="y" * 2000)
    db.close()
    small = open_db(cache_size=20_000)
    held = small.root[5]
    for n in range(100):
        small.root[n]["payload"]
    assert small.root[5] is held
    assert small.get(held._p_oid) is held


def test_one_object_per_oid_when_loading_loads_an_object_referring_back(open_db):
    # Loading the root hashed a key, which loaded a tag referring back to the
    # root: two objects for oid 1, and a commit through one was lost.
    db = open_db()
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    tag = Tag("red")
    checkout(root)
    root["by_tag"] = {TagKey(tag): "red things"}
    root["tag"] = tag
    transaction.commit()
    checkout(tag)
    tag.owner = root
    transaction.commit()
    db.close()
    db = open_db()
    root = db.root
    assert root["tag"].owner is root and db.get(root._p_oid) is root
    checkout(root)
    root["a"] = 1
    transaction.commit()
    db.close()
    assert "a" in open_db().root


# -- load_state: versions as of a transaction ---------------------------------


def two_versions(open_db):
    """A database where a Container's `items` went from [] to [child]."""
    db = open_db()
    container = Container()
    db.elect(PersistentDict(c=container))
    transaction.commit()
    first = db.last_tid
    child = Persistent()
    checkout(container)
    container.items.append(child)
    transaction.commit()
    return db, container, child, first


def test_load_state_gives_each_version_as_of_a_transaction(open_db):
    db, container, child, first = two_versions(open_db)
    oid = container._p_oid
    assert db.load_state(oid, first) == (first, {"items": []})
    assert db.load_state(oid, db.last_tid) == (db.last_tid, {"items": [child]})
    assert db.load_state(oid) == (db.last_tid, {"items": [child]})
    with pytest.raises(HistoryError):
        db.load_state(oid, first - 1)


@pytest.mark.parametrize("tid, error", [("1", TypeError), (1.5, TypeError), (True, TypeError),
                                        (-1, ValueError)])
def test_load_state_refuses_what_is_not_a_transaction_id(open_db, tid, error):
    # "1" raised a bare TypeError from a comparison deep inside; 1.5 was
    # taken as a transaction id.
    db = open_db()
    db.elect(PersistentDict())
    transaction.commit()
    with pytest.raises(error, match="transaction id"):
        db.load_state(db.root._p_oid, tid)


def test_load_state_of_a_loaded_object_is_an_independent_copy(open_db, monkeypatch):
    db, container, child, first = two_versions(open_db)
    assert container.items == [child]  # loaded: its state is the newest version

    def no_reading(*args):
        raise AssertionError("the loaded state should have been copied")

    monkeypatch.setattr(db._log, "read_object", no_reading)
    serial, state = db.load_state(container._p_oid, db.last_tid)
    assert serial == db.last_tid and state == {"items": [child]}
    assert state["items"][0] is child, "references stay the live objects"
    state["items"].clear()
    assert container.items == [child], "the shared state is untouched"
    monkeypatch.undo()
    assert db.load_state(container._p_oid, first) == (first, {"items": []}), \
        "an older snapshot still reads the log"


def test_closing_gives_back_the_reserved_space_after_the_last_records(open_db):
    first = open_db()
    first.elect(PersistentDict(n=1))
    transaction.commit()
    second = open_db()
    checkout(second.root)
    second.root["n"] = 2
    transaction.commit()
    first.close()  # it has not read the second's commit: nothing is cut
    assert os.path.getsize(first.path) > second._log.end
    second.close()
    assert os.path.getsize(first.path) == second._log.end
    reopened = open_db()
    assert reopened.root["n"] == 2 and reopened.verify()["ok"]


def test_close_closes_the_file_even_if_giving_space_back_fails(open_db, monkeypatch):
    db = open_db()
    db.elect(PersistentDict(n=1))
    transaction.commit()

    def failing(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(db._log, "_peek", failing)
    db.close()  # only space was at stake: no error
    assert db._log.fd is None


def test_a_read_only_open_raises_at_damage_a_later_record_proves_durable(open_db, db_path):
    # It stopped there quietly and served the transactions before it as the
    # whole database, where a writer's open raised CorruptionError.
    db = open_db()
    db.elect(PersistentDict(n=0))
    transaction.commit()
    ends = []
    for n in range(1, 6):
        checkout(db.root)
        db.root["n"] = n
        transaction.commit()
        ends.append(db._log.end)
    db.close()
    flip_bit(db_path, ends[1] - 30)  # inside the third record of six
    for read_only in [True, False]:
        with pytest.raises(CorruptionError, match="damaged transaction record"):
            Database(db_path, read_only=read_only)


def test_a_read_only_open_takes_a_torn_last_record_as_the_end(open_db, db_path):
    db = open_db(durability="none")
    db.elect(PersistentDict(n=0))
    transaction.commit()
    before = db._log.end
    checkout(db.root)
    db.root["n"] = 1
    transaction.commit()
    db.close()
    os.truncate(db_path, before + (os.path.getsize(db_path) - before) // 2)
    with Database(db_path, read_only=True) as reader:
        assert reader.root["n"] == 0
