"""The oid index (dobbin/index.py) and its checkpoints in the log."""

import os

import pytest
import transaction

import dobbin.database
from dobbin.database import Database
from dobbin.exc import CorruptionError, HistoryError
from dobbin.index import Index
from dobbin.log import Log
from dobbin.persistent import PersistentDict, checkout
from dobbin.record import CHECKPOINT


def test_offsets_count_and_roots():
    index = Index()
    index.set_offset(3, 100)
    index.set_offset(3, 200)
    index.set_offset(7, 300)
    index.roots.extend([(1, 3), (5, 7)])
    assert (index.offset_of(3), index.offset_of(7), index.offset_of(4)) == (200, 300, 0)
    assert index.count == 2 and list(index.oids()) == [3, 7]
    assert (index.root_oid(), index.root_oid(4), index.root_oid(0)) == (7, 3, None)
    assert (index.root_oid(1), index.root_oid(5), index.root_oid(99)) == (3, 7, 7)
    assert Index().root_oid() is None and Index().root_oid(3) is None


def test_negative_and_non_int_oids(tmp_path):
    index = Index()
    index.set_offset(3, 100)
    # Not counted from the end of the offsets array.
    assert index.offset_of(-1) == index.offset_of(-1021) == index.offset_of(-5000) == 0
    for oid in (3.0, "3", None):  # (bool: the database checks, off this hot path)
        with pytest.raises(TypeError):
            index.offset_of(oid)
    db = Database(str(tmp_path / "n.dobbin"), durability="none")
    root = PersistentDict()
    db.elect(root)
    checkout(root)
    root.update((n, PersistentDict()) for n in range(5))
    transaction.commit()
    for oid in (-1, -1020, -5000):
        with pytest.raises(KeyError):  # the IDatabase.get contract
            db.get(oid)
        with pytest.raises(HistoryError):
            db.load_state(oid)
    for oid in (True, 1.0, "1"):
        for call in (db.get, db.load_state):
            with pytest.raises(TypeError):
                call(oid)
    assert db.verify()["ok"]
    db.close()


def test_a_far_oid_does_not_allocate_a_huge_array():
    index = Index()
    index.set_offset(1 << 60, 64)
    assert index.offset_of(1 << 60) == 64 and index.count == 1
    assert index.size(1 << 61) < 1 << 20


def test_payload_round_trip():
    index = Index()
    for oid in range(1, 50):
        index.set_offset(oid, oid * 1000)
    index.set_offset(1 << 40, 7)
    index.roots.append((2, 1))
    copy = Index.from_payload(index.payload(1 << 41), "p", 0)
    assert list(copy.oids()) == list(index.oids()) and copy.count == index.count
    assert [copy.offset_of(oid) for oid in copy.oids()] == [index.offset_of(oid)
                                                            for oid in index.oids()]
    assert copy.roots == [(2, 1)]


@pytest.mark.parametrize("cut", [1, 8, 30])
def test_a_malformed_payload_is_corruption(cut):
    index = Index()
    index.set_offset(1, 64)
    with pytest.raises(CorruptionError, match="malformed index checkpoint"):
        Index.from_payload(index.payload(2)[:-cut], "p", 123)


def build(path, commits, monkeypatch, keys_per_commit=1):
    monkeypatch.setattr(dobbin.database, "CHECKPOINT_MIN_BYTES", 1024)
    with Database(path, durability="none") as db:
        root = PersistentDict()
        checkout(root)
        db.elect(root)
        transaction.commit()
        for n in range(commits):
            child = PersistentDict(n=n)
            checkout(root)
            root[n] = child
            transaction.commit()
        return {n: db.root[n]._p_oid for n in range(commits)}


def checkpoints_in(path):
    log = Log(path, read_only=True)
    try:
        return [record.offset for record in log.follow() if record.status == CHECKPOINT]
    finally:
        log.close()


def test_opening_from_a_checkpoint_replays_only_the_stale_tail(tmp_path, monkeypatch):
    path = str(tmp_path / "db.dobbin")
    oids = build(path, 60, monkeypatch)
    checkpoints = checkpoints_in(path)
    assert checkpoints, "a checkpoint was written"
    replayed = []
    real_apply = Database._apply

    def counting_apply(self, record, *args, **kwargs):
        replayed.append(record.tid)
        return real_apply(self, record, *args, **kwargs)

    monkeypatch.setattr(Database, "_apply", counting_apply)
    with Database(path) as db:
        assert db._log.checkpoint == checkpoints[-1]
        assert len(replayed) < 61, "records before the checkpoint were not replayed"
        assert {n: db.root[n]._p_oid for n in range(60)} == oids
        assert [db.root[n]["n"] for n in range(60)] == list(range(60))


def test_without_a_usable_checkpoint_the_index_is_rebuilt_from_the_log(tmp_path, monkeypatch):
    path = str(tmp_path / "db.dobbin")
    oids = build(path, 60, monkeypatch)
    with open(path, "r+b") as f:  # damage every checkpoint's index bytes
        for offset in checkpoints_in(path):
            f.seek(offset + 56 + 40 + 8)
            byte = f.read(1)
            f.seek(offset + 56 + 40 + 8)
            f.write(bytes([byte[0] ^ 0xFF]))
    with Database(path) as db:
        assert db._log.checkpoint == 0
        assert {n: db.root[n]._p_oid for n in range(60)} == oids
        assert len(db) == 61
    assert os.path.getsize(path) > 0


def test_failed_commits_are_checkpointed_too(tmp_path, monkeypatch):
    # Only successful commits wrote checkpoints: after a run of failed ones,
    # every open replayed them all.
    monkeypatch.setattr(dobbin.database, "CHECKPOINT_MIN_BYTES", 1024)
    path = str(tmp_path / "db.dobbin")
    with Database(path, durability="none") as db:
        db.elect(PersistentDict())
        transaction.commit()
        for _ in range(40):
            checkout(db.root)
            db.root["bad"] = lambda: None  # not picklable: the commit fails
            with pytest.raises(dobbin.exc.UnstorableError):
                transaction.commit()
            transaction.abort()
        assert db.verify()["failed"] == 40
    assert checkpoints_in(path), "the failed records were checkpointed"


def test_electing_the_root_again_adds_no_root_change(tmp_path, monkeypatch):
    # Each election of the same root added a root change, and every
    # checkpoint wrote all of them: the file grew quadratically.
    path = str(tmp_path / "db.dobbin")
    with Database(path, durability="none") as db:
        root = PersistentDict()
        db.elect(root)
        transaction.commit()
        for n in range(20):
            checkout(root)
            root["n"] = n
            db.elect(root)
            transaction.commit()
        assert [oid for _tid, oid in db._index.roots] == [root._p_oid]
        other = PersistentDict()
        db.elect(other)
        transaction.commit()
        assert [oid for _tid, oid in db._index.roots] == [root._p_oid, other._p_oid]
    with Database(path) as db:
        assert db.root is not root and db.root._p_oid == other._p_oid


def test_a_checkpoint_counts_the_root_changes_it_holds():
    index = Index()
    index.set_offset(1, 64)
    index.roots.extend((tid, 1) for tid in range(1, 1001))
    assert index.size(2) >= len(index.payload(2)) - 40
