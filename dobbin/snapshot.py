"""Snapshots and verification of a whole database.

`snapshot` writes a database's state as of one transaction into an empty
database as a single transaction: the full state of every object the root
reaches (others are garbage: a snapshot packs), oids and the oid counter
kept, stream bytes copied; `version_data` finds the
record of an object's version as of a transaction.  `verify` reads the
whole file back through a fresh reader and checks every checksum and
the index.
"""

import array
import os

from dobbin.commit import Commit
from dobbin.exc import (CorruptionError, DobbinError, HistoryError, InvalidTypeError,
                        InvalidValueError, LoadError, LockTimeoutError)
from dobbin.log import Log
from dobbin.record import (CHECKPOINT, COMMITTED, ENTRY_SIZE, FAILED, FILE_HEADER_SIZE,
                           KIND_META, KIND_OBJECT, KIND_STREAM, TRAILER_SIZE, TX_HEADER_SIZE,
                           ObjectEntry, RootEntry, stream_entry_size)
from dobbin.recovery import INCOMPLETE
from dobbin.meta import transaction_info
from dobbin.serialize import StateWriter, load_state
from dobbin.staging import stage_objects
from dobbin.stream import PersistentStream, StreamSpan, copy_source

# Small streams a snapshot holds in memory, at most, before it stages the
# rest block by block like big ones (each staging costs a sync).
HELD_STREAM_BYTES = 16 << 20
# Pickled states a snapshot holds from measuring them to writing them, at
# most; it reads and pickles the others again (see _Copier).  Each held
# state is counted with what holding it costs besides its bytes (a bytes
# object's header, its place in a dict): a million small states cost
# twice their size.
HELD_STATE_BYTES = 32 << 20
HELD_STATE_OVERHEAD = 100
# Objects a snapshot writes as an ordinary record, at most: laying one out
# in memory costs some 500 bytes an object besides its state (its entry
# read back, its header, the joined buffer), staging about 150.
UNSTAGED_OBJECTS = 10000

# How long verify() waits for a writer to finish the record it is writing.
TAIL_WAIT = 1.0

# A root entry naming an object no record stores: only a forged file has one.
ROOTLESS = "the root is oid %d, which no record stores"


class _Reference:
    """A reference read from a record without touching any cache."""

    __slots__ = ("oid", "cls")

    def __init__(self, oid, cls):
        self.oid = oid
        self.cls = cls


class _StreamReference:
    """A stream reference read from a record, for copying."""

    __slots__ = ("offset",)

    def __init__(self, offset):
        self.offset = offset


def version_data(db, oid, tid):
    """`(serial, data)` of `oid`'s newest record in `db` as of `tid` (None: latest)."""
    with db._state_lock:
        offset = db._index.offset_of(oid)
    while offset:
        serial, previous, data = db._log.read_object(offset, oid)
        if tid is None or serial <= tid:
            return serial, data
        if previous >= offset:  # a u64: never negative
            # Each version points back at an older one: this would loop.
            raise CorruptionError("oid %d's version at offset %d points forward to %d"
                                  % (oid, offset, previous), db.path, offset)
        offset = previous
    raise HistoryError("oid %d has no committed state as of transaction %s" % (oid, tid))


def snapshot(source, target, until=None):
    """Write `source`'s state as of `until` into the empty database `target`."""
    if type(target) is not type(source) or target is source:
        raise InvalidTypeError("snapshot() needs another, empty Database as its target")
    if source._log.identity() == target._log.identity():  # ReadOnlyError if one is closed
        raise DobbinError("the snapshot target %s is the source's own file" % target.path)
    source.sync()
    if target.sync():
        raise DobbinError("the snapshot target %s is not empty" % target.path)
    if until is None:
        until = source.last_tid
    if type(until) is not int or not 0 <= until <= source.last_tid:
        raise InvalidValueError("until must be a transaction id from 0 to %d, not %r"
                                % (source.last_tid, until))
    copier = _Copier(source, until)
    copier.measure()
    _write_snapshot(target, copier)


class _OidSet:
    """The oids a snapshot has reached: a bit each below `limit` (it may
    reach millions), a set above (only a damaged file refers there)."""

    def __init__(self, limit):
        self._bits = bytearray(limit // 8 + 1)
        self._others = set()

    def add(self, oid):
        """Add `oid`; return whether it was new."""
        if oid < 8 * len(self._bits):
            byte, bit = oid >> 3, 1 << (oid & 7)
            if self._bits[byte] & bit:
                return False
            self._bits[byte] |= bit
            return True
        if oid in self._others:
            return False
        self._others.add(oid)
        return True


class _Copier:
    """What a snapshot copies: the state, as of `until`, of every object
    the root reaches (others are garbage: a snapshot packs), and the
    streams they refer to.

    Two passes, so that memory holds no more than HELD_STATE_BYTES of
    states however big the database: `measure` walks the objects and
    notes each one's oid and pickled size (enough to lay the record out),
    then `states` gives them again, in the same order, for writing.
    """

    def __init__(self, source, until):
        self.source = source
        self.until = until
        self.oid_high = source._log.oid_high
        with source._state_lock:
            self.root = source._index.root_oid(until)
        self.oids, self.lengths = array.array("Q"), array.array("Q")
        self.held, self.held_bytes = {}, 0  # states kept from measuring to writing
        self.streams, self.stream_offsets = [], {}
        self.position = FILE_HEADER_SIZE + TX_HEADER_SIZE  # where the next stream goes
        self.held_stream_bytes = 0  # small streams held until the record is written
        self._writer = StateWriter(self._rewrite)
        self._reached = None  # during `measure`: the oids found, in the order found,
        self._seen = None     # and the set of them

    def measure(self):
        """The first pass, breadth first: what one state refers to is laid
        out together."""
        if self.root is None:
            return
        seen = _OidSet(self.oid_high)
        seen.add(self.root)
        self._reached = reached = array.array("Q", [self.root])
        self._seen = seen
        at = 0
        while at < len(reached):
            oid = reached[at]
            at += 1
            data = self._state(oid)
            if data is None:
                continue  # a dangling reference (only in a damaged file): it stays one
            self.oids.append(oid)
            self.lengths.append(len(data))
            cost = len(data) + HELD_STATE_OVERHEAD
            if self.held_bytes + cost <= HELD_STATE_BYTES:
                self.held[oid] = data
                self.held_bytes += cost
        self._reached = self._seen = None

    def states(self):
        """The second pass: `(oid, data)` of every object measured, in order."""
        for oid in self.oids:
            data = self.held.pop(oid, None)
            if data is None:
                data = self._state(oid)
            if data is None:
                raise HistoryError("oid %d's state as of transaction %d is gone"
                                   % (oid, self.until))
            yield oid, data

    def all_held(self):
        return len(self.held) == len(self.oids)

    def _state(self, oid):
        """`oid`'s state as of `until`, pickled for the target; None if
        no record has it."""
        try:
            _serial, data = version_data(self.source, oid, self.until)
        except HistoryError:
            return None
        cls, state = load_state(data, self._reference, "of oid %d", oid)
        return self._writer.dump(cls, state)

    def _reference(self, pid):
        key, value = pid
        if key == "S":
            return _StreamReference(value)
        if type(key) is not int or key < 0:
            raise LoadError("a reference to %r, which is not an oid" % (key,))
        if self._reached is not None and self._seen.add(key):
            self._reached.append(key)
        return _Reference(key, value)

    def _rewrite(self, value):
        if type(value) is _Reference:
            return (value.oid, value.cls)
        if type(value) is _StreamReference:
            # Stream bytes are copied (large ones block by block when the
            # record is written): the target must not point into us.
            if value.offset not in self.stream_offsets:
                stream = PersistentStream(self.source, value.offset)
                if self.held_stream_bytes + stream.size > HELD_STREAM_BYTES:
                    data = StreamSpan(stream)  # staged: any number of files fit
                else:
                    data = copy_source(stream)
                    if type(data) is bytes:
                        self.held_stream_bytes += len(data)
                self.stream_offsets[value.offset] = self.position
                self.position += stream_entry_size(len(data))
                self.streams.append(data)
            return ("S", self.stream_offsets[value.offset])
        return None


def _write_snapshot(target, copier):
    """Write a snapshot's one record into `target`: the streams first, in
    the order `copier` laid them out, then the objects, then the root.
    Objects that `copier` could not all hold are staged (written in place
    behind a staging header) before the record itself."""
    target._check_writable()
    target._lock.acquire()
    commit = None
    try:
        with target._state_lock:
            target._check_caught_up()
            for record in target._log.recover():
                target._apply(record)
            # The snapshot laid its streams out from the file header on.
            if target._log.last_tid or target._log.end != FILE_HEADER_SIZE:
                raise DobbinError("the snapshot target %s is not empty" % target.path)
            log, oid_high = target._log, copier.oid_high
            commit = Commit(0, log.end, oid_high)
            for number, data in enumerate(copier.streams):
                commit.add_stream(number, data, None, log)
            root = [] if copier.root is None else [RootEntry(copier.root)]
            if copier.all_held() and len(copier.oids) <= UNSTAGED_OBJECTS:
                objects = [ObjectEntry(oid, 0, data) for oid, data in copier.states()]
            else:
                commit.staged = True
                end = (commit.streams_end + ENTRY_SIZE * len(copier.oids) + sum(copier.lengths)
                       + ENTRY_SIZE * len(root) + TRAILER_SIZE)
                count = len(commit.streams) + len(copier.oids) + len(root)
                objects = [stage_objects(log, log.end, commit.streams_end, copier.lengths,
                                         end - log.end, count, oid_high, copier.states())]
            record = log.append(COMMITTED, oid_high, commit.streams + objects + root)
            commit.published = True
            target._apply(record)
            # Else every open of a big snapshot would replay all of it.
            target._maybe_checkpoint()
    finally:
        if commit is not None:
            commit.unstage(target._log)  # unless published
        target._lock.release()
    target._notifier.flush()


def verify(db):
    """Check every record of `db`'s file and its index; return a report dict."""
    checker = Log(db.path, read_only=True)
    try:
        report = {"path": db.path, "records": 0, "committed": 0, "failed": 0,
                  "checkpoints": 0, "objects": len(db), "streams": 0, "errors": []}
        latest = {}
        _read_records(checker, report, latest)
        # What follows may be a record being written: look again with the
        # write lock held (no write is under way then), if it comes soon.
        locked = not checker.at_end() and _lock_out_writers(db)
        try:
            if locked:
                _read_records(checker, report, latest)
            report["bytes"] = checker.end
            problem = None if checker.at_end() else checker.diagnose()
            if problem is not None:  # None: sound, a commit that came after we read
                if problem == INCOMPLETE:
                    # Not damage: a record still being written (staging a
                    # large file takes a while), or one a crash tore before
                    # it was durable, which the next writer cuts back.
                    report["incomplete_tail"] = {"offset": checker.end,
                                                 "bytes": checker.size() - checker.end}
                else:
                    report["errors"].append("unreadable record at offset %d: %s"
                                            % (checker.end, problem))
        finally:
            if locked:
                db._lock.release()
        for offset, reason in checker.skipped:
            # Redundant, so nothing is lost; but the disk damaged it.
            report["errors"].append("damaged index checkpoint at offset %d (skipped; the "
                                    "log rebuilds it): %s" % (offset, reason))
        with db._state_lock:
            root = db._index.root_oid()
            if root is not None and not db._index.offset_of(root):
                report["errors"].append(ROOTLESS % root)
            for oid, offset in latest.items():
                current = db._index.offset_of(oid)
                # Either side may have read commits the other has not.
                if (offset <= db._log.end and current <= checker.end
                        and current != offset):
                    report["errors"].append("index of oid %d points at %d, log says %d"
                                            % (oid, current, offset))
    finally:
        checker.close()
    report["ok"] = not report["errors"]
    return report


def _read_records(checker, report, latest):
    kinds = {COMMITTED: "committed", FAILED: "failed", CHECKPOINT: "checkpoints"}
    for record in checker.follow():
        report["records"] += 1
        report[kinds[record.status]] += 1
        for entry in record.entries:
            if entry.kind == KIND_OBJECT:
                latest[entry.oid] = entry.offset
            elif entry.kind == KIND_STREAM and record.status == COMMITTED:
                report["streams"] += 1
            elif entry.kind == KIND_META:
                try:
                    transaction_info(record, checker.path)
                except CorruptionError as error:
                    report["errors"].append(str(error))


def _lock_out_writers(db):
    """Take `db`'s write lock, waiting up to TAIL_WAIT seconds; False if not."""
    if db.closed or db._lock.held or os.getpid() != db._pid:
        return False
    try:
        db._lock.acquire(timeout=TAIL_WAIT)
    except LockTimeoutError:
        return False
    return True
