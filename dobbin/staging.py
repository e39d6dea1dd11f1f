"""Stored files staged into the log ahead of their record.

A large stored file is not held in memory: while its commit is prepared
(write lock held), `stage` copies it block by block to its place in the
coming record, behind a synced staging header, and computes its chunk
crcs on the way ("Stored files: staged first" in docs/format.txt).
`unstage` cuts the bytes back for a commit that will not be written.

Synced only with its record, a large copy would keep the disk idle until
the copy is done.  `EarlySync` fdatasyncs what has been written so far,
in a thread, whenever another `every` bytes are written and no earlier
one is still running, so the disk writes while we copy.  It syncs its
own descriptor of the file: the kernel reports a writeback error to one
sync of a descriptor only, and the log's own syncs must see every error
that concerns their records.  An early sync makes nothing durable that
should not be: the staged bytes mean nothing until their record's
trailer is written and synced.  `ReadAhead` likewise reads a large
file's next blocks (and computes their crcs) in a thread while this
one is written.
"""

import array
import contextlib
import os
import queue
import threading
import time

from dobbin.exc import DobbinError
from dobbin.record import (COMMITTED, ENTRY_SIZE, KIND_OBJECT, TRAILER_SIZE, StagedObjects,
                           StagedStream, chunk_table, entry_header, record_header,
                           stream_entry_size)

# Early syncs start after this many bytes written since the last one.
EVERY = 8 * 1024 * 1024
# Staged object entries are written in pieces of about this size.
PIECE = 1024 * 1024

_fdatasync = getattr(os, "fdatasync", os.fsync)


@contextlib.contextmanager
def _staging(log, record_offset, length, oid_high, count):
    """Claim the `length` bytes of the record coming at `record_offset`
    of `log`, write and sync its staging header, and give the copy that
    follows an `EarlySync`.  A copy that fails is cut back and re-raised;
    a failing write or sync marks the log broken, as in `Log.append`."""
    log._check_writable()
    # Allocated first, where the file system can: a full disk then fails
    # this commit alone, while a failed write breaks the log until reopened.
    log.claim(record_offset, length)
    header = record_header(COMMITTED, 0, length, log.last_tid + 1, oid_high, time.time_ns(),
                           log.checkpoint, count)
    early = EarlySync(log.path, EVERY if log.durability == "fsync" else None)
    try:
        log._write(header, record_offset)
        log._exclusive_sync()  # no staged byte may reach the disk without it
        try:
            yield early
        finally:
            early.finish()  # no sync of ours may outlive the copy
    except OSError as error:
        log._fail(error, record_offset)
    except BaseException:
        unstage(log, record_offset)
        raise


def stage(log, record_offset, entry_offset, source, oid_high, count):
    """Copy a stored file's bytes to their place in the record coming at
    `record_offset` of `log` (its S entry at `entry_offset`, the
    `count`-th stream), behind a synced staging header; return a
    `StagedStream`.  `source` has a length and `blocks()` of whole chunks.
    """
    staged_end = entry_offset + stream_entry_size(len(source))
    tables = []
    with _staging(log, record_offset, staged_end + TRAILER_SIZE - record_offset, oid_high,
                  count) as early, ReadAhead(source) as blocks:
        at = entry_offset + ENTRY_SIZE
        for block, table in blocks:
            tables.append(table)
            log._write(block, at)
            at += len(block)
            early.wrote(len(block))
    return StagedStream(len(source), b"".join(tables))


def stage_objects(log, record_offset, at, planned, length, count, oid_high, states):
    """Write O entries back to back from `at` in the record coming at
    `record_offset` of `log`, behind a synced staging header; return
    them as `StagedObjects`.

    `states` yields `(oid, data)`; `planned` is the data lengths they
    were measured at, in order, and the record will be `length` bytes of
    `count` entries in all (a snapshot measures first, so that the
    staging header can cover them: see docs/format.txt).  A state that
    differs from its measure fails the copy, which is cut back.
    """
    tid = log.last_tid + 1
    start, headers, oids = at, bytearray(), array.array("Q")
    with _staging(log, record_offset, length, oid_high, count) as early:
        piece = bytearray()
        for (oid, data), size in zip(states, planned):
            if len(data) != size:
                raise DobbinError("oid %d's state measured %d bytes and came to %d: "
                                  "nothing was written" % (oid, size, len(data)))
            head = entry_header(KIND_OBJECT, oid, tid, 0, size, data)
            headers += head
            oids.append(oid)
            piece += head
            piece += data
            if len(piece) >= PIECE:
                log._write(piece, at)
                at += len(piece)
                early.wrote(len(piece))
                piece = bytearray()
        if piece:
            log._write(piece, at)
            at += len(piece)
        if len(oids) != len(planned):
            raise DobbinError("%d states came of the %d measured: nothing was written"
                              % (len(oids), len(planned)))
    return StagedObjects(start, at - start, headers, oids, planned)


def unstage(log, record_offset):
    """Cut back, synced, what `stage` wrote for a commit that will not be
    written (write lock held).  A failed cut leaves bytes after the
    records: the log refuses writes, and the next opener cuts them."""
    try:
        log._truncate(record_offset)
        log._exclusive_sync()
    except OSError as error:
        log.broken = error


class ReadAhead:
    """The blocks of a stored file with their chunk crc tables, read and
    computed in a thread up to `DEPTH` blocks ahead of their use, so that
    reading the next blocks overlaps writing this one (both release the
    GIL).  A file of fewer than `THREAD_MIN` bytes is read in line: a
    thread costs more than it would save.  Use it as a context manager:
    leaving stops the thread, and an exception raised reading is raised
    by the iteration."""

    DEPTH = 2
    THREAD_MIN = 4 * 1024 * 1024

    def __init__(self, source):
        self._thread = None
        if len(source) < self.THREAD_MIN:
            self._blocks = source.blocks(1)
            return
        # Whole chunks, so each block's crcs are its own; enough buffers
        # for one being filled, DEPTH waiting and one being written.
        self._blocks = source.blocks(self.DEPTH + 2)
        self._ready = queue.Queue(self.DEPTH)
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="dobbin-read-ahead",
                                        daemon=True)

    def __enter__(self):
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info):
        if self._thread is not None:
            self._stop()
        self._blocks.close()

    def _stop(self):
        """Stop the reader and wait for it (it finishes the block it reads),
        however many interrupts come meanwhile: once the commit is over,
        nothing of ours may read the user's file.  The first is raised
        after."""
        self._stopping.set()
        with contextlib.suppress(queue.Empty):
            self._ready.get_nowait()  # a reader waiting to hand a block over goes on
        interrupted = None
        while True:
            try:
                # Not join(): interrupted, Python 3.11's marks the thread
                # stopped while it still runs (bpo-45274's fix).
                self._done.wait()
                break
            except KeyboardInterrupt as error:
                interrupted = interrupted or error
        self._thread.join()  # at once: the reader is done
        if interrupted is not None:
            raise interrupted

    def _read(self):
        try:
            for block in self._blocks:
                if not self._hand_over((block, chunk_table(block), None)):
                    return
            self._hand_over((None, None, None))
        except BaseException as error:  # raised again by the iteration, in the writer
            self._hand_over((None, None, error))
        finally:
            self._done.set()

    def _hand_over(self, item):
        while not self._stopping.is_set():
            with contextlib.suppress(queue.Full):
                self._ready.put(item, timeout=0.05)
                return True
        return False

    def __iter__(self):
        if self._thread is None:
            for block in self._blocks:
                yield block, chunk_table(block)
            return
        while True:
            block, table, error = self._ready.get()
            if error is not None:
                raise error
            if block is None:
                return
            yield block, table


class EarlySync:
    """Background fdatasyncs of the file at `path` while it is written,
    none if `every` is None.

    Call `wrote(n)` after each write and `finish()` once the copy is done
    or abandoned: it waits for the running sync, closes the descriptor,
    and raises the OSError of a sync that failed.
    """

    def __init__(self, path, every=EVERY):
        self.path = path
        self.every = every
        self.started = 0
        self._unsynced = 0
        self._fd = None
        self._thread = None
        self._error = None

    def wrote(self, size):
        self._unsynced += size
        if self.every is None or self._unsynced < self.every or (
                self._thread is not None and self._thread.is_alive()):
            return
        self._raise_failure()
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.every = None  # only a head start: the record's own sync covers all
                return
        self._unsynced = 0
        self.started += 1
        self._thread = threading.Thread(target=self._run, args=(self._fd,),
                                        name="dobbin-early-sync", daemon=True)
        self._thread.start()

    def _run(self, fd):
        try:
            _fdatasync(fd)
        except OSError as error:
            self._error = error

    def finish(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._raise_failure()

    def _raise_failure(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error
