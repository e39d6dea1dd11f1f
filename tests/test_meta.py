"""Transaction metadata: recorded by commits, read back by recent_transactions."""

import io
import os
import struct
import subprocess
import sys
import time

import pytest
import transaction

from conftest import append_record, flip_bit, forge_file_header
from dobbin import meta
from dobbin.exc import CorruptionError, DamagedHistoryError, DobbinError, ObjectGraphError
from dobbin.log import COMMITTED, ENTRY_SIZE, TX_HEADER_SIZE, Log, MetaEntry, ObjectEntry
from dobbin.persistent import PersistentDict, PersistentFile, checkout
from dobbin.meta import TransactionInfo, transaction_info


def new_root(db):
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    return root


def commit_changes(root, count):
    """`count` commits of root["n"], noted "set 0", "set 1"..."""
    for n in range(count):
        checkout(root)
        root["n"] = n
        transaction.get().note("set %d" % n)
        transaction.commit()


def test_a_commit_records_user_description_and_extension(open_db):
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["a"] = 1
    txn = transaction.get()
    txn.user = "ann"
    txn.note("first line")
    txn.note("second line")
    txn.setExtendedInfo("request", {"id": 7, "tags": ["x"]})
    before = time.time()
    transaction.commit()
    newest, election = db.recent_transactions()
    assert newest == TransactionInfo(db.last_tid, newest.time, "ann", "first line\nsecond line",
                                     {"request": {"id": 7, "tags": ["x"]}})
    assert before - 1 <= newest.time <= time.time() + 1
    assert election.tid == db.last_tid - 1
    assert (election.user, election.description, election.extension) == ("", "", {})
    report = db.verify()
    assert report["ok"] and report["committed"] == 2 and report["streams"] == 0


def test_stored_objects_in_the_extension_are_recorded_as_their_oids(open_db):
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["child"] = child = PersistentDict()
    transaction.get().setExtendedInfo("made", [child, root])
    transaction.commit()
    assert db.recent_transactions(1)[0].extension == {"made": [child._p_oid, root._p_oid]}
    assert child._p_oid not in (None, root._p_oid)


@pytest.mark.parametrize("holder_name", ["a.dobbin", "z.dobbin"])
def test_objects_of_another_database_in_the_transaction_are_recorded_by_path_and_oid(
        open_db, tmp_path, holder_name):
    # The databases commit in path order: the one storing the new object
    # comes first or last, and both records name it all the same.
    holder_db, other_db = open_db(str(tmp_path / holder_name)), open_db(str(tmp_path / "m.dobbin"))
    holder_root, other_root = new_root(holder_db), new_root(other_db)
    checkout(holder_root)
    checkout(other_root)
    holder_root["new"] = made = PersistentDict()
    other_root["touched"] = True
    transaction.get().setExtendedInfo("made", [made, other_root])
    transaction.commit()
    holder_made = {"made": [made._p_oid, {"database": other_db.path, "oid": other_root._p_oid}]}
    other_made = {"made": [{"database": holder_db.path, "oid": made._p_oid}, other_root._p_oid]}
    assert holder_db.recent_transactions(1)[0].extension == holder_made
    assert other_db.recent_transactions(1)[0].extension == other_made
    assert made._p_oid is not None and made._p_jar is holder_db


def nested_lists(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value, error, message", [
    (object(), DobbinError, "metadata cannot be recorded: <object"),
    (PersistentDict(), ObjectGraphError, "not connected to graph"),
    (float("inf"), DobbinError, "metadata cannot be recorded: Out of range float"),
    (nested_lists(5000), DobbinError, "metadata cannot be recorded: nested deeper than 100"),
    (nested_lists(100), DobbinError, "metadata cannot be recorded: nested deeper than 100"),
    # JSON made the keys "1" and "1": one of the two was lost, silently.
    ({1: "one", "1": "uno"}, DobbinError, "a key that is not text .1.")])
def test_metadata_json_cannot_hold_fails_the_commit_before_anything_is_written(
        open_db, value, error, message):
    db = open_db()
    root = new_root(db)
    tid = db.last_tid
    checkout(root)
    root["a"] = 1
    transaction.get().setExtendedInfo("x", value)
    with pytest.raises(error, match=message):
        transaction.commit()
    transaction.abort()
    assert "a" not in root and db.recent_transactions(1)[0].tid == tid
    assert db.verify()["failed"] == 1  # recorded and counted, never applied


def test_an_extension_key_that_is_not_text_fails_the_commit(open_db):
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["a"] = 1
    transaction.get().setExtendedInfo(2, "two")
    with pytest.raises(DobbinError, match="a key that is not text .2."):
        transaction.commit()
    transaction.abort()
    assert "a" not in root


def test_an_extension_tuple_reads_back_as_a_list(open_db):
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["a"] = 1
    transaction.get().setExtendedInfo("pair", (1, "b"))
    transaction.commit()
    assert db.recent_transactions(1)[0].extension == {"pair": [1, "b"]}


def test_metadata_nested_as_deep_as_allowed_reads_back_from_a_deep_stack(open_db):
    # Only the writer's stack bounded the nesting: an extension nested 980
    # deep committed, then read back as "damage" from a deeper stack.
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["a"] = 1
    transaction.get().setExtendedInfo("x", nested_lists(99))

    def deep(levels):
        return deep(levels - 1) if levels else db.recent_transactions(1)[0]

    transaction.commit()
    assert deep(800).extension == {"x": nested_lists(99)}
    assert db.verify()["ok"]


def test_an_extension_that_is_not_a_mapping_fails_the_commit(open_db):
    # It was recorded as is, and a broker server could then not start on the file.
    db = open_db()
    root = new_root(db)
    checkout(root)
    root["a"] = 1
    transaction.get().extension = ["not", "a", "mapping"]
    with pytest.raises(DobbinError, match="extension must be a dict, not a list"):
        transaction.commit()
    transaction.abort()
    assert "a" not in root and db.recent_transactions(1)[0].extension == {}


def test_a_transaction_without_metadata_adds_no_entry(open_db, db_path):
    db = open_db()
    new_root(db)
    db.close()
    log = Log(db_path, read_only=True)
    [record] = log.records_before(log.size(), 1 << 20)
    assert [entry.kind for entry in record.entries] == [b"O", b"R"]
    log.close()


def test_recent_transactions_limit_and_order(open_db):
    db = open_db(durability="none")
    commit_changes(new_root(db), 5)
    assert [info.description for info in db.recent_transactions(3)] == [
        "set 4", "set 3", "set 2"]
    assert len(db.recent_transactions(100)) == 6
    assert db.recent_transactions(0) == []
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError):
            db.recent_transactions(bad)


def test_recent_transactions_sees_another_process_commit(open_db, db_path):
    db = open_db()
    new_root(db)
    code = ("import transaction; from dobbin.database import Database\n"
            "from dobbin.persistent import checkout\n"
            "db = Database(%r); checkout(db.root); db.root['x'] = 1\n"
            "transaction.get().note('from elsewhere'); transaction.commit(); db.close()\n"
            % db_path)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert db.recent_transactions(1)[0].description == "from elsewhere"


def test_a_version_1_file_records_no_metadata_and_still_commits(open_db, db_path):
    db = open_db()
    new_root(db)
    db.close()
    forge_file_header(db_path, 8, struct.pack("<H", 1), reseal=True)
    db = open_db()
    checkout(db.root)
    db.root["a"] = 1
    transaction.get().note("not recorded in a version 1 file")
    transaction.commit()
    assert db.recent_transactions(1)[0].description == ""
    assert db.root["a"] == 1


def test_a_damaged_meta_entry_is_a_corruption_error(tmp_path):
    log = Log(str(tmp_path / "m.dobbin"), durability="none")
    record = log.append(COMMITTED, 2, [ObjectEntry(1, 0, b"x"), MetaEntry(b"[1, 2]")])
    with pytest.raises(CorruptionError, match="not a JSON object"):
        transaction_info(record, log.path)
    bad = record._replace(entries=[e._replace(data=b"\xff{") for e in record.entries])
    with pytest.raises(CorruptionError, match="not UTF-8 JSON"):
        transaction_info(bad, log.path)
    deep = record._replace(entries=[e._replace(data=b"[" * 100000 + b"]" * 100000)
                                    for e in record.entries])
    with pytest.raises(CorruptionError, match="not UTF-8 JSON"):
        transaction_info(deep, log.path)  # json's recursion, not a RecursionError
    log.close()


def test_a_forged_meta_entry_is_reported_by_verify_and_recent_transactions(open_db, db_path):
    db = open_db()
    new_root(db)
    db.close()
    append_record(db_path, COMMITTED, [MetaEntry(b"{not json")])  # sound checksums, bad JSON
    db = open_db()
    report = db.verify()
    assert not report["ok"] and any("not UTF-8 JSON" in error for error in report["errors"])
    with pytest.raises(CorruptionError, match="not UTF-8 JSON"):
        db.recent_transactions()


def test_a_stored_file_bigger_than_the_read_back_budget_hides_no_history(open_db, monkeypatch):
    # One record past the budget (64 MiB) once ended the walk: every
    # transaction before it vanished from recent_transactions and
    # `dobbin history`, silently.
    monkeypatch.setattr(meta, "RECENT_BYTES", 256 * 1024)
    db = open_db()
    for description, change in (("first", None), ("big file", b"x"), ("last", None)):
        transaction.begin()
        if db.root is None:
            db.elect(PersistentDict())
        else:
            checkout(db.root)
            db.root[description] = (PersistentFile(io.BytesIO(os.urandom(1 << 20)))
                                    if change else description)
        transaction.get().note(description)
        transaction.commit()
    assert [info.description for info in db.recent_transactions(10)] == [
        "last", "big file", "first"]


def test_recent_transactions_step_over_a_damaged_checkpoint(open_db, db_path):
    # The walk back stopped there: a history of 3 transactions, not all.
    db = open_db()
    root = new_root(db)
    while not db._log.checkpoint:
        checkout(root)
        root["pad"] = "x" * 3000
        transaction.commit()
    checkpoint = db._log.checkpoint
    for n in range(3):
        checkout(root)
        root["n"] = n
        transaction.commit()
    last_tid = db.last_tid
    db.close()
    flip_bit(db_path, checkpoint + TX_HEADER_SIZE + ENTRY_SIZE + 12)  # in its index
    db = open_db()
    assert [info.tid for info in db.recent_transactions(1000)] == list(
        range(last_tid, 0, -1))


def test_recent_transactions_raise_at_a_damaged_transaction(open_db, db_path):
    db = open_db()
    commit_changes(new_root(db), 4)
    first_end = db._log.end
    commit_changes(db.root, 2)
    reader = open_db(read_only=True)
    flip_bit(db_path, first_end - 60)  # in a record that is read already
    with pytest.raises(DamagedHistoryError, match="damaged record in the history") as caught:
        reader.recent_transactions(10)
    assert [info.description for info in caught.value.found] == ["set 1", "set 0"]
