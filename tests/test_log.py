"""Tests of dobbin.log, one per error path of the reader (the shape of
leveldb's log_format tests): each damage is forged alone, with every
other checksum made right again, so the check under test is the one that
fires.  Then torn writes against corruption (what later records vouch
for), splicing, catch-up and recovery, checkpoints, random access on
damaged bytes, durability, and the writer's refusals.
"""

import errno
import fcntl
import gc
import os
import struct
import threading
import time
import zlib

import pytest

import dobbin.log as log_module
from conftest import flip_bit, forge_file_header
from dobbin.exc import CorruptionError, DobbinError, ReadOnlyError, StorageError
from dobbin.log import (CHECKPOINT, COMMITTED, ENTRY_SIZE, FAILED, FILE_HEADER_SIZE, INCOMPLETE,
                        STREAM_CHUNK, TRAILER_SIZE, TX_HEADER_SIZE, IndexEntry, Log,
                        MetaEntry, NoteEntry, ObjectEntry, RootEntry, StreamEntry)
from dobbin.reader import records_end

# Field offsets, from docs/format.txt.
H_STATUS, H_LAG, H_LENGTH, H_TID, H_COUNT, H_CRC = 4, 5, 8, 16, 48, 52
E_CRC, E_TID, E_LENGTH = 4, 16, 32
T_CRC, T_MAGIC, T_LENGTH = 0, 4, 8


def crc(data, value=0):
    return zlib.crc32(data, value) & 0xFFFFFFFF


# -- building files and forging damage --------------------------------------


def object_entry(tid, size=10):
    return ObjectEntry(oid=tid, previous=0, data=bytes([tid % 251]) * size)


def records_of(tmp_path, *specs):
    """Append `(status, entries)` records to a scratch log; return their bytes.

    Each record is written by the real writer; tests then forge copies.
    """
    path = str(tmp_path / ("scratch-%d.dobbin" % time.monotonic_ns()))
    log = Log(path, durability="none")
    spans = []
    for status, entries in specs:
        record = log.append(status, 100, entries)
        spans.append((record.offset, record.offset + record.length))
    log.close()
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return [bytearray(data[start:end]) for start, end in spans]


def commits(tmp_path, count, size=10):
    return records_of(tmp_path, *[(COMMITTED, [object_entry(tid, size)])
                                  for tid in range(1, count + 1)])


def make_file(path, records):
    """A fresh file holding `records` (bytes) after its header; their offsets."""
    if os.path.exists(path):
        os.remove(path)
    Log(path, durability="none").close()
    offsets = []
    with open(path, "ab") as f:
        for record in records:
            offsets.append(f.tell())
            f.write(record)
    return offsets


def entry_offsets(record):
    """Offsets of the entry headers inside `record`, as laid out."""
    count, = struct.unpack_from("<I", record, H_COUNT)
    offsets, position = [], TX_HEADER_SIZE
    for _ in range(count):
        offsets.append(position)
        length, = struct.unpack_from("<Q", record, position + E_LENGTH)
        position += ENTRY_SIZE + length
    return offsets


def seal(record, entries, header=True, trailer=True):
    """Make the header crc and the trailer crc right for the current bytes.

    `entries` are the entry header offsets the reader will walk (taken
    before a length was forged).
    """
    if header:
        struct.pack_into("<I", record, H_CRC, crc(bytes(record[:H_CRC])))
    if trailer:
        binding = crc(bytes(record[:TX_HEADER_SIZE]))
        for offset in entries:
            binding = crc(bytes(record[offset:offset + ENTRY_SIZE]), binding)
        struct.pack_into("<I", record, len(record) - TRAILER_SIZE + T_CRC, binding)


def seal_entry(record, offset, checked):
    """Make the crc of the entry at `offset` right for `checked` bytes."""
    struct.pack_into("<I", record, offset + E_CRC,
                     crc(checked, crc(bytes(record[offset + 8:offset + ENTRY_SIZE]))))


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


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# -- the file header -----------------------------------------------------------


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "log.dobbin")


def test_a_new_file_is_a_checksummed_header(path):
    Log(path).close()
    data = read_file(path)
    assert len(data) == FILE_HEADER_SIZE and data[:8] == b"\x89DOBBIN\n"
    assert struct.unpack_from("<H", data, 8) == (2,)
    assert struct.unpack_from("<I", data, 60) == (crc(data[:60]),)


def test_bad_file_magic(path):
    Log(path).close()
    forge_file_header(path, 0, b"\x89DOBBIM\n", reseal=True)
    with pytest.raises(CorruptionError, match="not a Dobbin file") as caught:
        Log(path)
    assert caught.value.offset == 0 and caught.value.path == path


def test_bad_file_header_checksum(path):
    Log(path).close()
    forge_file_header(path, 40, b"\x01", reseal=False)  # a reserved byte
    with pytest.raises(CorruptionError, match="file header checksum") as caught:
        Log(path)
    assert caught.value.offset == 0


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_unsupported_format_version(path, version):
    Log(path).close()
    forge_file_header(path, 8, struct.pack("<H", version), reseal=True)
    with pytest.raises(CorruptionError, match="unsupported format version %d" % version) as caught:
        Log(path)
    assert caught.value.offset == 8


def test_a_version_1_file_is_read_and_appended_to_as_version_1(path):
    log = Log(path)
    first = log.append(COMMITTED, 100, [object_entry(1)])
    log.close()
    forge_file_header(path, 8, struct.pack("<H", 1), reseal=True)
    log = Log(path)
    assert log.version == 1
    assert [record.tid for record in log.recover()] == [first.tid]
    log.append(COMMITTED, 100, [object_entry(2)])
    log.close()
    log = Log(path)
    assert log.version == 1 and len(list(log.recover())) == 2
    log.close()


def test_a_short_file_that_is_not_ours_is_refused_untouched(path):
    with open(path, "wb") as f:
        f.write(b"hello\n")
    with pytest.raises(CorruptionError):
        Log(path)
    assert read_file(path) == b"hello\n"


def test_a_torn_file_header_is_written_anew(path):
    # A crash while the file is created leaves part of the header: no
    # transaction can be in the file, so opening starts it afresh.
    Log(path).close()
    header = read_file(path)
    with open(path, "wb") as f:
        f.write(header[:30])
    log = Log(path)
    log.close()
    data = read_file(path)
    assert len(data) == FILE_HEADER_SIZE and data[:8] == header[:8]


# -- records: one test per check ------------------------------------------------


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


# -- torn or corrupt: what later records vouch for -----------------------------------


def set_lag(record, lag):
    record[H_LAG:H_LAG + 3] = lag.to_bytes(3, "little")
    seal(record, entry_offsets(record))


def test_the_lag_counts_records_not_yet_known_durable(path):
    log = Log(path)
    for _ in range(3):
        log.append(COMMITTED, 100, [object_entry(1)], wait=False)
    log.flush(log.end)
    log.append(COMMITTED, 100, [object_entry(1)])
    log.close()
    log = Log(path, durability="none")
    list(log.recover())
    log.append(COMMITTED, 100, [object_entry(1)], wait=False)
    log.append(COMMITTED, 100, [object_entry(1)], wait=False)
    log.close()
    reader = Log(path, read_only=True)
    assert [record.lag for record in reader.follow()] == [0, 1, 2, 0, 0, 0]
    reader.close()


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


# -- streams ------------------------------------------------------------------------


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


# -- splicing, catch-up, recovery ---------------------------------------------------


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


def test_catch_up_waits_for_a_record_being_written(tmp_path, path):
    records = commits(tmp_path, 3)
    make_file(path, [records[0], records[1], records[2][:40]])
    log = Log(path, read_only=True)
    assert [record.tid for record in log.follow()] == [1, 2]
    with open(path, "ab") as f:
        f.write(records[2][40:])
    assert [record.tid for record in log.follow()] == [3]
    log.close()


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
    monkeypatch.setattr(log_module, "_side_path", lambda path, suffix: path + "y" * 300)
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


def test_a_read_only_log_waits_for_the_process_creating_the_file(tmp_path, path):
    model = Log(str(tmp_path / "model.dobbin"))
    header = read_file(model.path)
    model.close()
    creator = os.open(path, os.O_RDWR | os.O_CREAT)  # as Log._create: created, then locked
    fcntl.flock(creator, fcntl.LOCK_EX)

    def finish_creating():
        time.sleep(0.3)
        os.pwrite(creator, header, 0)
        fcntl.flock(creator, fcntl.LOCK_UN)

    thread = threading.Thread(target=finish_creating)
    thread.start()
    try:
        log = Log(path, read_only=True)  # once: CorruptionError, file too short
        assert log.file_id == model.file_id and log.last_tid == 0
        log.close()
    finally:
        thread.join()
        os.close(creator)


def test_a_read_only_log_of_no_file_says_so(path):
    with pytest.raises(FileNotFoundError, match="no database file") as caught:
        Log(path, read_only=True)
    assert caught.value.errno == errno.ENOENT and caught.value.filename == path


def test_a_read_only_log_of_a_file_nobody_creates_is_refused(path):
    open(path, "wb").close()
    with pytest.raises(CorruptionError, match="file too short"):
        Log(path, read_only=True)


def test_failed_records_and_their_notes_are_read_back(tmp_path, path):
    records = records_of(tmp_path, (COMMITTED, [object_entry(1), RootEntry(1)]),
                         (FAILED, [NoteEntry({"error": "ConflictError"})]))
    make_file(path, records)
    log = Log(path, read_only=True)
    first, failed = list(log.follow())
    log.close()
    assert [entry.kind for entry in first.entries] == [b"O", b"R"]
    assert failed.status == FAILED and failed.entries[0].data == b'{"error": "ConflictError"}'


# -- checkpoints -------------------------------------------------------------------


def checkpoint_file(tmp_path, path):
    """Records 1-3, a checkpoint, records 4-5, through the real writer."""
    log = Log(path, durability="none")
    spans = []
    for tid in range(1, 6):
        record = log.append(COMMITTED, 100, [object_entry(tid)])
        spans.append((record.offset, record.offset + record.length))
        if tid == 3:
            record = log.append(CHECKPOINT, 100, [IndexEntry(b"index as of 3")])
            spans.append((record.offset, record.offset + record.length))
    log.close()
    return spans


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


def test_opening_starts_from_the_newest_checkpoint(tmp_path, path):
    spans = checkpoint_file(tmp_path, path)
    log = Log(path, durability="none")
    checkpoint = log.open_checkpoint()
    assert checkpoint.offset == spans[3][0] and checkpoint.tid == 3
    assert [record.tid for record in log.recover()] == [4, 5]
    log.close()


def test_a_checkpoint_written_before_its_records_were_durable_is_not_used(tmp_path, path):
    spans = checkpoint_file(tmp_path, path)
    data = bytearray(read_file(path))
    checkpoint = data[spans[3][0]:spans[3][1]]
    set_lag(checkpoint, 1)
    data[spans[3][0]:spans[3][1]] = checkpoint
    with open(path, "wb") as f:
        f.write(data)
    log = Log(path, durability="none")
    assert log.open_checkpoint() is None
    assert [record.status for record in log.recover()] == [COMMITTED] * 3 + [CHECKPOINT] + [
        COMMITTED] * 2
    log.close()


def test_a_stale_checkpoint_in_a_torn_tail_is_not_used(tmp_path, path):
    # A torn record whose unwritten rest holds an older checkpoint's bytes:
    # opening must still find records 4 and 5.
    spans = checkpoint_file(tmp_path, path)
    data = read_file(path)
    stale = data[spans[3][0]:spans[3][1]]
    torn = data[spans[-1][0]:spans[-1][0] + 20]
    with open(path, "ab") as f:
        f.write(torn + stale + bytes(30))
    log = Log(path, durability="none")
    checkpoint = log.open_checkpoint()
    assert checkpoint is None or checkpoint.offset == spans[3][0]
    tids = [record.tid for record in log.recover()]
    assert log.last_tid == 5 and tids[-1] == 5
    assert os.path.getsize(path) == len(data)
    log.close()


# -- random access on damaged bytes ------------------------------------------------


@pytest.fixture
def stored(tmp_path, path):
    """A log with an object and a two-chunk stream; (log, object, stream) offsets."""
    log = Log(path, durability="none")
    record = log.append(COMMITTED, 100, [StreamEntry(bytes(STREAM_CHUNK + 10)),
                                         ObjectEntry(1, 0, b"the state")])
    log.close()
    log = Log(path, durability="none")
    list(log.recover())
    stream, obj = record.entries
    yield log, obj.offset, stream.offset
    log.close()


def test_read_object_checks_its_entry(stored, path):
    log, obj, _stream = stored
    assert log.read_object(obj, 1)[1:] == (0, b"the state")
    flip_bit(path, obj + ENTRY_SIZE + 2)
    with pytest.raises(CorruptionError, match="checksum") as caught:
        log.read_object(obj, 1)
    assert caught.value.offset == obj


def test_read_object_refuses_the_wrong_entry(stored):
    log, obj, stream = stored
    with pytest.raises(CorruptionError, match="oid 2"):
        log.read_object(obj, 2)
    with pytest.raises(CorruptionError):
        log.read_object(stream, 1)
    with pytest.raises(CorruptionError):
        log.read_object(log.end + 100, 1)


def test_read_object_refuses_a_length_past_the_log(stored, path):
    log, obj, _stream = stored
    with open(path, "r+b") as f:
        f.seek(obj + E_LENGTH)
        f.write(struct.pack("<Q", 1 << 62))
    with pytest.raises(CorruptionError, match="overruns"):
        log.read_object(obj, 1)


def test_open_stream_checks_the_chunk_table(stored, path):
    log, _obj, stream = stored
    assert log.open_stream(stream)[0] == STREAM_CHUNK + 10
    flip_bit(path, stream + ENTRY_SIZE + STREAM_CHUNK + 10 + 1)
    with pytest.raises(CorruptionError, match="stream entry checksum"):
        log.open_stream(stream)


def test_open_stream_refuses_what_is_not_a_stream(stored):
    log, obj, _stream = stored
    with pytest.raises(CorruptionError):
        log.open_stream(obj)


def test_read_stream_chunk_checks_the_chunk(stored, path):
    log, _obj, stream = stored
    size, crcs = log.open_stream(stream)
    assert log.read_stream_chunk(stream, crcs, size, 1) == bytes(10)
    flip_bit(path, stream + ENTRY_SIZE + STREAM_CHUNK + 3)
    assert log.read_stream_chunk(stream, crcs, size, 0) == bytes(STREAM_CHUNK)
    with pytest.raises(CorruptionError, match="stream chunk 1"):
        log.read_stream_chunk(stream, crcs, size, 1)


# -- writing: durability and refusals ------------------------------------------------


def test_durability_values(path):
    for durability in ("fsync", "none"):
        log = Log(path, durability=durability)
        assert log.durability == durability
        log.close()
    for durability in ("sync", "", None, "FSYNC"):
        with pytest.raises(ValueError, match="durability"):
            Log(path, durability=durability)


def count_syncs(monkeypatch):
    calls = []
    monkeypatch.setattr("dobbin.log._fdatasync", lambda fd: calls.append(fd))
    return calls


def test_fsync_durability_syncs_every_append(path, monkeypatch):
    log = Log(path)
    calls = count_syncs(monkeypatch)
    log.append(COMMITTED, 100, [object_entry(1)])
    assert len(calls) == 1 and log.synced_end == log.end
    log.append(COMMITTED, 100, [object_entry(2)], wait=False)
    log.append(COMMITTED, 100, [object_entry(3)], wait=False)
    log.flush(log.end)
    assert len(calls) == 2, "one fsync serves every record written before it"
    log.flush(log.end)
    assert len(calls) == 2, "nothing left to sync"
    log.close()


def test_no_durability_never_syncs(path, monkeypatch):
    calls = count_syncs(monkeypatch)
    log = Log(path, durability="none")
    log.append(COMMITTED, 100, [object_entry(1)])
    log.flush(log.end)
    log.close()
    assert calls == []


def test_creating_a_file_syncs_its_header_then_its_directory(path, monkeypatch):
    calls = []
    monkeypatch.setattr("dobbin.log._fdatasync", lambda fd: calls.append("file"))
    monkeypatch.setattr(Log, "_fsync_directory", lambda self: calls.append("directory"))
    Log(path).close()
    assert calls == ["file", "directory"]
    del calls[:]
    Log(path).close()
    assert calls == [], "opening an existing file syncs nothing"


def test_append_to_a_read_only_log_is_refused(path):
    Log(path).close()
    log = Log(path, read_only=True)
    with pytest.raises(ReadOnlyError):
        log.append(COMMITTED, 100, [object_entry(1)])
    log.close()
    assert os.path.getsize(path) == FILE_HEADER_SIZE


def test_append_to_a_closed_log_is_refused(path):
    log = Log(path)
    log.close()
    with pytest.raises(ReadOnlyError):
        log.append(COMMITTED, 100, [object_entry(1)])


def test_a_failed_write_is_cut_back_and_further_writes_refused(path, monkeypatch):
    log = Log(path)
    log.append(COMMITTED, 100, [object_entry(1)])
    end = log.end
    real_write = Log._write

    def half_then_no_space(self, buffers, offset):
        data = b"".join(bytes(b) for b in ([buffers] if isinstance(buffers, bytes) else buffers))
        real_write(self, data[:len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log, "_write", half_then_no_space.__get__(log))
    with pytest.raises(StorageError, match="No space"):
        log.append(COMMITTED, 100, [object_entry(2)])
    assert os.path.getsize(path) == end and log.end == end
    monkeypatch.undo()
    with pytest.raises(StorageError):
        log.append(COMMITTED, 100, [object_entry(3)])
    log.close()


def test_a_failed_fsync_refuses_further_writes(path, monkeypatch):
    log = Log(path)

    def broken_sync():
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(log, "_sync", broken_sync)
    with pytest.raises(StorageError, match="Input/output"):
        log.append(COMMITTED, 100, [object_entry(1)])
    monkeypatch.undo()
    with pytest.raises(StorageError):
        log.append(COMMITTED, 100, [object_entry(2)])
    log.close()


def test_read_objects_reads_entries_near_and_far_alike(path):
    log = Log(path, durability="none")
    near = log.append(COMMITTED, 100, [ObjectEntry(oid, 0, b"state %d" % oid) for oid in (1, 2, 3)])
    log.append(COMMITTED, 100, [StreamEntry(bytes(200 * 1024))])  # far beyond one batch read
    big = b"x" * 5000  # longer than what is read ahead of an entry
    far = log.append(COMMITTED, 100, [ObjectEntry(4, 0, big), ObjectEntry(5, 0, b"last")])
    wanted = [(entry.offset, entry.oid) for entry in far.entries + near.entries]
    found = log.read_objects(wanted)
    assert found == {offset: log.read_object(offset, oid) for offset, oid in wanted}
    assert [found[offset][2] for offset, _ in wanted] == [big, b"last", b"state 1", b"state 2",
                                                          b"state 3"]
    assert log.read_objects([]) == {}
    log.close()


def test_read_objects_checks_every_entry(stored, path):
    log, obj, stream = stored
    with pytest.raises(CorruptionError, match="oid 2"):
        log.read_objects([(obj, 2)])
    with pytest.raises(CorruptionError):
        log.read_objects([(obj, 1), (stream, 1)])
    flip_bit(path, obj + ENTRY_SIZE + 2)
    with pytest.raises(CorruptionError, match="checksum") as caught:
        log.read_objects([(obj, 1)])
    assert caught.value.offset == obj


# -- space reserved after the records (docs/format.txt) ------------------------


def small_commits(log, count):
    return [log.append(COMMITTED, 100, [object_entry(tid)]) for tid in range(1, count + 1)]


def test_opening_finds_the_last_checkpoint_across_reserved_space(path):
    log = Log(path)
    small_commits(log, 2)
    log.append(CHECKPOINT, 2, [IndexEntry(b"")])
    checkpoint = log.checkpoint
    small_commits(log, 1)
    end = log.end
    log.close()
    reader = Log(path, read_only=True)
    assert reader.open_checkpoint().offset == checkpoint
    assert [r.tid for r in reader.follow()] == [3]
    assert reader.end == end
    reader.close()


@pytest.mark.parametrize("trailer_length_low_byte", [0, 7])
def test_records_end_steps_back_over_zeros_to_the_last_trailer(path, trailer_length_low_byte):
    # A trailer ends in its length's zero high bytes (and, for a length of
    # 256 * k, a zero low byte): the search must not stop short of them.
    log = Log(path)
    size = 256 * 2 - TX_HEADER_SIZE - ENTRY_SIZE - TRAILER_SIZE + trailer_length_low_byte
    log.append(COMMITTED, 2, [ObjectEntry(oid=1, previous=0, data=b"x" * size)])
    assert log.end - FILE_HEADER_SIZE == 512 + trailer_length_low_byte
    assert records_end(log.fd, log.size()) == log.end
    assert records_end(log.fd, log.end) == log.end
    log.close()


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


def test_a_reader_stops_before_reserved_space_and_takes_records_written_into_it(path):
    writer = Log(path)
    small_commits(writer, 1)
    reader = Log(path, read_only=True)
    assert [r.tid for r in reader.follow()] == [1]
    assert [r.tid for r in reader.follow()] == []
    writer.append(COMMITTED, 100, [object_entry(2)])
    assert [r.tid for r in reader.follow()] == [2]
    assert reader.end == writer.end < writer.size()
    reader.close()
    writer.close()


def test_records_end_is_not_fooled_by_a_length_that_spells_end(path):
    # A length whose low bytes are "END" (0x444E45) puts a second "DEND"
    # three bytes after the real one.
    length = 0x444E45
    log = Log(path)
    data = b"x" * (length - TX_HEADER_SIZE - ENTRY_SIZE - TRAILER_SIZE)
    log.append(COMMITTED, 2, [ObjectEntry(oid=1, previous=0, data=data)])
    end = log.end
    log.close()
    os.truncate(path, end + 4096)  # zeros after it, as reserved space leaves
    with open(path, "rb") as f:
        f.seek(end - 12)
        assert f.read(12) == b"DENDEND\0\0\0\0\0"
    reader = Log(path, read_only=True)
    assert records_end(reader.fd, reader.size()) == end
    reader.close()


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


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_log_dropped_unclosed_gives_its_descriptor_back(path):
    Log(path).close()
    before = open_descriptors()
    for _ in range(20):
        log = Log(path, read_only=True)
        log.cycle = log  # only the cyclic collector can free it
        del log
    gc.collect()
    assert open_descriptors() == before
    log = Log(path)
    log.close()
    log.close()  # twice is harmless
    assert open_descriptors() == before


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


def test_a_checkpoint_body_is_durable_before_its_header_is_written(path, monkeypatch):
    log = Log(path)
    small_commits(log, 2)
    events = []
    real_write, real_sync = Log._write, Log._sync

    def write(self, buffers, offset):
        events.append(("write", offset))
        real_write(self, buffers, offset)

    def sync(self):
        events.append(("sync",))
        real_sync(self)

    monkeypatch.setattr(Log, "_write", write)
    monkeypatch.setattr(Log, "_sync", sync)
    start = log.end
    log.append(CHECKPOINT, 2, [IndexEntry(b"\1" * 64)], wait=False)
    assert events[0] == ("write", start + TX_HEADER_SIZE)
    assert events[-2:] == [("sync",), ("write", start)]
    log.close()


def test_a_failed_sync_is_believed_over_a_later_successful_one(path, monkeypatch):
    log = Log(path)
    small_commits(log, 1)
    record = log.append(COMMITTED, 100, [object_entry(2)], wait=False)

    def failing(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Log, "_sync", failing)
    with pytest.raises(OSError):
        log._exclusive_sync()  # say, a staging header's, which took the error
    monkeypatch.undo()
    # The kernel would report that error to one sync only: this commit's
    # own flush must not take its clean return for durability.
    with pytest.raises(StorageError, match="refuses writes"):
        log.flush(record.offset + record.length)
    log.close()




# -- walking back ---------------------------------------------------------------------


def test_records_before_walks_back_newest_first_and_keeps_meta_entries(path):
    log = Log(path, durability="none")
    log.append(COMMITTED, 100, [object_entry(1)])
    log.append(FAILED, 2, [NoteEntry({"error": "ConflictError"})])
    log.append(COMMITTED, 100, [object_entry(3), MetaEntry(b'{"n": [1, 2], "user": "ann"}')])
    assert [(r.tid, r.status) for r in log.records_before(log.end, 1 << 20)] == [
        (3, COMMITTED), (2, FAILED), (1, COMMITTED)]
    newest = next(log.records_before(log.end, 1 << 20))
    assert [e.data for e in newest.entries if e.kind == b"M"] == [b'{"n": [1, 2], "user": "ann"}']
    # From the end of an earlier record, and within a byte budget.
    second_end = newest.offset
    assert [r.tid for r in log.records_before(second_end, 1 << 20)] == [2, 1]
    assert [r.tid for r in log.records_before(log.end, newest.length)] == [3]
    # A record bigger than what is left is skimmed: its M entry only.
    skimmed = next(log.records_before(log.end, newest.length - 1))
    assert (skimmed.tid, skimmed.length) == (3, newest.length)
    assert [(e.kind, e.data) for e in skimmed.entries] == [
        (b"M", b'{"n": [1, 2], "user": "ann"}')]
    log.close()


def test_a_record_too_big_for_the_budget_no_longer_hides_the_ones_before(path):
    # A stored file of more than the budget once ended the walk at its record.
    log = Log(path, durability="none")
    log.append(COMMITTED, 100, [object_entry(1), MetaEntry(b'{"description": "first"}')])
    log.append(COMMITTED, 100, [StreamEntry(os.urandom(300_000)),
                                MetaEntry(b'{"description": "big"}')])
    log.append(COMMITTED, 100, [object_entry(3), MetaEntry(b'{"description": "last"}')])
    records = list(log.records_before(log.end, 64 * 1024))
    assert [r.tid for r in records] == [3, 2, 1]
    assert [[e.data for e in r.entries if e.kind == b"M"] for r in records] == [
        [b'{"description": "last"}'], [b'{"description": "big"}'], [b'{"description": "first"}']]
    log.close()


@pytest.mark.parametrize("field, value", [(T_MAGIC, b"DENX"), (T_LENGTH, struct.pack("<Q", 0)),
                                          (T_LENGTH, struct.pack("<Q", 1 << 62)),
                                          (T_CRC, b"\0\0\0\0")])
def test_records_before_raises_at_a_damaged_trailer(path, field, value):
    # It stopped quietly: dobbin history showed a shortened history, exit 0.
    log = Log(path, durability="none")
    log.append(COMMITTED, 100, [object_entry(1)])
    last = log.append(COMMITTED, 100, [object_entry(2)])
    end = log.end
    log.close()
    with open(path, "r+b") as f:
        f.seek(end - TRAILER_SIZE + field)
        f.write(value)
    log = Log(path, read_only=True)
    with pytest.raises(CorruptionError, match="damaged record in the history"):
        list(log.records_before(end, 1 << 20))
    log.close()
    # The record before it is still found from where it ends.
    log = Log(path, read_only=True)
    assert [r.tid for r in log.records_before(last.offset, 1 << 20)] == [1]
    log.close()


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("make, message", [
    (os.mkfifo, "not a regular file"), (os.mkdir, "not a")])
def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(
        tmp_path, read_only, make, message):
    path = str(tmp_path / "thing")
    make(path)
    with pytest.raises(DobbinError, match=message):
        Log(path, read_only=read_only)
