"""Tests of dobbin.space: the file allocated ahead of the records, and given back."""

import errno
import os

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import StorageError
from dobbin.log import COMMITTED, FILE_HEADER_SIZE, Log, ObjectEntry
from dobbin.persistent import PersistentDict, checkout
from dobbin.space import RESERVE


def object_entry(tid, size=10):
    return ObjectEntry(oid=tid, previous=0, data=bytes([tid % 251]) * size)


def small_commits(log, count):
    return [log.append(COMMITTED, 100, [object_entry(tid)]) for tid in range(1, count + 1)]


def test_an_fsync_log_reserves_zeroed_space_after_its_records(db_path):
    log = Log(db_path)
    records = small_commits(log, 3)
    end = log.end
    log.close()
    size = os.path.getsize(db_path)
    assert size >= FILE_HEADER_SIZE + RESERVE > end
    with open(db_path, "rb") as f:
        f.seek(end)
        assert f.read() == bytes(size - end)
    reader = Log(db_path, read_only=True)
    assert [r.tid for r in reader.follow()] == [1, 2, 3]
    assert reader.end == end and reader.at_end()
    reader.close()
    writer = Log(db_path)
    assert [r.tid for r in writer.recover()] == [1, 2, 3]
    assert writer.dropped is None and os.path.getsize(db_path) == size, "nothing is cut"
    assert writer.append(COMMITTED, 100, [object_entry(4)]).offset == end
    assert os.path.getsize(db_path) == size, "the record went into the reserved space"
    writer.close()
    assert records[-1].offset + records[-1].length == end


def test_a_log_without_fsync_reserves_nothing(db_path):
    log = Log(db_path, durability="none")
    small_commits(log, 3)
    assert os.path.getsize(db_path) == log.end
    log.close()


def test_a_big_record_is_appended_without_reserving(db_path):
    log = Log(db_path)
    log.append(COMMITTED, 2, [ObjectEntry(oid=1, previous=0, data=bytes(RESERVE + 1))])
    assert os.path.getsize(db_path) == log.end
    log.close()


def test_without_fallocate_the_log_appends_as_before(db_path, monkeypatch):
    def unsupported(self, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(Log, "_allocate", unsupported)
    log = Log(db_path)
    small_commits(log, 2)
    assert os.path.getsize(db_path) == log.end
    log.close()


def test_trim_gives_back_reserved_space_but_never_a_record_it_has_not_read(db_path):
    first = Log(db_path)
    small_commits(first, 1)
    second = Log(db_path)
    assert [r.tid for r in second.recover()] == [1]
    second.append(COMMITTED, 100, [object_entry(2)])
    first.trim()  # behind: the second log's record lies where it would cut
    reader = Log(db_path, read_only=True)
    assert [r.tid for r in reader.follow()] == [1, 2]
    reader.close()
    assert [r.tid for r in first.recover()] == [2]
    first.trim()
    assert os.path.getsize(db_path) == first.end == second.end
    first.close()
    second.close()


def test_a_full_disk_skips_reserving_once_and_tries_again_later(db_path, monkeypatch):
    calls = []
    real = Log._allocate

    def full_once(self, offset, length):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, offset, length)

    monkeypatch.setattr(Log, "_allocate", full_once)
    log = Log(db_path)
    small_commits(log, 2)
    first, alone, second = calls  # the record alone, and the reserve again at the second
    assert first == alone < second and os.path.getsize(db_path) > log.end
    log.close()


def test_a_record_that_fits_is_claimed_without_the_reserve_that_does_not(
        open_db, db_path, monkeypatch):
    # With less room left than the reserve, every commit's vote failed,
    # however small its record: the claim asked for the reserve too.
    db = open_db()
    db.elect(PersistentDict())
    transaction.commit()
    Database(db_path).close()  # trims the reserve: the next claim allocates
    room = os.path.getsize(db_path) + 20_000
    real = Log._allocate

    def nearly_full(self, offset, length):
        if offset + length > room:
            raise OSError(errno.EFBIG, "File too large")
        return real(self, offset, length)

    monkeypatch.setattr(Log, "_allocate", nearly_full)
    for n in range(3):
        checkout(db.root)
        db.root[n] = PersistentDict(payload="x" * 5_000)
        transaction.commit()
    assert [db.root[n]["payload"] for n in range(3)] == ["x" * 5_000] * 3
    checkout(db.root)
    db.root["too big"] = "x" * 20_000
    with pytest.raises(StorageError, match="no room for a record"):
        transaction.commit()
    transaction.abort()


def test_a_claim_looks_at_the_file_not_at_what_it_reserved_before(
        open_db, db_path, monkeypatch):
    # Another instance closing the file gave back the space this one had
    # reserved; this one still counted on it, so a full disk failed the
    # finish (a two-database transaction half applied), not the vote.
    db = open_db()
    db.elect(PersistentDict())
    transaction.commit()
    reserved_end = os.path.getsize(db_path)
    Database(db_path).close()  # trims the reserve
    assert os.path.getsize(db_path) < reserved_end

    def disk_full(self, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Log, "_allocate", disk_full)
    checkout(db.root)
    db.root["big"] = "x" * 50_000
    with pytest.raises(StorageError, match="no room for a record"):
        transaction.commit()
    transaction.abort()
    monkeypatch.undo()
    db.sync()
    assert "big" not in db.root and db.verify()["failed"] == 1  # recorded, never applied


def test_reserved_space_shorter_than_a_record_header_is_not_a_torn_tail(db_path):
    # Records filled the reserve up to a few bytes short of its end: the
    # writer took those zeros for a torn record, cut them and saved them
    # beside the file, every few thousand small commits.
    log = Log(db_path)
    small_commits(log, 2)
    end = log.end
    log.close()
    os.truncate(db_path, end + 47)
    writer = Log(db_path)
    assert [r.tid for r in writer.recover()] == [1, 2]
    assert writer.dropped is None
    writer.append(COMMITTED, 100, [object_entry(3)])
    writer.close()
    os.truncate(db_path, writer.end + 47)
    writer = Log(db_path)
    assert [r.tid for r in writer.recover()] == [1, 2, 3]
    writer.trim()
    assert os.path.getsize(db_path) == writer.end, "trim gives a short reserve back too"
    writer.close()
    directory, name = os.path.split(db_path)
    assert [entry for entry in os.listdir(directory) if entry != name] == []
