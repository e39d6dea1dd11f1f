"""Damage in the middle of the file: refused with its offset, or repaired.

Without `repair`, opening names the damaged offset; with it, every
transaction before the damage is kept, the rest is saved beside the file
and `db.recovery` says what was dropped.  Damage before the newest
checkpoint is not read at open: it shows when the damaged object is
loaded, and in `Database.verify()`.
"""

import logging
import os

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import CorruptionError
from dobbin.log import ENTRY_SIZE, TX_HEADER_SIZE
from dobbin.persistent import checkout

from .conftest import History, key_history, layout, open_state, read, snapshot, write


@pytest.fixture
def built(tmp_path, monkeypatch):
    """20 commits with no checkpoint; (path, history, records)."""
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 1 << 30)
    path = str(tmp_path / "db.dobbin")
    history = key_history(path, seed=7, commits=19, size=50)
    return path, history, layout(path)


def damage(path, offset):
    data = bytearray(read(path))
    data[offset] ^= 0x01
    write(path, data)


def test_without_repair_the_error_names_the_damaged_offset(built):
    path, _history, spans = built
    damaged = spans[9]
    damage(path, damaged.offset + TX_HEADER_SIZE + ENTRY_SIZE + 3)
    with pytest.raises(CorruptionError) as caught:
        Database(path)
    assert damaged.offset <= caught.value.offset < damaged.end
    assert caught.value.path == path
    assert "repair=True" in str(caught.value)
    assert os.path.getsize(path) == spans[-1].end, "nothing is cut without repair"


def test_repair_keeps_every_transaction_before_the_damage(built):
    path, history, spans = built
    damaged = spans[9]
    before = read(path)
    damage(path, damaged.offset + 20)
    db = Database(path, repair=True, durability="none")
    recovery = db.recovery
    assert db.tx_count == damaged.tid - 1
    assert snapshot(db) == history.states[damaged.tid - 1]
    assert recovery["offset"] == damaged.offset
    assert recovery["bytes"] == spans[-1].end - damaged.offset
    assert recovery["saved_as"] == path + ".damaged-%d-0" % (damaged.tid - 1)
    assert "damage at offset %d" % damaged.offset in recovery["reason"]
    saved = read(recovery["saved_as"])
    assert len(saved) == recovery["bytes"] and saved[:20] == before[damaged.offset:][:20]
    checkout(db.root)
    db.root["after repair"] = True
    transaction.commit()
    db.close()
    opened = open_state(path)
    assert opened.tx_count == damaged.tid and opened.recovery is None


def test_repair_of_a_sound_file_changes_nothing(built):
    path, history, spans = built
    opened = open_state(path, repair=True)
    assert opened.recovery is None and opened.tx_count == spans[-1].tid
    assert opened.state == history.states[spans[-1].tid]


def test_a_cut_is_logged_with_what_was_dropped(built, caplog):
    path, _history, spans = built
    with open(path, "ab") as f:
        f.write(b"DTXR" + bytes(20))
    logger = logging.getLogger("dobbin")
    logger.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="dobbin"):
        Database(path).close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert path in messages[0] and "24 bytes" in messages[0]
    assert "offset %d" % spans[-1].end in messages[0]


def test_damage_before_the_checkpoint_shows_on_load_and_in_verify(tmp_path, monkeypatch):
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 512)
    path = str(tmp_path / "db.dobbin")
    history = History(path, seed=8)
    history.commit()
    history.add_items(1, 100)
    for _ in range(30):
        history.set_key(50)
    history.close()
    spans = layout(path)
    checkpoint = [span for span in spans if span.status == b"X"][-1]
    item_record = [span for span in spans if span.status == b"C" and span.tid == 2][0]
    assert item_record.end <= checkpoint.offset
    damage(path, item_record.end - 30)  # the item's state, never rewritten since
    db = Database(path)
    assert db.tx_count == spans[-1].tid, "opening does not read before the checkpoint"
    report = db.verify()
    assert not report["ok"]
    assert "offset %d" % item_record.offset in report["errors"][0]
    with pytest.raises(CorruptionError):
        snapshot(db)
    db.close()
    transaction.abort()
