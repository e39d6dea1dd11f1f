"""Tests of dobbin.stream: a PersistentFile becomes a PersistentStream at
commit; the stream reads back exactly its bytes, never past its end, with
io-like seek/tell and iteration independent of the file-like view."""

import io
import os
import random
import subprocess
import sys
import threading

import pytest
import transaction

from conftest import child_env, flip_bit, in_commit_order, peak_bytes_allocated, two_databases
from dobbin import staging
from dobbin.database import Database
from dobbin.exc import ConflictError, CorruptionError, ObjectGraphError, StreamError
from dobbin.log import ENTRY_SIZE, STREAM_CHUNK
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, checkout
from dobbin.stream import BLOCK, STAGE_MIN, FileSpan, PersistentStream


LARGE = 1024 * 1024 + 3  # 16 full chunks and 3 bytes


def pattern(size):
    """Bytes in which every offset is distinguishable from its neighbours."""
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


def store(open_db, data, **options):
    """Commit `data` as a stream on a new root; return (db, root, stream)."""
    db = open_db(**options)
    root = Persistent()
    checkout(root)
    root.file = PersistentFile(io.BytesIO(data))
    db.elect(root)
    transaction.commit()
    return db, root, root.file


def test_file_becomes_stream_reading_from_its_position_to_end(open_db):
    source = io.BytesIO(b"skip:abc")
    source.seek(5)
    pfile = PersistentFile(source)
    db = open_db()
    root = Persistent()
    checkout(root)
    root.file = pfile
    db.elect(root)
    transaction.commit()
    assert root.file is pfile
    assert type(pfile) is PersistentStream
    assert pfile.size == 3
    assert b"".join(pfile) == b"abc"


def test_read_never_runs_past_the_end(open_db):
    _db, _root, stream = store(open_db, b"0123456789")
    stream.open()
    assert stream.read(0) == b""
    assert stream.read(8) == b"01234567"
    assert stream.read(5) == b"89"  # near the end: only what is left
    assert stream.tell() == 10
    assert stream.read(5) == b""  # at the end
    assert stream.read() == b""
    stream.seek(100)  # past the end
    assert stream.read(1) == b"" and stream.read() == b""
    stream.seek(4)
    assert stream.read(-1) == b"456789"
    stream.seek(4)
    assert stream.read(None) == b"456789"


def test_read_at_chunk_boundaries_stops_at_the_end(open_db):
    data = pattern(2 * STREAM_CHUNK)  # ends exactly on a chunk boundary
    _db, _root, stream = store(open_db, data)
    stream.open()
    stream.seek(STREAM_CHUNK - 2)
    assert stream.read(4) == data[STREAM_CHUNK - 2:STREAM_CHUNK + 2]
    stream.seek(-1, 2)
    assert stream.read(10) == data[-1:]
    assert stream.read(10) == b""


def test_seek_honours_whence_and_tell_reports_position(open_db):
    _db, _root, stream = store(open_db, b"0123456789")
    stream.open()
    assert stream.tell() == 0
    stream.seek(3)
    assert stream.tell() == 3
    stream.seek(3, 0)
    assert stream.read(2) == b"34"
    stream.seek(2, 1)
    assert stream.tell() == 7 and stream.read(1) == b"7"
    stream.seek(-3, 1)
    assert stream.read(1) == b"5"
    assert stream.seek(0, 2) == 10 == stream.tell()  # seek returns the position, as io's
    stream.seek(-4, 2)
    assert stream.read() == b"6789"
    assert stream.seek(5, 2) == 10  # past the end: clamped to the end


@pytest.mark.parametrize("offset, whence", [(0, 3), (0, -1), (-1, 0), (-11, 2), (-1, 1)])
def test_seek_rejects_bad_whence_and_negative_position(open_db, offset, whence):
    _db, _root, stream = store(open_db, b"0123456789")
    stream.open()
    with pytest.raises(ValueError):
        stream.seek(offset, whence)
    assert stream.tell() == 0


def test_seek_and_read_refuse_sizes_that_are_not_ints(open_db):
    _db, _root, stream = store(open_db, b"0123456789")
    stream.open()
    with pytest.raises(TypeError, match="seek offset is an int"):
        stream.seek(1.5)  # once accepted, and every later read failed
    with pytest.raises(TypeError, match="ints"):
        stream.read(2.5)
    assert stream.tell() == 0 and stream.read(2) == b"01"


def test_file_view_needs_open_and_close_ends_it(open_db):
    _db, _root, stream = store(open_db, b"abc")
    assert stream.closed
    for use in (stream.read, stream.tell, lambda: stream.seek(0)):
        with pytest.raises(StreamError, match="closed"):
            use()
    stream.open()
    assert not stream.closed
    stream.read(2)
    stream.open()  # open again: back at the start
    assert stream.read() == b"abc"
    stream.close()
    assert stream.closed
    with pytest.raises(StreamError):
        stream.read()


def test_iteration_is_independent_of_the_file_view(open_db):
    data = pattern(STREAM_CHUNK + 10)
    _db, _root, stream = store(open_db, data)
    assert b"".join(stream) == data
    assert stream.closed  # iterating did not open the file view
    stream.open()
    assert stream.read(5) == data[:5]
    first = iter(stream)
    assert next(first) == data[:STREAM_CHUNK]
    assert b"".join(stream) == data  # a second iterator, from the start
    assert stream.tell() == 5  # the file view's position is untouched
    assert stream.read(5) == data[5:10]
    assert next(first) == data[STREAM_CHUNK:]


def test_large_stream_reads_back_exactly(open_db):
    data = pattern(LARGE)
    _db, _root, stream = store(open_db, data, durability="none")
    assert stream.size == LARGE
    chunks = list(stream)
    assert [len(chunk) for chunk in chunks] == [STREAM_CHUNK] * 16 + [3]
    assert b"".join(chunks) == data
    stream.open()
    assert stream.read() == data
    stream.seek(0)
    pieces = []
    while True:
        piece = stream.read(10000)  # reads that straddle chunk boundaries
        if not piece:
            break
        pieces.append(piece)
    assert b"".join(pieces) == data


def test_large_stream_random_seeks(open_db):
    data = pattern(LARGE)
    _db, _root, stream = store(open_db, data, durability="none")
    stream.open()
    rng = random.Random(20240531)
    for _ in range(300):
        start = rng.randrange(LARGE + 10)
        size = rng.choice([0, 1, 2, 3, rng.randrange(3 * STREAM_CHUNK)])
        whence = rng.choice([0, 1, 2])
        if whence == 0:
            stream.seek(start)
        elif whence == 1:
            stream.seek(start - stream.tell(), 1)
        else:
            stream.seek(start - LARGE, 2)
        assert stream.tell() == min(start, LARGE)
        assert stream.read(size) == data[start:start + size]
        assert stream.tell() == min(start + size, LARGE)


def test_read_at_reads_anywhere_and_leaves_the_position_alone(open_db):
    data = pattern(LARGE)
    _db, _root, stream = store(open_db, data, durability="none")
    stream.open()
    stream.seek(7)
    rng = random.Random(7)
    for _ in range(100):
        start = rng.randrange(LARGE + 10)
        size = rng.choice([-1, 0, 1, rng.randrange(3 * STREAM_CHUNK)])
        assert stream.read_at(start, size) == (data[start:] if size < 0
                                               else data[start:start + size])
    assert stream.tell() == 7
    with pytest.raises(ValueError, match="negative offset"):
        stream.read_at(-1, 5)


def test_threads_reading_one_stream_at_their_own_offsets(open_db):
    # A broker's workers serve many readers from one shared stream object.
    data = pattern(LARGE)
    _db, _root, stream = store(open_db, data, durability="none")
    wrong = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(200):
            start = rng.randrange(LARGE)
            if stream.read_at(start, 5000) != data[start:start + 5000]:
                wrong.append(start)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_empty_stream(open_db):
    _db, _root, stream = store(open_db, b"")
    assert stream.size == 0
    assert list(stream) == []
    stream.open()
    assert stream.read() == b"" and stream.read(1) == b""


def test_several_streams_in_one_commit_each_read_back(open_db):
    sizes = [STREAM_CHUNK + 1, 0, 5, 3 * STREAM_CHUNK]
    blobs = [pattern(size + index) for index, size in enumerate(sizes)]
    db = open_db()
    root = Persistent()
    checkout(root)
    root.files = [PersistentFile(io.BytesIO(blob)) for blob in blobs]
    db.elect(root)
    transaction.commit()
    assert [b"".join(stream) for stream in root.files] == blobs
    db.close()
    assert [b"".join(stream) for stream in open_db().root.files] == blobs


def test_stream_readable_from_a_second_database_on_the_file(open_db):
    data = pattern(3 * STREAM_CHUNK + 17)
    db = open_db()
    root = Persistent()
    db.elect(root)
    transaction.commit()
    other = open_db()
    other_root = other.root
    checkout(root)
    root.file = PersistentFile(io.BytesIO(data))
    transaction.commit()
    transaction.begin()  # the second database catches up
    stream = other_root.file
    assert stream is not root.file
    assert b"".join(stream) == data
    stream.open()
    stream.seek(STREAM_CHUNK + 3)
    assert stream.read(STREAM_CHUNK) == data[STREAM_CHUNK + 3:2 * STREAM_CHUNK + 3]


# -- files staged block by block (FileSpan; docs/format.txt) ----------------------


class WholeReadRefused(io.FileIO):
    """A real file that refuses to be read whole: only readinto() may serve."""

    def read(self, size=-1):
        if size is None or size < 0:
            raise AssertionError("the stored file was read whole")
        return super().read(size)

    def readall(self):
        raise AssertionError("the stored file was read whole")


def commit_file(db, pfile, name="file"):
    """Commit PersistentFile `pfile` as `name` of a new root of `db`; return the root."""
    root = Persistent()
    checkout(root)
    setattr(root, name, pfile)
    db.elect(root)
    transaction.commit()
    return root


def test_a_real_file_is_copied_block_by_block_from_its_position(open_db, tmp_path):
    data = pattern(3 * BLOCK + 5)
    path = tmp_path / "upload.bin"
    path.write_bytes(b"header:" + data)
    db = open_db()
    with WholeReadRefused(str(path)) as source:
        source.seek(7)
        root = commit_file(db, PersistentFile(source))
    assert type(root.file) is PersistentStream and root.file.size == len(data)
    assert b"".join(root.file) == data
    assert db.verify()["ok"]


def test_a_file_is_stored_to_its_end_when_the_commit_begins(open_db, tmp_path):
    path = tmp_path / "growing.bin"
    path.write_bytes(b"abc")
    with open(path, "r+b") as source:
        pfile = PersistentFile(source)
        source.seek(0, io.SEEK_END)
        source.write(b"def")
        source.flush()
        root = commit_file(open_db(), pfile)
    assert b"".join(root.file) == b"abcdef"


def test_a_file_that_ends_short_fails_the_commit_in_its_first_phase(
        open_db, tmp_path, monkeypatch):
    path = tmp_path / "shrinking.bin"
    path.write_bytes(pattern(2 * BLOCK))
    db = open_db()
    db.elect(Persistent())
    transaction.commit()
    count_before = db.tx_count
    real_blocks = FileSpan.blocks

    def shrink_first(span, buffers):
        span.source.truncate(BLOCK + 10)  # after its size was taken
        return real_blocks(span, buffers)

    monkeypatch.setattr(FileSpan, "blocks", shrink_first)
    with open(path, "r+b") as source:
        checkout(db.root)
        db.root.file = PersistentFile(source)
        db.root.child = child = Persistent()
        with pytest.raises(StreamError, match="short"):
            transaction.commit()
    transaction.abort()
    monkeypatch.undo()
    assert db.tx_count == count_before + 1, "recorded and counted as a failed commit"
    assert child._p_oid is None and db._log.at_end(), "nothing of it is left"
    checkout(db.root)
    db.root.n = 1
    transaction.commit()
    assert db.verify()["ok"] and not hasattr(db.root, "file")


def test_a_failing_file_fails_every_database_of_the_transaction(open_db, tmp_path):
    first, second = two_databases(open_db, tmp_path)
    source = open(tmp_path / "closed.bin", "w+b")
    source.write(b"data")
    pfile = PersistentFile(source)
    source.close()  # too early: reading it at commit fails
    checkout(first.root)
    first.root.paid = True
    checkout(second.root)
    second.root.file = pfile
    with pytest.raises(StreamError):
        transaction.commit()
    transaction.abort()
    assert not hasattr(first.root, "paid") and not hasattr(second.root, "file")
    for db in (first, second):
        checkout(db.root)
        db.root.n = 1
    transaction.commit()
    assert first.verify()["ok"] and second.verify()["ok"]


def test_a_text_file_or_a_plain_reader_is_read_whole(open_db, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("héllo", encoding="utf-8")
    db = open_db()
    with open(path, encoding="utf-8") as text:
        root = commit_file(db, PersistentFile(text))
    assert b"".join(root.file) == "héllo".encode("utf-8")

    class Reader:
        def read(self):
            return b"plain"

    root = commit_file(db, PersistentFile(Reader()))
    assert b"".join(root.file) == b"plain"


class FailingReader:
    def read(self):
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("make_source", [
    lambda path: FailingReader(),
    lambda path: open(path, "wb"),  # not open for reading
])
def test_a_file_that_cannot_be_read_whole_fails_the_commit_with_stream_error(
        open_db, tmp_path, make_source):
    # A read error of the file to store came out raw: as if the database's
    # own disk had failed.
    db = open_db()
    source = make_source(tmp_path / "source.bin")
    try:
        with pytest.raises(StreamError, match="cannot be read"):
            commit_file(db, PersistentFile(source))
    finally:
        transaction.abort()
        if hasattr(source, "close"):
            source.close()
    assert db.verify()["ok"]


KILLED_WHILE_STAGING = """
import os, sys, transaction
from dobbin.database import Database
from dobbin.log import Log
from dobbin.persistent import PersistentFile, checkout
writes = [0]
real = Log._write
def write(self, buffers, offset):
    real(self, buffers, offset)
    writes[0] += 1
    if writes[0] == 3:  # the staging header and two blocks of the file are in
        os._exit(9)
Log._write = write
db = Database(sys.argv[1])
checkout(db.root)
db.root["backup"] = PersistentFile(open(sys.argv[2], "rb"))
transaction.commit()
"""


def test_a_writer_killed_while_staging_a_stored_dobbin_file_leaves_a_torn_tail(
        open_db, tmp_path):
    # The payload is itself a Dobbin file: its records must never be taken
    # for ours (as witnesses that would make the torn tail look like damage).
    backup = Database(str(tmp_path / "backup.dobbin"), durability="none")
    backup.elect(PersistentDict())
    transaction.commit()
    for n in range(2500):
        checkout(backup.root)
        backup.root[n] = "x" * 500
        transaction.commit()
    backup.close()
    db = open_db()
    db.elect(PersistentDict(kept=1))
    transaction.commit()
    db.close()
    child = subprocess.run([sys.executable, "-c", KILLED_WHILE_STAGING, db.path,
                            str(tmp_path / "backup.dobbin")], env=child_env())
    assert child.returncode == 9
    reopened = open_db(db.path)
    assert ".torn-" in reopened.recovery["saved_as"], "cut as torn, not taken for damage"
    assert dict(reopened.root) == {"kept": 1} and reopened.verify()["ok"]


def test_only_files_of_a_block_or_more_are_staged(open_db, monkeypatch):
    staged = []
    real = staging.stage

    def counting(log, *args):
        staged.append(len(args[2]))
        return real(log, *args)

    monkeypatch.setattr(staging, "stage", counting)
    db = open_db()
    root = commit_file(db, PersistentFile(io.BytesIO(pattern(STAGE_MIN - 1))), "small")
    checkout(root)
    root.big = PersistentFile(io.BytesIO(pattern(STAGE_MIN)))
    transaction.commit()
    assert staged == [STAGE_MIN]
    assert b"".join(root.small) == pattern(STAGE_MIN - 1)
    assert b"".join(root.big) == pattern(STAGE_MIN)


def test_a_commit_failing_after_staging_cuts_the_staged_bytes_back(open_db):
    db = open_db()
    db.elect(Persistent())
    transaction.commit()
    count = db.tx_count
    checkout(db.root)
    db.root.file = PersistentFile(io.BytesIO(pattern(STAGE_MIN)))
    loose = Persistent()
    checkout(loose)  # checked out, never connected: the vote fails after staging
    with pytest.raises(ObjectGraphError):
        transaction.commit()
    transaction.abort()
    assert db.tx_count == count + 1 and db._log.at_end()
    assert db.verify()["ok"]


class HeldFile(io.BytesIO):
    """A file whose reading stops after its first block until `go` is set."""

    def __init__(self, data):
        super().__init__(data)
        self.first_block_read = threading.Event()
        self.go = threading.Event()

    def readinto(self, buffer):
        if self.tell() >= BLOCK:
            self.first_block_read.set()
            if not self.go.wait(10):
                raise OSError("the test never let the copy go on")
        return super().readinto(buffer)


def test_verify_while_a_file_is_being_staged_reports_an_incomplete_tail(open_db, monkeypatch):
    monkeypatch.setattr("dobbin.snapshot.TAIL_WAIT", 0.05)  # the writer holds the lock
    db = open_db()
    db.elect(Persistent())
    transaction.commit()
    source = HeldFile(pattern(3 * BLOCK))
    outcome = []

    def commit_the_file():
        try:
            checkout(db.root)
            db.root.file = PersistentFile(source)
            transaction.commit()
            outcome.append("committed")
        except BaseException as error:  # reported by the main thread
            outcome.append(error)
            transaction.abort()

    writer = threading.Thread(target=commit_the_file)
    writer.start()
    try:
        assert source.first_block_read.wait(10), "the file was never staged"
        watcher = Database(db.path, read_only=True)
        report = watcher.verify()
        watcher.close()
    finally:
        source.go.set()
        writer.join(10)
    assert outcome == ["committed"]
    # The staging header is sound and the file ends inside its record.
    assert report["ok"] and report["errors"] == []
    assert report["incomplete_tail"]["bytes"] >= BLOCK
    assert report["records"] == 1
    after = db.verify()
    assert after["ok"] and "incomplete_tail" not in after and after["streams"] == 1
    assert b"".join(db.root.file) == pattern(3 * BLOCK)


# -- streams of another database (StreamSpan) -----------------------------------------

BIG = 6 * BLOCK + 5


def test_a_large_stream_of_another_database_is_copied_block_by_block(open_db, tmp_path):
    data = os.urandom(BIG)
    source_db, _root, stream = store(open_db, data, path=str(tmp_path / "a.dobbin"))
    target = open_db(str(tmp_path / "b.dobbin"))
    root = Persistent()
    checkout(root)
    root.copy = stream
    target.elect(root)
    peak = peak_bytes_allocated(transaction.commit)
    assert peak < BLOCK  # a few chunks, never the whole stream (6 blocks)
    source_db.close()
    os.remove(source_db.path)  # the copy must not read from it
    assert target.root.copy is not stream and b"".join(target.root.copy) == data
    target.close()
    reopened = open_db(target.path)
    assert b"".join(reopened.root.copy) == data and reopened.verify()["ok"]


def test_states_refer_to_the_copies_of_other_databases_streams_however_deep(
        open_db, tmp_path):
    small, large = b"small stream", os.urandom(2 * BLOCK)
    source_db = open_db(str(tmp_path / "a.dobbin"))
    source_root = Persistent()
    checkout(source_root)
    source_root.small = PersistentFile(io.BytesIO(small))
    source_root.large = PersistentFile(io.BytesIO(large))
    source_db.elect(source_root)
    transaction.commit()
    target = open_db(str(tmp_path / "b.dobbin"))
    root, child = Persistent(), Persistent()
    checkout(root)
    checkout(child)
    root.child = child  # new in the same commit: must keep its identity
    root.nested = [("pair", source_root.large), {"small": source_root.small}]
    child.parent = root
    target.elect(root)
    transaction.commit()
    source_db.close()
    os.remove(source_db.path)
    assert target.root is root and root.child is child and child.parent is root
    (_, large_copy), small_holder = root.nested
    assert b"".join(large_copy) == large and b"".join(small_holder["small"]) == small
    assert large_copy is not source_root.large


def test_a_damaged_stream_of_another_database_fails_the_copy_and_nothing_else(
        open_db, tmp_path):
    data = os.urandom(BIG)
    source_db, _root, stream = store(open_db, data, path=str(tmp_path / "a.dobbin"))
    target = open_db(str(tmp_path / "b.dobbin"))
    target.elect(Persistent())
    transaction.commit()
    count, size = target.tx_count, os.path.getsize(target.path)
    flip_bit(source_db.path, stream._offset + ENTRY_SIZE + 5 * BLOCK)  # chunk 80 of 97
    checkout(target.root)
    target.root.copy = stream
    with pytest.raises(CorruptionError, match="stream chunk 80 checksum mismatch"):
        transaction.commit()
    transaction.abort()
    assert target.tx_count == count + 1  # the failed commit, recorded
    assert os.path.getsize(target.path) < size + BLOCK  # the staged blocks were cut back
    assert not hasattr(target.root, "copy") and target.verify()["ok"]
    checkout(target.root)
    target.root.after = 1
    transaction.commit()
    assert target.root.after == 1


def test_an_io_error_in_the_other_database_fails_the_copy_not_our_log(open_db, tmp_path):
    source_db, _root, stream = store(open_db, os.urandom(BIG), path=str(tmp_path / "a.dobbin"))
    target = open_db(str(tmp_path / "b.dobbin"))
    target.elect(Persistent())
    transaction.commit()
    chunks_read = []

    def failing_disk(offset, crcs, size, index):
        chunks_read.append(index)
        if index == 20:
            raise OSError(5, "Input/output error")
        return read_chunk(offset, crcs, size, index)

    read_chunk = source_db._log.read_stream_chunk
    source_db._log.read_stream_chunk = failing_disk
    checkout(target.root)
    target.root.copy = stream
    with pytest.raises(StreamError, match="Input/output error"):
        transaction.commit()
    transaction.abort()
    assert chunks_read[-1] == 20
    assert target._log.broken is None  # our log still takes commits
    checkout(target.root)
    target.root.after = 1
    transaction.commit()
    assert target.root.after == 1 and target.verify()["ok"]


@pytest.mark.parametrize("size", [6, BIG])  # read whole, and staged
def test_one_file_stored_in_two_databases_at_once(open_db, tmp_path, size):
    data = os.urandom(size)
    first, second = in_commit_order(open_db(str(tmp_path / "a.dobbin")),
                                    open_db(str(tmp_path / "b.dobbin")))
    pfile = PersistentFile(io.BytesIO(data))
    for db in (first, second):
        root = Persistent()
        checkout(root)
        root.file = pfile
        db.elect(root)
    transaction.commit()
    # The first database (the transaction's order) turns the very object
    # into its stream; the second refers to its own copy.
    assert first.root.file is pfile and pfile._jar is first
    assert second.root.file is not pfile and second.root.file._jar is second
    first.close()
    assert b"".join(second.root.file) == data
    for db in (first, second):
        reopened = Database(db.path, read_only=True)
        assert b"".join(reopened.root.file) == data
        reopened.close()


@pytest.mark.parametrize("size", [6, BIG])
def test_one_file_stored_by_two_threads_at_once_conflicts_then_is_copied(
        open_db, tmp_path, size):
    # Both commits read the one file: its position moved under each (wrong
    # bytes, with good checksums), or it "ended short".
    data = os.urandom(size)
    first, second = two_databases(open_db, tmp_path)
    pfile = PersistentFile(io.BytesIO(data))
    voted, tried, first_done = threading.Event(), threading.Event(), threading.Event()
    conflicts = []

    class SlowVoter:
        """Votes after the session (the file claimed), while the other thread commits."""
        transaction_manager = transaction.manager
        abort = commit = tpc_begin = tpc_finish = tpc_abort = lambda self, txn: None

        def sortKey(self):
            return "~after the session"

        def tpc_vote(self, txn):
            voted.set()
            tried.wait(30)

    def store_in_second():
        voted.wait(30)
        for attempt in transaction.manager.attempts():
            with attempt:
                checkout(second.root)
                second.root.file = pfile
                if not conflicts:
                    try:
                        transaction.commit()
                    except ConflictError as conflict:
                        conflicts.append(str(conflict))
                        tried.set()
                        first_done.wait(30)  # the retry copies the stream it became
                        raise
    other = threading.Thread(target=store_in_second)
    other.start()
    checkout(first.root)
    first.root.file = pfile
    transaction.get().join(SlowVoter())
    transaction.commit()
    first_done.set()
    other.join(30)
    assert conflicts and "stored by another thread's commit" in conflicts[0]
    assert first.root.file is pfile and pfile._jar is first
    assert second.root.file is not pfile and second.root.file._jar is second
    for db in (first, second):
        reopened = Database(db.path, read_only=True)
        assert b"".join(reopened.root.file) == data
        reopened.close()


def test_a_file_left_by_an_aborted_commit_is_stored_as_itself_next_time(open_db):
    db = open_db()
    root = Persistent()
    db.elect(root)
    transaction.commit()
    pfile = PersistentFile(io.BytesIO(b"retried"))
    checkout(root)
    root.file = pfile
    root.orphan_checked_out = Persistent()
    checkout(root.orphan_checked_out)
    del root.orphan_checked_out  # an unconnected new object fails the vote
    with pytest.raises(ObjectGraphError):
        transaction.commit()
    transaction.abort()
    checkout(root)
    root.file = pfile
    transaction.commit()
    assert root.file is pfile and type(pfile) is PersistentStream and pfile._jar is db
    assert b"".join(pfile) == b"retried"
