"""Tests of dobbin.recovery, one per error path of the reader (the shape
of leveldb's log_format tests): each damage is forged alone, with every
other checksum made right again, so the check under test is the one that
fires; in the last record it is a torn tail, before a valid record it is
corruption.  Then torn writes against corruption (what later records
vouch for), streams, splicing, cutting the tail and keeping its bytes,
damaged checkpoints stepped over, and `diagnose`.
"""

import os
import struct

import pytest

import dobbin.recovery as recovery_module
from conftest import flip_bit
from dobbin.exc import CorruptionError, StorageError
from dobbin.log import (CHECKPOINT, COMMITTED, ENTRY_SIZE, STREAM_CHUNK, TRAILER_SIZE,
                        TX_HEADER_SIZE, IndexEntry, Log, NoteEntry, ObjectEntry, StreamEntry)
from dobbin.recovery import INCOMPLETE
from log_fixtures import (E_LENGTH, E_TID, H_CRC, H_LENGTH, H_STATUS, H_TID, T_CRC, T_LENGTH,
                          T_MAGIC, checkpoint_file, commits, entry_offsets, make_file, object_entry,
                          read_file, records_of, seal, seal_entry, set_lag, small_commits)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "log.dobbin")


def recover(path, repair=False):
    """Run recovery like an opening writer; return (tids, dropped)."""
    log = Log(path, durability="none")
    try:
        return [record.tid for record in log.recover(repair=repair)], log.dropped
    finally:
        log.close()


def follow(path):
    log = Log(path, read_only=True)
    try:
        return [record.tid for record in log.follow()], log.end
    finally:
        log.close()


# -- records: one test per check -------------------------------------------------------


def _magic(record, entries):
    record[0:4] = b"DTXQ"
    seal(record, entries)


def _header_crc(record, entries):
    record[33] ^= 0x01  # the timestamp, under the header crc only


def _status(record, entries):
    record[H_STATUS:H_STATUS + 1] = b"Z"
    seal(record, entries)


def _length_too_small(record, entries):
    struct.pack_into("<Q", record, H_LENGTH, TX_HEADER_SIZE + TRAILER_SIZE + ENTRY_SIZE - 1)
    seal(record, entries)


def _length_huge(record, entries):
    struct.pack_into("<Q", record, H_LENGTH, 1 << 63)
    seal(record, entries)


def _tid(record, entries):
    struct.pack_into("<Q", record, H_TID, 7)
    seal(record, entries)


def _entry_tid(record, entries):
    struct.pack_into("<Q", record, entries[0] + E_TID, 7)
    seal_entry(record, entries[0], bytes(record[entries[0] + ENTRY_SIZE:-TRAILER_SIZE]))
    seal(record, entries)


def _kind(record, entries):
    record[entries[0]:entries[0] + 1] = b"Q"
    seal(record, entries)


def _entry_overruns(record, entries):
    struct.pack_into("<Q", record, entries[0] + E_LENGTH, 1000)
    seal(record, entries)


def _entry_crc(record, entries):
    record[entries[0] + ENTRY_SIZE] ^= 0x01  # the state's first byte


def _trailer_magic(record, entries):
    record[-TRAILER_SIZE + T_MAGIC:-TRAILER_SIZE + T_MAGIC + 4] = b"DENQ"


def _trailer_length(record, entries):
    struct.pack_into("<Q", record, len(record) - TRAILER_SIZE + T_LENGTH, len(record) + 1)


def _trailer_crc(record, entries):
    record[-TRAILER_SIZE + T_CRC] ^= 0x01


def _entry_reserved(record, entries):
    record[entries[0] + 1] = 0x01  # under the trailer crc only


DAMAGES = [
    ("bad record magic", _magic, "bad record magic"),
    ("header crc mismatch", _header_crc, "header checksum mismatch"),
    ("unknown status", _status, "unknown record status"),
    ("length too small", _length_too_small, "too small"),
    ("tid out of sequence", _tid, "out of sequence"),
    ("entry of another transaction", _entry_tid, "entry of transaction 7"),
    ("unknown entry kind", _kind, "unknown entry kind"),
    ("entry overrunning its record", _entry_overruns, "overruns its record"),
    ("entry crc mismatch", _entry_crc, "entry checksum mismatch"),
    ("bad trailer magic", _trailer_magic, "bad record trailer"),
    ("trailer length mismatch", _trailer_length, "bad record trailer"),
    ("trailer crc mismatch", _trailer_crc, "record checksum mismatch"),
    ("entry reserved bytes", _entry_reserved, "record checksum mismatch"),
]


@pytest.mark.parametrize("forge, reason", [case[1:] for case in DAMAGES],
                         ids=[case[0] for case in DAMAGES])
def test_damage_before_a_valid_record_is_corruption(tmp_path, path, forge, reason):
    records = commits(tmp_path, 4)
    forge(records[1], entry_offsets(records[1]))
    offsets = make_file(path, records)
    with pytest.raises(CorruptionError, match=reason) as caught:
        recover(path)
    error = caught.value
    assert offsets[1] <= error.offset < offsets[2], "the offset names the damaged record"
    assert "offset %d" % offsets[2] in str(error), "the message names the valid record after"
    assert follow(path) == ([1], offsets[1]), "catch-up stops before the damage"


@pytest.mark.parametrize("forge, reason", [case[1:] for case in DAMAGES],
                         ids=[case[0] for case in DAMAGES])
def test_damage_in_the_last_record_is_a_torn_tail(tmp_path, path, forge, reason):
    records = commits(tmp_path, 3)
    forge(records[2], entry_offsets(records[2]))
    offsets = make_file(path, records)
    log = Log(path, durability="none")
    assert [record.tid for record in log.recover()] == [1, 2]
    assert reason in log.dropped["reason"]
    assert log.dropped["offset"] == offsets[2] and log.dropped["bytes"] == len(records[2])
    log.close()
    assert read_file(log.dropped["saved_as"]) == records[2]
    assert log.dropped["saved_as"] == path + ".torn-2-0"
    assert os.path.getsize(path) == offsets[2]


def test_diagnose_names_the_damage_and_its_offset(tmp_path, path):
    records = commits(tmp_path, 3)
    _entry_crc(records[1], entry_offsets(records[1]))
    offsets = make_file(path, records)
    log = Log(path, read_only=True)
    assert list(log.follow())[-1].tid == 1
    assert log.diagnose() == "entry checksum mismatch (at offset %d)" % (offsets[1] + 56)
    log.close()


def test_diagnose_of_a_sound_or_incomplete_record(tmp_path, path):
    records = commits(tmp_path, 2)
    make_file(path, [records[0], records[1][:-1]])
    log = Log(path, read_only=True)
    assert log.diagnose() is None
    list(log.follow())
    assert log.diagnose() == "incomplete record"
    log.close()


def test_a_huge_length_at_the_end_is_a_torn_tail_not_a_memory_error(tmp_path, path):
    records = commits(tmp_path, 3)
    _length_huge(records[2], entry_offsets(records[2]))
    offsets = make_file(path, records)
    tids, dropped = recover(path)
    assert tids == [1, 2] and dropped["offset"] == offsets[2]


def test_a_huge_length_before_valid_records_is_corruption(tmp_path, path):
    # A sound header whose length runs past the end must not swallow the
    # valid records after it as if they were a torn tail.
    records = commits(tmp_path, 4)
    _length_huge(records[1], entry_offsets(records[1]))
    offsets = make_file(path, records)
    assert_corruption_at(path, offsets[1])
    assert os.path.getsize(path) == offsets[3] + len(records[3]), "nothing was cut"


def assert_corruption_at(path, offset):
    try:
        tids, dropped = recover(path)
    except CorruptionError as error:
        assert error.offset == offset
    else:
        pytest.fail("recovery kept transactions %r and cut the rest: %r" % (tids, dropped))


def test_a_stale_header_running_past_the_end_is_corruption(tmp_path, path):
    # The header of an older, longer record (sound crc, wrong tid) where
    # record 2 belongs: records 3 and 4 after it are valid.
    records = commits(tmp_path, 4)
    stale = commits(tmp_path, 1, size=5000)[0]
    records[1][:TX_HEADER_SIZE] = stale[:TX_HEADER_SIZE]
    offsets = make_file(path, records)
    assert_corruption_at(path, offsets[1])
    assert os.path.getsize(path) == offsets[3] + len(records[3]), "nothing was cut"


# -- torn or corrupt: what later records vouch for -------------------------------------


def test_damage_no_later_record_vouches_for_is_a_torn_write(tmp_path, path):
    # Records 3 and 4 were written before record 2 was known durable: the
    # power may have put them on disk and not all of record 2.
    records = commits(tmp_path, 4)
    _entry_crc(records[1], entry_offsets(records[1]))
    set_lag(records[2], 1)
    set_lag(records[3], 2)
    offsets = make_file(path, records)
    tids, dropped = recover(path)
    assert tids == [1]
    assert dropped["offset"] == offsets[1] and dropped["saved_as"] == path + ".torn-1-0"
    assert read_file(dropped["saved_as"]) == b"".join(records[1:])


def test_records_of_a_dobbin_file_stored_in_a_torn_record_vouch_for_nothing(tmp_path, path):
    # The last record holds a copy of another Dobbin file, and its header
    # was lost.  The copy's records (their tids from 1, so never above
    # the damaged record's and the ones after it) were taken for records
    # after the damage that vouched for it: CorruptionError, not a cut.
    other = str(tmp_path / "other.dobbin")
    make_file(other, commits(tmp_path, 5))
    records = commits(tmp_path, 2)
    stored = records_of(tmp_path, (COMMITTED, [ObjectEntry(3, 0, read_file(other))]))[0]
    stored[:TX_HEADER_SIZE] = bytes(TX_HEADER_SIZE)
    offsets = make_file(path, records + [stored])
    tids, dropped = recover(path)
    assert tids == [1, 2] and dropped["offset"] == offsets[2]
    assert read_file(dropped["saved_as"]) == stored


def test_damage_a_later_record_vouches_for_is_corruption(tmp_path, path):
    records = commits(tmp_path, 4)
    _entry_crc(records[1], entry_offsets(records[1]))
    set_lag(records[2], 1)
    set_lag(records[3], 1)  # tid 4 vouches for tids up to 2
    offsets = make_file(path, records)
    with pytest.raises(CorruptionError, match="follows at offset %d" % offsets[3]) as caught:
        recover(path)
    assert caught.value.offset == offsets[1] + TX_HEADER_SIZE


# -- streams ---------------------------------------------------------------------------


def stream_record(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    return records_of(tmp_path, (COMMITTED, [StreamEntry(data)]))[0]


def test_stream_chunk_crc_mismatch(tmp_path, path):
    record = stream_record(tmp_path, STREAM_CHUNK + 100)
    record[TX_HEADER_SIZE + ENTRY_SIZE + STREAM_CHUNK + 5] ^= 0x01  # in chunk 1
    following = commits(tmp_path, 2)[1]
    offsets = make_file(path, [record, following])
    with pytest.raises(CorruptionError, match="stream chunk 1 checksum mismatch") as caught:
        recover(path)
    assert caught.value.offset == offsets[0] + TX_HEADER_SIZE


def test_stream_table_crc_mismatch(tmp_path, path):
    record = stream_record(tmp_path, 1000)
    record[-TRAILER_SIZE - 2] ^= 0x01  # in the table of chunk crcs
    following = commits(tmp_path, 2)[1]
    make_file(path, [record, following])
    with pytest.raises(CorruptionError, match="stream entry checksum mismatch"):
        recover(path)


@pytest.mark.parametrize("length", [1, 2, 3, STREAM_CHUNK + 5])
def test_a_stream_length_no_stream_can_have_is_damage(tmp_path, path, length):
    # length = n + 4 * ceil(n / 64 KiB) for the n bytes of a stream; other
    # lengths (forged with right checksums) must not read as a stream.
    record = records_of(tmp_path, (COMMITTED, [NoteEntry({"x": "y" * length})]))[0]
    entries = entry_offsets(record)
    start = entries[0] + ENTRY_SIZE
    body = bytes(length)
    record[start:-TRAILER_SIZE] = body
    record[entries[0]:entries[0] + 1] = b"S"
    struct.pack_into("<Q", record, entries[0] + E_LENGTH, length)
    struct.pack_into("<Q", record, H_LENGTH, len(record))
    struct.pack_into("<Q", record, len(record) - TRAILER_SIZE + T_LENGTH, len(record))
    chunks = -(-length // (STREAM_CHUNK + 4))
    table_at = start + length - 4 * chunks
    seal_entry(record, entries[0], bytes(record[table_at:start + length]))
    seal(record, entries)
    make_file(path, [record])
    tids, dropped = recover(path)
    assert tids == [] and dropped is not None


# -- splicing, and the search for a later record ---------------------------------------


def test_records_are_not_spliced_across_damage(tmp_path, path):
    records = commits(tmp_path, 4)
    records[1][TX_HEADER_SIZE + ENTRY_SIZE] ^= 0x01
    offsets = make_file(path, records)
    assert follow(path) == ([1], offsets[1])
    with pytest.raises(CorruptionError):
        recover(path)
    tids, dropped = recover(path, repair=True)
    assert tids == [1]
    assert dropped["offset"] == offsets[1] and dropped["saved_as"] == path + ".damaged-1-0"
    assert read_file(dropped["saved_as"]) == b"".join(records[1:])
    assert os.path.getsize(path) == offsets[1]


def test_a_header_spliced_onto_another_records_body_is_refused(tmp_path, path):
    # Two records of the same length: the first one's header on the second's
    # body and trailer.  Every crc of its own is right; the binding is not.
    first, second, third = commits(tmp_path, 3)
    spliced = first[:TX_HEADER_SIZE] + second[TX_HEADER_SIZE:]
    assert len(spliced) == len(first)
    make_file(path, [spliced, third])
    with pytest.raises(CorruptionError):
        recover(path)


def test_the_search_for_a_valid_record_crosses_its_read_window(tmp_path, path):
    # The damaged record is 1 MiB long, so the valid one after it starts
    # where the search's 1 MiB reads overlap.
    window = 1 << 20
    found = []
    for shift in (-2, 1, 2):
        filler = window + shift + 1 - TX_HEADER_SIZE - ENTRY_SIZE - TRAILER_SIZE
        damaged, valid = records_of(tmp_path, (COMMITTED, [ObjectEntry(1, 0, bytes(filler))]),
                                    (COMMITTED, [object_entry(2)]))
        damaged[0] ^= 0x01
        offsets = make_file(path, [damaged, valid])
        with pytest.raises(CorruptionError) as caught:
            recover(path)
        found.append("offset %d" % offsets[1] in str(caught.value))
    assert found == [True, True, True]


def test_the_search_for_a_valid_record_is_linear(tmp_path, path, monkeypatch):
    # Stored bytes full of record magics must not make recovery read the
    # rest of the file once per magic.
    damaged, valid = records_of(tmp_path,
                                (COMMITTED, [ObjectEntry(1, 0, b"DTXR" * (1 << 16))]),
                                (COMMITTED, [object_entry(2)]))
    damaged[0] ^= 0x01
    offsets = make_file(path, [damaged, valid])
    read = [0]
    real_pread = os.pread

    def counting_pread(fd, size, offset):
        data = real_pread(fd, size, offset)
        read[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    with pytest.raises(CorruptionError, match="follows at offset %d" % offsets[1]):
        recover(path)
    monkeypatch.undo()
    size = os.path.getsize(path)
    assert read[0] < 10 * size, "read %d bytes of a %d-byte file" % (read[0], size)


# -- cutting the tail and keeping its bytes --------------------------------------------


def test_a_torn_tail_is_cut_and_kept_beside_the_file(tmp_path, path):
    records = commits(tmp_path, 3)
    offsets = make_file(path, [records[0], records[1], records[2][:70]])
    with open(path + ".torn-2-0", "wb") as f:
        f.write(b"an earlier cut")
    tids, dropped = recover(path)
    assert tids == [1, 2]
    assert dropped == {"offset": offsets[2], "bytes": 70, "saved_as": path + ".torn-2-1",
                       "reason": dropped["reason"]}
    assert read_file(path + ".torn-2-1") == records[2][:70]
    assert read_file(path + ".torn-2-0") == b"an earlier cut"
    assert os.path.getsize(path) == offsets[2]


def test_a_torn_tail_of_a_file_with_a_long_name_is_saved_under_a_name_that_fits(tmp_path):
    # The saved name used to add ".torn-T-N" to a legal 250-byte name:
    # ENAMETOOLONG, a stray OSError, and no writable open ever again.
    path = str(tmp_path / ("x" * 243 + ".dobbin"))
    records = commits(tmp_path, 2)
    offsets = make_file(path, [records[0], records[1][:70]])
    tids, dropped = recover(path)
    assert tids == [1] and os.path.getsize(path) == offsets[1]
    saved = os.path.basename(dropped["saved_as"])
    assert len(saved) <= 255 and saved.startswith("x" * 200) and saved.endswith(".torn-1-0")
    assert read_file(dropped["saved_as"]) == records[1][:70]


def test_a_tail_that_cannot_be_saved_is_a_storage_error_and_stays(tmp_path, path,
                                                                    monkeypatch):
    records = commits(tmp_path, 2)
    make_file(path, [records[0], records[1][:70]])
    before = read_file(path)
    # A name the file system refuses (ENAMETOOLONG) was a stray OSError.
    monkeypatch.setattr(recovery_module, "_side_path", lambda path, suffix: path + "y" * 300)
    with pytest.raises(StorageError, match="cannot save the 70 bytes after the records"):
        recover(path)
    assert read_file(path) == before


def test_a_read_only_log_leaves_a_torn_tail_alone(tmp_path, path):
    records = commits(tmp_path, 2)
    make_file(path, [records[0], records[1][:70]])
    before = read_file(path)
    log = Log(path, read_only=True)
    assert [record.tid for record in log.recover()] == [1]
    log.close()
    assert read_file(path) == before
    assert not [name for name in os.listdir(tmp_path) if ".torn-" in name]


def test_a_page_landed_in_reserved_space_without_its_header_is_cut_as_torn(path):
    # A crash wrote a later page of a record but not its first one.
    log = Log(path)
    small_commits(log, 2)
    end = log.end
    log.close()
    with open(path, "r+b") as f:
        f.seek(end + 4096)
        f.write(b"\xffstray page")
    writer = Log(path)
    assert [r.tid for r in writer.recover()] == [1, 2]
    assert writer.dropped["offset"] == end and os.path.getsize(path) == end
    with open(writer.dropped["saved_as"], "rb") as saved:
        assert saved.read()[4096:4107] == b"\xffstray page"
    assert writer.append(COMMITTED, 100, [object_entry(3)]).offset == end
    writer.close()


class Killed(BaseException):
    """The writing process died: nothing after this write happens."""


def test_a_writer_killed_inside_a_checkpoint_leaves_a_torn_tail_not_damage(path, monkeypatch):
    writer = Log(path)
    records = small_commits(writer, 2)
    end = writer.end
    budget = [100_000]  # bytes written before the process dies, in the order issued
    real = Log._write

    def dying_write(self, buffers, offset):
        for buffer in [buffers] if isinstance(buffers, bytes) else buffers:
            buffer = bytes(buffer)[:budget[0]]
            real(self, buffer, offset)
            offset += len(buffer)
            budget[0] -= len(buffer)
            if not budget[0]:
                raise Killed()

    monkeypatch.setattr(Log, "_write", dying_write)
    with pytest.raises(Killed):
        writer.append(CHECKPOINT, 2, [IndexEntry(bytes(range(256)) * 800)])  # 200 KiB
    monkeypatch.undo()
    writer.close()  # its descriptor goes, as at the process's death
    assert os.path.getsize(path) > end + 100_000, "the checkpoint went into reserved space"
    reader = Log(path, read_only=True)
    assert [r.tid for r in reader.follow()] == [r.tid for r in records]
    assert reader.diagnose() == INCOMPLETE, "a checkpoint in the writing, not damage"
    reader.close()
    opener = Log(path)
    assert [r.tid for r in opener.recover()] == [r.tid for r in records]
    assert opener.skipped == [], "no half-written checkpoint may stay in the file"
    assert opener.dropped["offset"] == end and "torn" in opener.dropped["saved_as"]
    opener.close()


# -- damaged checkpoints: stepped over -------------------------------------------------


def test_a_damaged_checkpoint_is_stepped_over(tmp_path, path):
    spans = checkpoint_file(tmp_path, path)
    data = bytearray(read_file(path))
    data[spans[3][0] + TX_HEADER_SIZE + ENTRY_SIZE] ^= 0x01  # the index bytes
    with open(path, "wb") as f:
        f.write(data)
    log = Log(path, durability="none")
    assert log.open_checkpoint() is None
    assert [record.tid for record in log.recover()] == [1, 2, 3, 4, 5]
    assert log.dropped is None
    assert [offset for offset, _reason in log.skipped] == [spans[3][0]]
    log.close()


@pytest.mark.parametrize("damage", ["zeroed", "magic", "tid", "crc"])
def test_a_checkpoint_header_lost_before_a_valid_record_is_stepped_over(tmp_path, path, damage):
    # A checkpoint's header is written last and covers nothing later
    # records need: losing it must not cut the commits after it.
    spans = checkpoint_file(tmp_path, path)
    checkpoint = spans[3][0]
    data = bytearray(read_file(path))
    if damage == "zeroed":
        data[checkpoint:checkpoint + TX_HEADER_SIZE] = bytes(TX_HEADER_SIZE)
    else:
        data[checkpoint + {"magic": 0, "tid": H_TID, "crc": H_CRC}[damage]] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    reader = Log(path, read_only=True)
    assert [record.tid for record in reader.follow()] == [1, 2, 3, 4, 5]
    assert [offset for offset, _reason in reader.skipped] == [checkpoint]
    reader.close()
    log = Log(path, durability="none")
    assert [record.tid for record in log.recover()] == [1, 2, 3, 4, 5]
    assert log.dropped is None
    assert [offset for offset, _reason in log.skipped] == [checkpoint]
    log.close()


def test_a_checkpoint_without_header_and_with_a_damaged_body_is_not_stepped_over(tmp_path,
                                                                                  path):
    spans = checkpoint_file(tmp_path, path)
    checkpoint = spans[3][0]
    data = bytearray(read_file(path))
    data[checkpoint:checkpoint + TX_HEADER_SIZE] = bytes(TX_HEADER_SIZE)
    data[checkpoint + TX_HEADER_SIZE + ENTRY_SIZE + 9] ^= 0x01  # the index itself
    with open(path, "wb") as f:
        f.write(data)
    # Nothing shows that the records after it follow a checkpoint: the
    # damage is that of any record, and records 4 and 5 vouch for it.
    with pytest.raises(CorruptionError, match="a valid record follows"):
        recover(path)


def test_a_damaged_last_checkpoint_before_reserved_space_is_stepped_over(path):
    writer = Log(path)
    small_commits(writer, 2)
    writer.append(CHECKPOINT, 2, [IndexEntry(b"\0" * 64)])
    checkpoint, end = writer.checkpoint, writer.end
    writer.close()
    flip_bit(path, checkpoint + TX_HEADER_SIZE + ENTRY_SIZE + 20)
    opener = Log(path)
    assert [r.tid for r in opener.recover()] == [1, 2]
    assert opener.dropped is None and opener.end == end, "redundant: skipped, never cut"
    assert [offset for offset, _reason in opener.skipped] == [checkpoint]
    assert os.path.getsize(path) > end
    opener.close()


# -- a file cut by another process ------------------------------------------------------


def test_records_another_process_cut_away_are_not_written_over_or_read_past(tmp_path, path):
    # A repair elsewhere cut the file below what a live writer and a live
    # reader had read: the writer's next commit "returned" into a hole past
    # the new end (the file then refused to open), and the reader read the
    # records others wrote since at its old offsets.
    import transaction
    from dobbin.database import Database
    from dobbin.persistent import PersistentDict, checkout
    writer = Database(path)
    writer.elect(PersistentDict())
    transaction.commit()
    for n in range(5):
        checkout(writer.root)
        writer.root[n] = n
        transaction.commit()
    reader = Database(path, read_only=True)
    reader.sync()
    probe = Log(path, read_only=True)
    third = [record for record in probe.follow() if record.tid == 3][0]
    probe.close()
    flip_bit(path, third.offset + TX_HEADER_SIZE + 4)
    with Database(path, repair=True) as repairer:
        assert repairer.last_tid == 2
        checkout(repairer.root)
        repairer.root["since"] = bytes(8192)  # zeros where the writer's records ended
        transaction.commit()
    cut_at = os.path.getsize(path)
    assert cut_at > writer._log.end
    checkout(writer.root)
    writer.root["ours"] = "lost?"
    with pytest.raises(CorruptionError, match="transaction 6 that this process read is gone"):
        transaction.commit()
    transaction.abort()
    with pytest.raises(CorruptionError, match="is gone"):
        reader.sync()
    writer.close()  # which gives back the space after its records, if they are its
    reader.close()
    assert os.path.getsize(path) == cut_at  # nothing written over the others' records
    with Database(path, read_only=True) as reopened:
        assert reopened.root["since"] == bytes(8192) and reopened.last_tid == 3
