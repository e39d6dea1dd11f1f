"""Tests of dobbin.log: the file header, catch-up, checkpoints, random
access on damaged bytes, durability and the writer's refusals, space
reserved after the records, and walking back.  What recovery makes of
damage is in tests/test_recovery.py.
"""

import errno
import fcntl
import gc
import os
import struct
import threading
import time

import pytest

from conftest import flip_bit, forge_file_header
from dobbin.exc import CorruptionError, DobbinError, ReadOnlyError, StorageError
from dobbin.log import (CHECKPOINT, COMMITTED, ENTRY_SIZE, FAILED, FILE_HEADER_SIZE,
                        STREAM_CHUNK, TRAILER_SIZE, TX_HEADER_SIZE, IndexEntry, Log,
                        MetaEntry, NoteEntry, ObjectEntry, RootEntry, StreamEntry)
from dobbin.reader import records_end
from log_fixtures import (E_LENGTH, T_CRC, T_LENGTH, T_MAGIC, checkpoint_file, commits, crc,
                          make_file, object_entry, read_file, records_of, set_lag,
                          small_commits)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "log.dobbin")


# -- the file header -------------------------------------------------------------------


def test_a_new_file_is_a_checksummed_header(path):
    Log(path).close()
    data = read_file(path)
    assert len(data) == FILE_HEADER_SIZE and data[:8] == b"\x89DOBBIN\n"
    assert struct.unpack_from("<H", data, 8) == (2,)
    assert struct.unpack_from("<I", data, 60) == (crc(data[:60]),)


def test_the_path_is_kept_absolute_and_may_be_bytes(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    log = Log("relative.dobbin")
    monkeypatch.chdir(tmp_path / "elsewhere")  # side files still go beside the file
    assert log.path == str(tmp_path / "relative.dobbin")
    log.close()
    raw = os.fsencode(str(tmp_path / "caf\udce9.dobbin"))  # not UTF-8: surrogate-escaped
    log = Log(raw)
    assert log.path == os.fsdecode(raw)
    log.close()
    assert os.path.exists(raw)


def test_an_unreadable_path_says_why_not_that_no_file_is_there(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        Log(str(tmp_path / "plain" / "log.dobbin"), read_only=True)
    with pytest.raises(FileNotFoundError, match="no database file"):
        Log(str(tmp_path / "log.dobbin"), read_only=True)


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


# -- catch-up and reading --------------------------------------------------------------


def test_catch_up_waits_for_a_record_being_written(tmp_path, path):
    records = commits(tmp_path, 3)
    make_file(path, [records[0], records[1], records[2][:40]])
    log = Log(path, read_only=True)
    assert [record.tid for record in log.follow()] == [1, 2]
    with open(path, "ab") as f:
        f.write(records[2][40:])
    assert [record.tid for record in log.follow()] == [3]
    log.close()


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


# -- checkpoints -----------------------------------------------------------------------


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


# -- random access on damaged bytes ----------------------------------------------------


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


@pytest.mark.parametrize("read", ["object", "objects", "stream", "chunk", "follow", "records"])
def test_a_read_that_a_close_overtook_raises_read_only_whatever_it_read(
        stored, tmp_path, monkeypatch, read):
    # A close() in another thread between a read's descriptor lookup and
    # its pread gave the number away: the read got EBADF, or read the file
    # that took the number and reported it as corruption of ours.
    log, obj, stream = stored
    size, crcs = log.open_stream(stream)
    reads = {"object": lambda: log.read_object(obj, 1),
             "objects": lambda: log.read_objects([(obj, 1)]),
             "stream": lambda: log.open_stream(stream),
             "chunk": lambda: log.read_stream_chunk(stream, crcs, size, 0),
             "follow": lambda: list(log.follow()),
             "records": lambda: list(log.records_before(log.end, 1 << 20))}
    other = tmp_path / "other"
    other.write_bytes(os.urandom(1 << 18))
    number, real_pread, opened = log.fd, os.pread, []

    def pread(fd, length, offset):
        if not opened:
            log.close()
            opened.append(os.open(other, os.O_RDONLY))  # the lowest free number
        return real_pread(fd, length, offset)
    monkeypatch.setattr(os, "pread", pread)
    try:
        with pytest.raises(ReadOnlyError, match="is closed"):
            reads[read]()
        assert opened == [number]
    finally:
        os.close(opened[0])


# -- writing: durability and refusals --------------------------------------------------


def test_durability_values(path):
    for durability in ("fsync", "none"):
        log = Log(path, durability=durability)
        assert log.durability == durability
        log.close()
    for durability in ("sync", "", None, "FSYNC"):
        with pytest.raises(ValueError, match="durability"):
            Log(path, durability=durability)


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


def test_the_identity_is_the_opened_file_s_and_a_closed_log_refuses_it(stored, tmp_path):
    # A transaction over two databases orders them by identity.
    log, _obj, _stream = stored
    expected = os.stat(log.path)
    os.rename(log.path, tmp_path / "moved")  # still the file this log opened
    assert log.identity() == (expected.st_dev, expected.st_ino)
    log.close()
    with pytest.raises(ReadOnlyError, match="is closed"):
        log.identity()


def test_append_to_a_closed_log_is_refused(path):
    log = Log(path)
    log.close()
    with pytest.raises(ReadOnlyError):
        log.append(COMMITTED, 100, [object_entry(1)])


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_failed_write_is_cut_back_and_only_want_of_room_lets_writes_go_on(path, monkeypatch,
                                                                          code):
    log = Log(path)
    log.append(COMMITTED, 100, [object_entry(1)])
    end = log.end
    real_write = Log._write

    def half_then_fail(self, buffers, offset):
        data = b"".join(bytes(b) for b in ([buffers] if isinstance(buffers, bytes) else buffers))
        real_write(self, data[:len(data) // 2], offset)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(log, "_write", half_then_fail.__get__(log))
    with pytest.raises(StorageError, match=os.strerror(code)):
        log.append(COMMITTED, 100, [object_entry(2)])
    assert os.path.getsize(path) == end and log.end == end
    monkeypatch.undo()
    if code == errno.EIO:  # the page cache is in doubt: nothing more is written
        with pytest.raises(StorageError, match="refuses writes"):
            log.append(COMMITTED, 100, [object_entry(3)])
        log.close()
        return
    # A full disk doesn't make what was written doubtful: room made, the
    # next record is written after the first.
    log.append(COMMITTED, 100, [object_entry(3)])
    log.close()
    reread = Log(path, read_only=True)
    assert [entry.oid for record in reread.follow() for entry in record.entries] == [1, 3]
    reread.close()


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
    near = log.append(COMMITTED, 100,
                      [ObjectEntry(oid, 0, b"state %d" % oid) for oid in (1, 2, 3)])
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


# -- space reserved after the records (docs/format.txt) --------------------------------


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


# -- walking back ----------------------------------------------------------------------


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
