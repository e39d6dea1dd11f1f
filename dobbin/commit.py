"""One database's part of a commit in progress: its record laid out, and
the GC pause of big ones.

`Database` makes a `Commit` when it takes its commit lock.  `lay_out`
turns the session's checkouts into the record's entries (asking
`resolve` about objects changed meanwhile, and giving new objects their
oids); the database then writes and publishes the record
(`_p_commit_finish`) or gives it up (`_p_commit_abort`).  A snapshot
writes its one record through a `Commit` too.
"""

import collections
import copy
import datetime
import decimal
import fractions
import gc
import logging
import os
import threading
import uuid

from dobbin import staging
from dobbin.exc import (ConflictError, DobbinError, LoadError, ReadConflictError,
                        UnstorableError, WriteConflictError)
from dobbin.persistent import Persistent, _set_jar, _set_oid, committed_state
from dobbin.record import (ENTRY_SIZE, TRAILER_SIZE, TX_HEADER_SIZE, ObjectEntry, StreamEntry,
                           stream_entry_size)
from dobbin.serialize import PLAIN_TYPES, load_state
from dobbin.session import KeepPersistent, copy_state, named
from dobbin.stream import (FileSpan, PersistentFile, PersistentStream, StreamSpan,
                           copy_source)

# A commit storing this many objects pauses the cyclic GC until its
# states are installed.
BIG_COMMIT = 1000

# Types (beside PLAIN_TYPES) whose values always load back as pickled:
# a state holding other values is loaded back once before it is stored.
LOADS_BACK = frozenset((datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
                        datetime.timezone, decimal.Decimal, fractions.Fraction, uuid.UUID))

logger = logging.getLogger("dobbin")

# Slot accessors: laying out reads these for every object it stores, and
# Persistent.__getattribute__ is a Python call.
_oid_of = Persistent._p_oid.__get__
_jar_of = Persistent._p_jar.__get__


class _CollectorPause:
    """``with gc_paused:`` holds off the cyclic garbage collector.

    Writing or installing a big commit allocates many containers and
    frees none, so every collection the allocations trigger only scans
    (a quarter of a 100k-object commit's time).  Nested and concurrent
    pauses count: the collector comes back when the last one ends, and
    only if it was on when the first one began.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pausers = 0
        self._was_enabled = False

    def __enter__(self):
        with self._lock:
            if self._pausers == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._pausers += 1

    def __exit__(self, *exc_info):
        with self._lock:
            self._pausers -= 1
            if self._pausers == 0 and self._was_enabled:
                gc.enable()

    def after_fork_in_child(self):
        # The pausing threads are not in the child: none will end its
        # pause, and the collector stayed off there for good.
        self._lock = threading.Lock()
        if self._pausers:
            self._pausers = 0
            if self._was_enabled:
                gc.enable()


gc_paused = _CollectorPause()
os.register_at_fork(after_in_child=gc_paused.after_fork_in_child)


class Commit:
    """One database's part of a commit in progress."""

    def __init__(self, known_tid, offset, oid_high):
        self.known_tid = known_tid   # last tid known before catching up under the lock
        self.offset = offset         # where the record will be written
        self.oid_high = oid_high
        self.locked = True
        self.stored = []             # (obj, state, ObjectEntry)
        self.streams = []            # StreamEntry, laid out first
        self.stream_owners = []      # (PersistentFile or None, offset, size)
        self.stream_offsets = {}     # id(source) -> offset of its S entry
        self.copies = {}             # id(another database's stream) -> its copy here
        self.restated = set()        # ids of stored objects that refer to such streams
        self.streams_end = offset + TX_HEADER_SIZE  # where the next S entry goes
        self.staged = False          # stored files' bytes were copied to the file
        self.new = []                # objects given an oid by this commit
        self.adopted = []            # objects given this jar by this commit
        self.root_oid = None
        self.transaction = None      # the `transaction` whose metadata it records
        self.meta = None             # its MetaEntry, laid out last
        self.published = False
        self.tid = None              # once published: its tid, and the file
        self.durable_at = None       # offset up to which it must be durable
        self.collector_paused = False

    def lay_out(self, session, database, writer, index, log):
        """Check the conflicts of `session`'s checkouts of `database` and lay
        their states out as this record's entries, with the new objects and
        the streams they reach (nothing is written yet).  `writer` is the
        database's StateWriter, `index` its oid index, `log` where stored
        files are staged."""
        queue = collections.deque()
        queued = set()

        def enqueue(obj):
            if id(obj) not in queued:
                queued.add(id(obj))
                queue.append(obj)

        for entry in session.objects_of(database):
            obj = entry.obj
            if obj._p_oid is not None and obj._p_serial != entry.serial:
                obj._p_local[session.thread] = self.resolve(entry, session)
            enqueue(obj)
        root = session.elected.get(database)
        if root is not None and _oid_of(root) is None:
            # A stored root is written only if checked out (above): its
            # shared state may be stale, or not loaded at all.
            enqueue(root)

        references = {}  # of the state being pickled: what each id stands for
        reduced = []  # values of it pickled by their own reduce (see _check_loads_back)

        def persistent_id(value):
            kind = type(value)
            if kind in PLAIN_TYPES:
                return None
            if isinstance(value, Persistent):
                jar = _jar_of(value)
                if jar is None:
                    _set_jar(value, database)
                    self.adopted.append(value)
                elif jar is not database:
                    raise DobbinError("%s refers to %s of another database (%s)"
                                      % (named(obj), named(value), jar.path))
                oid = _oid_of(value)
                if oid is None:
                    oid = self._assign_oid(value)
                    enqueue(value)
                references[oid] = value
                return (oid, kind)
            if isinstance(value, (PersistentFile, PersistentStream)):
                pid = ("S", self._stream_offset(value, obj, database, log))
                references[pid] = value
                return pid
            if kind not in LOADS_BACK:
                reduced.append(value)
            return None

        writer.reference_id = persistent_id
        try:
            while queue:
                obj = queue.popleft()
                oid = _oid_of(obj)
                if oid is None:
                    oid = self._assign_oid(obj)
                state = session.working_state(obj)
                data = writer.dump(type(obj), state)
                if reduced:
                    reduced.clear()
                    _check_loads_back(obj, data, references)
                references.clear()
                entry = ObjectEntry(oid, index.offset_of(oid), data)
                self.stored.append((obj, state, entry))
                if len(self.stored) == BIG_COMMIT:
                    # Paused under the commit lock only: small commits, and
                    # the fsyncs of big ones, never keep the collector off.
                    self.pause_collector()
        finally:
            writer.reference_id = None  # the hook holds this commit's states
        if root is not None:
            self.check_root(session.root_seen.get(database), index)
            if root._p_oid != index.root_oid():
                # Electing the root again changes nothing, and adds no root
                # change for every checkpoint to carry.
                self.root_oid = root._p_oid
        if self.restated:
            self.restate_copied_streams()

    def _assign_oid(self, obj):
        oid = self.oid_high
        _set_oid(obj, oid)
        self.oid_high = oid + 1
        self.new.append(obj)
        return oid

    def _stream_offset(self, value, holder, database, log):
        """The offset of the S entry of stream or stored file `value`, which
        the state of `holder` refers to; laid out here if new to `database`."""
        offset = self.stream_offsets.get(id(value))
        if offset is None:
            if isinstance(value, PersistentFile) and value._p_claim(self):
                # It becomes our stream at publication.
                return self.add_stream(id(value), value._p_source(), value, log)
            if isinstance(value, PersistentStream) and value._jar is database:
                return value._offset
            # Another database's stream, or a file that another database of
            # this transaction stores too (and turns into its stream): we
            # store a copy (block by block, if large).
            source = (copy_source(value) if isinstance(value, PersistentStream)
                      else value._p_source())
            offset = self.add_stream(id(value), source, None, log)
            self.copies[id(value)] = PersistentStream(database, offset)
        if id(value) in self.copies:
            self.restated.add(id(holder))
        return offset

    def add_stream(self, key, data, owner, log=None):
        """Lay out `data` as a stream of this record (streams come first);
        return the offset of its S entry.  `owner` is the PersistentFile
        that becomes its stream at publication, or None.  A `FileSpan` or
        `StreamSpan` is copied to its place in `log` now, not held in
        memory (see `dobbin.staging`)."""
        if isinstance(data, (FileSpan, StreamSpan)):
            self.staged = True
            data = staging.stage(log, self.offset, self.streams_end, data, self.oid_high,
                                 len(self.streams) + 1)
        offset = self.streams_end
        self.streams_end += stream_entry_size(len(data))
        self.streams.append(StreamEntry(data))
        self.stream_owners.append((owner, offset, len(data)))
        self.stream_offsets[key] = offset
        return offset

    def resolve(self, entry, session):
        """The state to store for checkout `entry`, whose object another
        commit changed since it was checked out: its class's
        `_p_resolve_conflict` merge, or a ConflictError (a read conflict if
        this commit learned of the change only now)."""
        obj = entry.obj
        learned_now = obj._p_serial > self.known_tid
        error_class = ReadConflictError if learned_now else WriteConflictError
        error = error_class(oid=obj._p_oid, class_name=type(obj).__qualname__,
                            serials=(entry.serial, obj._p_serial))
        resolver = getattr(type(obj), "_p_resolve_conflict", None)
        if resolver is None:
            raise error
        try:
            if obj._p_ghost:
                obj._p_jar._p_activate(obj)
        except LoadError as failure:  # a state this process cannot load merges with nothing
            raise error from failure
        try:
            # Copies of the committed states: a resolver that changes its
            # arguments (saved["n"] += ...) must change neither what other
            # threads read nor another checkout's starting point.
            resolved = obj._p_resolve_conflict(copy_state(entry.old),
                                               copy_state(committed_state(obj)),
                                               session.working_state(obj))
        except ConflictError:
            raise error from None
        except Exception as failure:  # a broken resolver resolves nothing (as in ZODB)
            logger.exception("_p_resolve_conflict of %s failed", type(obj).__qualname__)
            raise error from failure
        if not isinstance(resolved, dict):
            raise error
        entry.serial = obj._p_serial
        return resolved

    def check_root(self, seen, index):
        """Refuse an election made on the belief that the root was `seen`
        (an oid, or None) once another commit has elected another one: it
        would orphan that root and what was committed under it."""
        current = index.root_oid()
        if current == seen:
            return
        learned_now = bool(index.roots) and index.roots[-1][0] > self.known_tid
        error_class = ReadConflictError if learned_now else WriteConflictError
        raise error_class("database conflict: another commit elected a root (oid %s) after "
                          "this transaction saw %s" % (current, "none" if seen is None
                                                       else "oid %d" % seen), oid=current)

    def restate_copied_streams(self):
        """Make the states of the `restated` objects refer to the `copies`,
        as their records do, rather than to other databases' streams."""
        stored = self.stored
        for index, (obj, state, entry) in enumerate(stored):
            if id(obj) in self.restated:
                # deepcopy takes a value found in its memo as is: each
                # stream, however deep, becomes its copy; persistent
                # objects stay themselves (their __deepcopy__).
                stored[index] = (obj, copy.deepcopy(state, KeepPersistent(self.copies)), entry)

    def record_length(self):
        """The length of the record as laid out so far (as `build_record` makes it)."""
        return (self.streams_end - self.offset + TRAILER_SIZE
                + sum(ENTRY_SIZE + len(entry.data) for _, _, entry in self.stored)
                + (ENTRY_SIZE if self.root_oid is not None else 0)
                + (ENTRY_SIZE + len(self.meta.data) if self.meta else 0))

    def unstage(self, log):
        """Cut back what `add_stream` staged, unless the record was published."""
        if self.staged and not self.published:
            self.staged = False
            staging.unstage(log, self.offset)

    def pause_collector(self):
        """Hold off the cyclic GC until `resume_collector` (a big commit's
        allocations free nothing, so collections would only scan)."""
        if not self.collector_paused:
            gc_paused.__enter__()
            self.collector_paused = True

    def resume_collector(self):
        """End this commit's pause, if it took one (done at most once)."""
        if self.collector_paused:
            self.collector_paused = False
            gc_paused.__exit__()


def _check_loads_back(obj, data, references):
    """UnstorableError unless the record `data` of `obj` loads back.

    A value may pickle and yet not load: an exception whose __init__
    takes other arguments than it passes on, a __reduce__ that names the
    wrong function.  Stored, it would make its object unloadable after a
    restart, and with the root every object.  `references` maps the oids
    and stream ids in `data` to the objects they stand for, given back as
    they are.
    """
    def referenced(pid):
        return references[pid if pid[0] == "S" else pid[0]]

    try:
        load_state(data, referenced, "of %s", named(obj))
    except LoadError as error:
        cause = error.__cause__ or error
        raise UnstorableError("cannot store %s: its state would not load back (%s: %s)"
                              % (named(obj), type(cause).__name__, message_of(cause))) from error


def message_of(error):
    """str(error), or what can be said of it when its __str__ fails."""
    try:
        return str(error)
    except Exception:  # a broken __str__ must not stop the failure being recorded
        return "(its message could not be read)"
