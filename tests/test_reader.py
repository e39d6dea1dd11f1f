"""dobbin.reader: records with sound checksums but impossible fields are
damage, never trusted, and never a stray exception."""

import os

import pytest
import transaction

from conftest import flip_bit
from dobbin.database import Database
from dobbin.exc import CorruptionError
from dobbin.log import (CHECKPOINT, COMMITTED, ENTRY_SIZE, TX_HEADER_SIZE, Log, MetaEntry,
                        ObjectEntry, RootEntry, StreamEntry)
from dobbin.reader import Damaged, skim_record
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


def big_record(path):
    """A log whose only record holds a 200 KB stream and an M entry; its offset."""
    log = Log(path, durability="none")
    record = log.append(COMMITTED, 1, [StreamEntry(os.urandom(200_000)),
                                       MetaEntry(b'{"user": "ann"}')])
    log.close()
    return record.offset


@pytest.mark.parametrize("where", ["entry header", "meta data", "trailer"])
def test_a_skimmed_record_is_checked_where_it_is_read(db_path, where):
    offset = big_record(db_path)
    size = os.path.getsize(db_path)
    fd = os.open(db_path, os.O_RDONLY)
    try:
        record = skim_record(fd, offset, size)
        assert [(e.kind, e.data) for e in record.entries] == [(b"M", b'{"user": "ann"}')]
        meta_entry = record.entries[0].offset
        spot = {"entry header": offset + TX_HEADER_SIZE + 33,   # the stream's length
                "meta data": meta_entry + ENTRY_SIZE + 2,
                "trailer": offset + record.length - 10}[where]
        flip_bit(db_path, spot)
        with pytest.raises(Damaged):
            skim_record(fd, offset, size)
    finally:
        os.close(fd)


def test_a_skimmed_record_does_not_read_the_stream_bytes(db_path):
    offset = big_record(db_path)
    flip_bit(db_path, offset + TX_HEADER_SIZE + ENTRY_SIZE + 1000)  # inside the stream's bytes
    fd = os.open(db_path, os.O_RDONLY)
    try:
        assert skim_record(fd, offset, os.path.getsize(db_path)).entries[0].data == (
            b'{"user": "ann"}')
    finally:
        os.close(fd)
