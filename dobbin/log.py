"""The transaction log: Dobbin's file format (see docs/format.txt).

This module knows bytes, offsets and checksums, nothing about objects.
It appends framed, checksummed transaction records with one write and
one fsync, and reads them back; `dobbin.recovery` tells a torn tail (cut
back, bytes kept beside the file) from damage in the middle
(`CorruptionError`).
"""

import contextlib
import errno
import fcntl
import functools
import os
import stat
import struct
import threading
import time
import weakref

from zope.interface import implementer

from dobbin.exc import (CorruptionError, DamagedHistoryError, DobbinError, InvalidValueError,
                        ReadOnlyError, StorageError)
from dobbin.fileid import path_identity
from dobbin.interfaces import ILog
from dobbin.lock import flock_within
# The layout's names are part of the log's API, so they are importable here too.
from dobbin.record import (CHECKPOINT, COMMITTED, ENTRY, ENTRY_SIZE, FAILED,
                           FILE_HEADER, FILE_HEADER_SIZE, FILE_MAGIC, FORMAT_VERSION, KEPT_KINDS,
                           KIND_INDEX, KIND_META, KIND_NOTE, KIND_OBJECT, KIND_ROOT, KIND_STREAM,
                           KINDS, MAX_LAG, READABLE_VERSIONS, STREAM_CHUNK, TRAILER, TRAILER_MAGIC,
                           TRAILER_SIZE, TX_HEADER, TX_HEADER_SIZE, TX_MAGIC, Entry, IndexEntry,
                           MetaEntry, NoteEntry, ObjectEntry, Record, RootEntry, StreamEntry,
                           build_record, header_last, parse_header, stream_size)
from dobbin.reader import (ZERO_HEADER, Damaged, Incomplete, check_entry_offset,
                           newest_checkpoint, object_entry_in, read_record, records_before,
                           stream_entry_at, zeros_from)
from dobbin.record import crc as _crc
from dobbin.record import crc32
from dobbin.recovery import Recovery
from dobbin.space import ReservedSpace

__all__ = ["Log", "DURABILITY", "CHECKPOINT", "COMMITTED", "ENTRY", "ENTRY_SIZE", "FAILED",
           "FILE_HEADER", "FILE_HEADER_SIZE", "FILE_MAGIC", "FORMAT_VERSION", "KEPT_KINDS",
           "KIND_INDEX", "KIND_META", "KIND_NOTE", "KIND_OBJECT", "KIND_ROOT", "KIND_STREAM",
           "KINDS", "MAX_LAG", "READABLE_VERSIONS", "STREAM_CHUNK", "TRAILER", "TRAILER_MAGIC",
           "TRAILER_SIZE", "TX_HEADER", "TX_HEADER_SIZE", "TX_MAGIC", "Entry", "IndexEntry",
           "MetaEntry", "NoteEntry", "ObjectEntry", "Record", "RootEntry", "StreamEntry",
           "build_record", "parse_header", "stream_size"]

_OBJECT_READ = 512
_BATCH_READ = 64 * 1024
_CREATE_TIMEOUT = 30.0
# How long a reader looks again at a file too short to hold its header
# (its creator may not have locked it yet).
_CREATE_GRACE = 0.2
_IOV_MAX = 512
DURABILITY = ("fsync", "none")


# What a read of a log that closed under it may raise: pread of a closed
# descriptor, or of whatever file took its number, and checks failing.
_READ_ERRORS = (OSError, TypeError, DobbinError, Damaged, Incomplete)


def _open_log_read(method):
    """Wrap a read: if close() came meanwhile, the descriptor's number may
    have named another file during the read, so whatever it got or raised
    (EBADF, another file's bytes failing a checksum), it raises ReadOnlyError."""
    @functools.wraps(method)
    def read(self, *args):
        try:
            result = method(self, *args)
        except _READ_ERRORS:
            self._check_open()
            raise
        self._check_open()
        return result
    return read


def _open_log_records(method):
    """`_open_log_read` for a generator of records: checked at each one."""
    @functools.wraps(method)
    def records(self, *args):
        found = method(self, *args)
        while True:
            try:
                record = next(found)
            except StopIteration:
                break
            except _READ_ERRORS:
                self._check_open()
                raise
            self._check_open()
            yield record
        self._check_open()
    return records


def file_path(path):
    """`path` (str, bytes or path-like) as an absolute str: side files,
    checks and messages keep naming the file after a chdir."""
    return os.path.abspath(os.fsdecode(path))


# A write refused for want of room (not an fsync: its pages may be lost).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@implementer(ILog)
class Log(Recovery, ReservedSpace):
    """One Dobbin file, opened for appending and reading.

    The caller (the database) holds the write lock around `append`,
    `recover` and `truncate`; reads need no lock.
    """

    def __init__(self, path, durability="fsync", read_only=False):
        if durability not in DURABILITY:
            raise InvalidValueError("durability must be one of %s, not %r"
                                    % (DURABILITY, durability))
        self.path = file_path(path)
        self.durability = durability
        self.read_only = read_only
        self.broken = None
        self._reserved = 0          # the file's space is allocated up to here
        self._reserving = durability == "fsync" and not read_only
        self._tail_checked = False  # the bytes after the records were found zero to the end
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        try:
            os.stat(self.path)
            created = False
        except FileNotFoundError:  # any other error (no permission...) says what it is
            if read_only:
                raise FileNotFoundError(errno.ENOENT, "no database file", self.path) from None
            created = True
        try:
            # Not blocking: a FIFO at the path would wait for a writer for ever.
            self.fd = os.open(self.path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                              0o644)
        except IsADirectoryError:
            raise DobbinError("%s is a directory, not a database file" % self.path) from None
        try:
            status = os.fstat(self.fd)
            self._identity = (status.st_dev, status.st_ino)
            if not stat.S_ISREG(status.st_mode):
                raise DobbinError("%s is not a regular file, so not a database file" % self.path)
            os.set_blocking(self.fd, True)
            if status.st_size < FILE_HEADER_SIZE:
                if read_only:
                    self._await_creation()
                else:
                    self._create(created)
            self.file_id, self.version = self._read_file_header()
        except BaseException:
            os.close(self.fd)
            raise
        # Dropped unclosed, it gives the descriptor back when collected.
        self._closer = weakref.finalize(self, os.close, self.fd)
        self._closer.atexit = False
        self.end = FILE_HEADER_SIZE
        self.last_tid = 0
        self.oid_high = 1
        self.checkpoint = 0        # offset of the newest checkpoint record
        self.skipped = []          # (offset, reason) of damaged checkpoints stepped over
        self.checkpoint_end = FILE_HEADER_SIZE
        self.synced_end = 0        # bytes known to be durable
        self.written_end = 0       # the end of the last record we appended
        self.synced_tid = 0        # the last tid within them
        self._tail = None          # (offset, tid, time, header) of the last record read or written
        self._sync_done = threading.Condition()
        self._syncing = False

    # -- file header ---------------------------------------------------

    def _create(self, created):
        """Write the file header of a new file, or of one whose creation was torn.

        A file shorter than its header holds no transaction, so starting it
        afresh loses nothing (its bytes are kept beside it all the same).
        Under the file lock: another process may be creating it too.
        """
        flock_within(self.fd, fcntl.LOCK_EX, _CREATE_TIMEOUT, "create " + self.path)
        try:
            size = os.fstat(self.fd).st_size
            if size >= FILE_HEADER_SIZE:
                return  # another process made it meanwhile
            start = os.pread(self.fd, len(FILE_MAGIC), 0)
            if start != FILE_MAGIC[:len(start)]:
                raise CorruptionError("not a Dobbin file (bad magic %r)" % start, self.path, 0)
            if size:
                self.end = 0
                self.last_tid = 0
                self._save_tail("torn-header")
                self._truncate(0)
            self._write_file_header()
            if created or size:
                self._fsync_directory()
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _await_creation(self):
        """Wait for a process creating the file to write its header (it
        holds the file lock meanwhile, once it has taken it: a short file
        is looked at again for a moment).  One still short is refused."""
        deadline = time.monotonic() + _CREATE_GRACE
        while True:
            flock_within(self.fd, fcntl.LOCK_SH, _CREATE_TIMEOUT, "read " + self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            if os.fstat(self.fd).st_size >= FILE_HEADER_SIZE or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def _write_file_header(self):
        body = FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, 0, os.urandom(16),
                                time.time_ns(), bytes(20), 0)[:-4]
        header = body + struct.pack("<I", _crc(body))
        self._write(header, 0)
        self._sync()

    def _read_file_header(self):
        data = os.pread(self.fd, FILE_HEADER_SIZE, 0)
        if len(data) < FILE_HEADER_SIZE:
            raise CorruptionError("file too short for a Dobbin header", self.path, 0)
        magic, version, _flags, _res, file_id, _created, _res2, crc = FILE_HEADER.unpack(data)
        if magic != FILE_MAGIC:
            raise CorruptionError("not a Dobbin file (bad magic %r)" % magic, self.path, 0)
        if crc != _crc(data[:-4]):
            raise CorruptionError("file header checksum mismatch", self.path, 0)
        if version not in READABLE_VERSIONS:
            raise CorruptionError("unsupported format version %d" % version, self.path, 8)
        return file_id, version

    # -- I/O seams: tests replace these to inject failures -------------

    def _write(self, buffers, offset):
        """Write `buffers` (bytes, or a list of them) at `offset`, all of them.

        A list goes out with ``pwritev``, so a large payload is written
        from where it lies instead of being copied into one buffer first.
        """
        if isinstance(buffers, (bytes, bytearray, memoryview)):
            buffers = [buffers]
        if len(buffers) == 1 and os.pwrite(self.fd, buffers[0], offset) == len(buffers[0]):
            return  # a small record: one buffer, written whole (the usual case)
        pending = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
        while pending:
            written = os.pwritev(self.fd, pending[:_IOV_MAX], offset)
            offset += written
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]

    def _sync(self):
        if self.durability == "fsync":
            _fdatasync(self.fd)

    def _exclusive_sync(self):
        """`_sync`, never beside another sync of this descriptor (flush's
        included).  The kernel reports a writeback error to one sync of a
        descriptor only: a failure marks the log broken before any other
        sync can start, and succeed, and be believed."""
        with self._sync_done:
            while self._syncing:
                self._sync_done.wait()
            self._syncing = True
        try:
            self._sync()
        except OSError as error:
            self.broken = error
            raise
        finally:
            with self._sync_done:
                self._syncing = False
                self._sync_done.notify_all()

    def _truncate(self, size):
        os.ftruncate(self.fd, size)
        self._reserved = min(self._reserved, size)

    def _fsync_directory(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- writing -----------------------------------------------------------

    def append(self, status, oid_high, entries, time_ns=None, wait=True):
        """Write one record at the end; return it as a `Record`.

        The caller holds the write lock and has read every record up to
        the end (so `self.end` is the end of the records).  With `wait` it
        returns once the record is durable; without, the caller calls
        `flush` after giving the lock up, so that one fsync can serve
        several commits.  On a write error the record is cut off again
        and the log refuses further writes.
        """
        self._check_writable()
        tid = self.last_tid if status == CHECKPOINT else self.last_tid + 1
        offset = self.end
        stamp = time_ns or time.time_ns()
        # Without fsync we never know what is durable: claim everything, so
        # damage before a valid record is reported, never silently cut.
        lag = 0 if self.durability != "fsync" else min(self.last_tid - self.synced_tid, MAX_LAG)
        segments, length, read_entries = build_record(status, tid, oid_high, offset,
                                                       self.checkpoint, lag, entries, stamp)
        header = None
        if status == CHECKPOINT:
            segments, header = header_last(segments)
        written_header = bytes(memoryview(header or segments[0][1][0])[:TX_HEADER_SIZE])
        self._reserve(offset, length)
        try:
            try:
                for at, buffers in segments:
                    self._write(buffers, at)
            except OSError as error:
                if error.errno not in _NO_ROOM:
                    raise
                self._refuse_record(error, offset)
            if header is not None:
                # The body durable first: no power cut leaves a sound
                # header over a lost body, which recovery must step over.
                self._exclusive_sync()
                self._write(header, offset)
        except OSError as error:
            self._fail(error, offset)
        record = Record(tid, status, offset, length, oid_high, stamp, self.checkpoint, lag,
                        read_entries)
        self._advance(record)
        self._tail = (offset, tid, stamp, written_header)
        self.written_end = self.end
        if wait:
            self.flush(self.end)
        return record

    def flush(self, end):
        """Return once the file's first `end` bytes are durable.

        Group commit: one fsync covers every record written before it
        starts, so threads that commit together share it.  A failed fsync
        leaves the page cache in an unknown state; retrying could report
        success for lost data, so the log refuses writes from then on.
        The bytes are not cut (another process may already hold the
        lock): the commit's outcome is unknown until the file is reopened.
        """
        if self.durability != "fsync":
            return
        with self._sync_done:
            while self.synced_end < end:
                if self.broken is not None:
                    raise StorageError("%s refuses writes after an I/O error: %s"
                                       % (self.path, self.broken))
                if self._syncing:
                    self._sync_done.wait()
                    continue
                if self.fd is None:
                    raise ReadOnlyError("%s was closed before the commit was durable"
                                        % self.path)
                self._syncing = True
                # Tid first, then end: a racing append can only make us
                # claim less, never more.
                target_tid = self.last_tid
                target = self.end
                self._sync_done.release()
                error = None
                try:
                    self._sync()
                except OSError as failure:
                    error = failure
                finally:
                    self._sync_done.acquire()
                    self._syncing = False
                    self._sync_done.notify_all()
                if error is not None:
                    self.broken = error
                    raise StorageError("fsync of %s failed (%s); the database refuses further "
                                       "writes until reopened" % (self.path, error)) from error
                self.synced_end = max(self.synced_end, target)
                self.synced_tid = max(self.synced_tid, target_tid)

    def _refuse_record(self, error, offset):
        """A write found no room (a full disk, a quota): nothing written
        before is in doubt, so the record is cut off and only it fails."""
        try:
            self._truncate(offset)
        except OSError:
            self._fail(error, offset)
        raise StorageError("no room for a record in %s (%s): it was not written"
                           % (self.path, error)) from error

    def _fail(self, error, offset):
        # After a failed write or fsync the page cache can't be trusted
        # (retrying fsync may "succeed" having lost the data), so cut the
        # record back and refuse writes until the database is reopened.
        try:
            self._truncate(offset)
            self._exclusive_sync()
        except OSError:
            pass  # the tail is torn at worst; recovery on open cuts it
        self.broken = error
        raise StorageError("write to %s failed (%s); the database refuses further writes "
                           "until reopened" % (self.path, error)) from error

    def _check_writable(self):
        if self.read_only:
            raise ReadOnlyError("%s is open read-only" % self.path)
        if self.fd is None:
            raise ReadOnlyError("%s is closed" % self.path)
        if self.broken is not None:
            raise StorageError("%s refuses writes after an I/O error: %s"
                               % (self.path, self.broken))

    def _advance(self, record):
        # See _check_records_kept; the header's bytes once it has read them.
        self._tail = (record.offset, record.tid, record.time, None)
        self.end = record.offset + record.length
        self.last_tid = record.tid
        self.oid_high = max(self.oid_high, record.oid_high)
        if record.status == CHECKPOINT:
            self.checkpoint = record.offset
            self.checkpoint_end = self.end

    def open_checkpoint(self):
        """Start from the newest checkpoint: return its record (see
        `dobbin.reader.newest_checkpoint`), or None; afterwards `recover` or
        `follow` replay only the records after it."""
        record = newest_checkpoint(self.fd, self.size())
        if record is not None:
            self._advance(record)
        return record

    # -- reading -------------------------------------------------------

    def size(self):
        return os.fstat(self.fd).st_size

    def check_same_file(self):
        """StorageError unless the path still names the file we opened:
        once it was deleted, or replaced (a backup restored by renaming
        it over the file), our commits would go to a file nobody opens."""
        named = path_identity(self.path)
        if named != self._identity:
            raise StorageError("%s is no longer the file this database opened (it was %s): "
                               "writing on would lose the commits; close the database and "
                               "open it again" % (self.path, "deleted" if named is None
                                                  else "replaced by another file"))

    @_open_log_read
    def at_end(self):
        """Have the records been read to their end (reserved space aside)?"""
        size = self.size()
        return self.end >= size or zeros_from(self.fd, self.end, size)

    def _peek(self):
        """The bytes where the next record would start (b"" at the end of
        the file): a header's worth, and the kind of a first entry.
        Not asking the size: on Linux 6.18 an fstat before each small write
        made its fdatasync a third slower (multigrain timestamps, likely)."""
        return os.pread(self.fd, TX_HEADER_SIZE + 1, self.end)

    @_open_log_records
    def follow(self):
        """Yield the complete, valid records after `self.end`, advancing.

        Used to catch up without the write lock: it stops quietly before
        a record that is incomplete or fails a check, which may be a
        commit still being written; the next writer deals with it.
        """
        while True:
            head = self._peek()
            if len(head) < TX_HEADER_SIZE or (head.startswith(ZERO_HEADER)
                                              and head[TX_HEADER_SIZE:] != KIND_INDEX):
                # The end, reserved space, or a record still being written
                # (a checkpoint without its header yet is read: one with a
                # record after it lost its header, see read_record): but
                # after our records, still?
                self._check_records_kept()
                return
            file_size = self.size()
            try:
                record = read_record(self.fd, self.end, self.last_tid + 1, file_size)
            except Damaged as damage:
                if damage.skip_to is None or not self._sound_at(damage.skip_to, file_size):
                    self._check_records_kept()
                    return
                self._skip(damage)
                continue
            except Incomplete:
                self._check_records_kept()
                return
            self._advance(record)
            yield record

    @_open_log_records
    def records_before(self, end, max_bytes):
        """`dobbin.reader.records_before` in this log; damage raises DamagedHistoryError."""
        try:
            yield from records_before(self._reading_fd(), end, self.size(), max_bytes)
        except Damaged as damage:
            raise DamagedHistoryError("damaged record in the history (%s)" % damage.reason,
                                      self.path, damage.offset) from None

    # -- random access -------------------------------------------------

    def _reading_fd(self):
        self._check_open()
        return self.fd

    def _check_open(self):
        if self.fd is None:
            raise ReadOnlyError("%s is closed" % self.path)

    def identity(self):
        """(device, inode) of the open file, as found when it was opened
        (asking again would slow the next fdatasync: see dobbin.fileid)."""
        self._check_open()
        return self._identity

    @_open_log_read
    def read_object(self, offset, oid=None):
        """Return `(tid, previous, data)` of the O entry at `offset`, checked."""
        # Most states are small: one read usually brings header and data.
        check_entry_offset(offset, self.end, self.path)
        block = os.pread(self._reading_fd(), _OBJECT_READ, offset)
        return self._object_in(block, 0, offset, oid)

    @_open_log_read
    def read_objects(self, wanted):
        """Return `{offset: (tid, previous, data)}` for the O entries `wanted`
        (`(offset, oid)` pairs), each checked as by `read_object`.

        Entries less than `_BATCH_READ` bytes apart come in one read: the
        states one commit wrote together are usually read together.
        """
        fd = self._reading_fd()
        wanted = sorted(wanted)
        if wanted:  # sorted: the first and the last bound them all
            check_entry_offset(wanted[0][0], self.end, self.path)
            check_entry_offset(wanted[-1][0], self.end, self.path)
        found = {}
        first = 0
        while first < len(wanted):
            start = wanted[first][0]
            last = first + 1
            while last < len(wanted) and wanted[last][0] - start < _BATCH_READ:
                last += 1
            block = os.pread(fd, wanted[last - 1][0] - start + _OBJECT_READ, start)
            for offset, oid in wanted[first:last]:
                found[offset] = self._object_in(block, offset - start, offset, oid)
            first = last
        return found

    def _object_in(self, block, at, offset, oid):
        return object_entry_in(self._reading_fd(), block, at, offset, oid, self.end, self.path)

    @_open_log_read
    def open_stream(self, offset):
        """Return `(size, chunk_crcs)` of the S entry at `offset`, checked."""
        return stream_entry_at(self._reading_fd(), offset, self.end, self.path)

    def read_stream_chunk(self, offset, chunk_crcs, size, index):
        """Return chunk `index` of the stream whose S entry is at `offset`.
        (`_open_log_read` spelled out: a reader's time goes here.)"""
        start = index * STREAM_CHUNK
        want = min(STREAM_CHUNK, size - start)
        try:
            data = os.pread(self._reading_fd(), want, offset + ENTRY_SIZE + start)
        except _READ_ERRORS:
            self._check_open()
            raise
        if len(data) != want or crc32(data) != chunk_crcs[index]:
            self._check_open()
            raise CorruptionError("stream chunk %d checksum mismatch" % index, self.path, offset)
        self._check_open()
        return data

    def stream_chunks(self, offset, chunk_crcs, size):
        """Yield the chunks of the stream whose S entry is at `offset`, in order."""
        for index in range(len(chunk_crcs)):
            yield self.read_stream_chunk(offset, chunk_crcs, size, index)

    def close(self):
        if self.fd is None:
            return
        try:
            if self.broken is None and self.written_end > self.synced_end:
                # A commit written but not yet synced (its writer gave the
                # lock up and is on its way to flush): made durable here.
                self.flush(min(self.written_end, self.end))
        finally:
            # Not under a sync in progress: it would sync whatever file took
            # the descriptor next, and report our data durable.
            with self._sync_done:
                while self._syncing:
                    self._sync_done.wait()
                closing, self.fd = self.fd, None
            if closing is not None:
                # The lock goes with the descriptor, unless a forked child
                # holds a copy of it: then only this gives it back.
                with contextlib.suppress(OSError):
                    fcntl.flock(closing, fcntl.LOCK_UN)
                self._closer()

    def close_inherited(self):
        """Close a forked child's copy of the descriptor, waiting for
        nothing: the syncs and writes in progress are the parent's."""
        closing, self.fd = self.fd, None
        if closing is not None:
            self._closer()


def _fdatasync(fd):
    # fdatasync covers the data and the file size of an append, which is
    # all a reader needs; macOS lacks it.
    getattr(os, "fdatasync", os.fsync)(fd)
