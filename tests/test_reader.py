"""dobbin.reader: records with sound checksums but impossible fields are
damage, never trusted, and never a stray exception."""

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import CorruptionError
from dobbin.log import CHECKPOINT, COMMITTED, Log, ObjectEntry, RootEntry, StreamEntry
from dobbin.persistent import PersistentDict


def stored_root(path):
    db = Database(path, durability="none")
    db.elect(PersistentDict(precious=1))
    transaction.commit()
    oid = db.root._p_oid
    db.close()
    return oid


def test_an_entry_oid_not_below_the_records_oid_high_is_damage(db_path):
    stored_root(db_path)
    # Trusted, oid 5 would be handed out again over this object.
    log = Log(db_path)
    list(log.recover())
    log.append(COMMITTED, 2, [ObjectEntry(5, 0, b"state")])
    log.append(COMMITTED, 6, [ObjectEntry(1, 0, b"later")])
    log.close()
    with pytest.raises(CorruptionError, match="oid 5 not below the record's oid high 2"):
        Database(db_path)


@pytest.mark.parametrize("entry", [RootEntry(1), StreamEntry(b"data")])
def test_a_checkpoint_without_index_data_is_skipped(db_path, entry):
    stored_root(db_path)
    log = Log(db_path, durability="none")  # lag 0: a checkpoint that could be taken
    list(log.recover())
    log.append(CHECKPOINT, 2, [entry])
    log.close()
    for read_only in (False, True):
        db = Database(db_path, read_only=read_only)
        assert dict(db.root) == {"precious": 1}
        db.close()


def test_entry_offsets_outside_the_records_are_corruption(db_path):
    stored_root(db_path)
    log = Log(db_path, read_only=True)
    try:
        for offset in (0, log.end, 2 ** 63, 2 ** 64 - 1):
            with pytest.raises(CorruptionError, match="outside the records"):
                log.read_object(offset)
            with pytest.raises(CorruptionError, match="outside the records"):
                log.read_objects([(offset, 1)])
            with pytest.raises(CorruptionError, match="outside the records"):
                log.open_stream(offset)
    finally:
        log.close()
