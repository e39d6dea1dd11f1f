"""The database: objects by oid, catch-up, and the commit of checkouts.

It keeps an index of oid -> offset of the object's latest record (built
from record headers, never by unpickling), loads states lazily when an
object is first touched, and turns a session's checkouts into one log
record: lock, catch up, check conflicts and lay out (`dobbin.commit`),
write, publish.
"""

import logging
import os
import threading
import weakref

import transaction
from zope.interface import implementer

from dobbin.broken import BrokenClass, persistent_stand_in
from dobbin.cache import ObjectCache
from dobbin.exc import (CorruptionError, DobbinError, InvalidTypeError, InvalidValueError,
                        LoadError, LockTimeoutError, ReadOnlyError, StorageError)
from dobbin.index import Index, check_oid
from dobbin.interfaces import IDatabase
from dobbin.lock import WriteLock, checked_timeout
from dobbin.log import Log, file_path
from dobbin.record import (CHECKPOINT, COMMITTED, FAILED, KIND_OBJECT, KIND_ROOT, IndexEntry,
                           NoteEntry, RootEntry)
from dobbin.recovery import INCOMPLETE
from dobbin.meta import meta_entry, recent_transactions
from dobbin.notify import Notifier
from dobbin.persistent import Persistent, _set_jar, _set_oid, ghost_oid, new_ghost
from dobbin.serialize import StateWriter, load_state
from dobbin.commit import Commit, message_of
from dobbin.session import (Synchronizer, copy_state, current_session, named,
                            note_root_seen, root_seen)
from dobbin.snapshot import ROOTLESS, snapshot, verify, version_data
from dobbin.stream import PersistentFile, PersistentStream

__all__ = ["Database", "PersistentStream"]

# Slot accessors: loading reads these often, and Persistent.__getattribute__
# is a Python call.
_is_ghost = Persistent._p_ghost.__get__
_serial_of = Persistent._p_serial.__get__
_committed_state = Persistent.__dict__["__dict__"].__get__  # never a thread's working copy

logger = logging.getLogger("dobbin")

# Write a checkpoint once the log has grown by this much and by more
# than the index itself since the last one (see docs/format.txt).
CHECKPOINT_MIN_BYTES = 1 << 14
DEFAULT_CACHE_SIZE = 128 << 20


class _InheritedLock:
    """The state lock of a database in a child forked after it was opened:
    the parent's threads may have held it at the fork, for ever here, so
    every use is refused (the child opens the file anew)."""

    def __init__(self, database):
        self._database = database

    def __enter__(self):
        raise self._database._inherited_error()

    def __exit__(self, *exc_info):
        return False


# Open databases, whose state locks a forked child must not take.
_open_databases = weakref.WeakSet()


def _refuse_state_locks_in_child():
    for database in list(_open_databases):
        database._state_lock = _InheritedLock(database)


os.register_at_fork(after_in_child=_refuse_state_locks_in_child)


@implementer(IDatabase)
class Database:
    """Persistent objects connected to a root, stored in one log file.

    `durability` is "fsync" (the default: a commit returns only once its
    record is on disk) or "none" (the operating system writes it when it
    likes: fast, for bulk loads and tests.  A crashed process loses
    nothing, but a crash of the system may lose the latest commits, and
    if it wrote a later record and not an earlier one the file then opens
    only with `repair`, which keeps what comes before the damage; see
    docs/format.txt).  `lock_timeout` bounds
    the wait for the write lock.  `cache_size` bounds, in bytes, the
    loaded states kept in memory (None: no bound); the oldest loaded
    states that no thread has checked out are dropped first and loaded
    again when touched.  `repair` opens a file with damage in the middle
    by cutting it at the damage (the cut bytes are kept).
    """

    def __init__(self, path, durability="fsync", lock_timeout=30.0,
                 cache_size=DEFAULT_CACHE_SIZE, read_only=False, repair=False):
        self.path = file_path(path)
        self.read_only = read_only
        self.closed = False
        # Options are checked before the file is opened.
        self._cache = ObjectCache(cache_size)
        checked_timeout(lock_timeout)
        self._log = Log(self.path, durability=durability, read_only=read_only)
        self._lock = WriteLock(self._log.fd, self.path, lock_timeout)
        self._pid = os.getpid()
        self._state_lock = threading.RLock()
        _open_databases.add(self)
        self._writer = StateWriter(None)  # reused: a pickler costs more than a small record
        self._notifier = Notifier(self._log)
        self._notify_lock = self._notifier.lock  # a broker server holds it to subscribe
        self._index = Index()
        self._root = None
        self._synchronizer = Synchronizer(self)
        self._threads = threading.local()
        try:
            self._open(repair)
        except BaseException:
            self._log.close()
            raise
        self._register_thread()

    def _open(self, repair):
        checkpoint = self._log.open_checkpoint()
        if checkpoint is not None:
            self._index = Index.from_payload(checkpoint.entries[0].data, self.path,
                                             checkpoint.offset)
        if self.read_only:
            with self._state_lock:
                for record in self._log.follow():
                    self._apply(record)
            # follow() stops quietly where a writer may be writing; damage
            # that a later record proves was durable is no such place.
            problem = None if self._log.at_end() else self._log.diagnose()
            if problem not in (None, INCOMPLETE):
                raise CorruptionError("damaged transaction record (%s); open it for writing "
                                      "with repair=True to keep the transactions before it"
                                      % problem, self.path, self._log.end)
            self.recovery = None
            self._notifier.clear()  # what opening read is no news to subscribers
            self._applied_tid = self._log.last_tid
            return
        self._lock.acquire()
        try:
            with self._state_lock:
                for record in self._log.recover(repair=repair):
                    self._apply(record)
            self.recovery = self._log.dropped
        finally:
            self._lock.release()
        self._applied_tid = self._log.last_tid  # the checkpoint's and every record's
        self._notifier.clear()
        if self.recovery:
            logger.warning("%s: cut %d bytes at offset %d (%s); saved as %s", self.path,
                           self.recovery["bytes"], self.recovery["offset"],
                           self.recovery["reason"], self.recovery["saved_as"])

    # -- public API ------------------------------------------------------

    @property
    def tx_count(self):
        return self._log.last_tid

    @property
    def last_tid(self):
        return self._log.last_tid

    def write_lock_busy(self):
        # Closed, the file has no lock to probe; a commit then fails on its own.
        return not self.closed and self._lock.busy()

    @property
    def durability(self):
        return self._log.durability

    @property
    def cache_size(self):
        """The bound, in bytes, of the loaded states (None: no bound)."""
        return self._cache.cache_size

    def __len__(self):
        return self._index.count

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def root(self):
        self._register_thread()
        with self._state_lock:
            oid = self._index.root_oid()
            note_root_seen(self._threads, oid)  # an election checks it is still the root
            if oid is None:
                return None
            root = self._root
            if root is None or root._p_oid != oid:
                if not self._index.offset_of(oid):
                    raise CorruptionError(ROOTLESS % oid, self.path)
                root = self._root = self.get(oid)
            return root

    def elect(self, obj):
        if not isinstance(obj, Persistent):
            raise InvalidTypeError("the root must be a persistent object, not %r"
                                   % type(obj).__name__)
        if obj._p_jar is not None and obj._p_jar is not self:
            raise DobbinError("%s belongs to another database (%s)" % (named(obj),
                                                                      obj._p_jar.path))
        self._check_writable()
        self._register_thread()
        with self._state_lock:
            seen = root_seen(self._threads, self._index.root_oid())
        current_session().elect(self, obj, seen)

    def get(self, oid):
        check_oid(oid)  # before the cache: True would find oid 1 there
        self._register_thread()
        obj = self._cache.get(oid)
        if obj is not None:
            return obj
        with self._state_lock:
            obj = self._cache.get(oid)
            if obj is not None:
                return obj
            offset = self._index.offset_of(oid)
            if not offset:
                raise KeyError(oid)
            tid, _previous, data = self._log.read_object(offset, oid)
            cls, state, made = self._load_billed(data, oid)
            # Loading may run code (a dict key's __hash__) that loads an
            # object referring back to this one: its ghost is the one, then.
            obj = self._cache.get(oid)
            if obj is None:
                obj = self._new_ghost(oid, cls)
            elif not obj._p_ghost:
                return obj
            self._cache.install(obj, state, tid, len(data), made)
            return obj

    def prefetch(self, objects):
        self._register_thread()
        with self._state_lock:
            ghosts = {}
            for obj in objects:
                oid = ghost_oid(obj, self)
                if oid is not None:
                    offset = self._index.offset_of(oid)
                    if offset:
                        ghosts[offset] = (obj, oid)
            if not ghosts:
                return  # nothing to read: fine on a closed database too
            wanted = [(offset, oid) for offset, (_obj, oid) in ghosts.items()]
            for offset, (tid, _previous, data) in self._log.read_objects(wanted).items():
                obj, oid = ghosts[offset]
                if _is_ghost(obj):
                    self._install_loaded(obj, oid, tid, data)

    def await_publication(self):
        # A commit publishes under the state lock (_p_commit_finish).
        with self._state_lock:
            pass

    def sync(self):
        if self.closed:
            raise ReadOnlyError("%s is closed" % self.path)
        self._register_thread()
        with self._state_lock:
            self._check_caught_up()
            for record in self._log.follow():
                self._apply(record)
            last_tid = self._log.last_tid
        self._notifier.flush(wait=True)
        return last_tid

    @property
    def in_this_process(self):
        """False in a forked child: the database belongs to its parent."""
        return os.getpid() == self._pid

    @property
    def committed_tid(self):
        """The tid of the calling thread's latest commit here, or None."""
        return getattr(self._threads, "committed_tid", None)

    def subscribe(self, callback):
        self._notifier.subscribe(callback)

    def unsubscribe(self, callback):
        self._notifier.unsubscribe(callback)

    def load_state(self, oid, tid=None):
        check_oid(oid)
        if tid is not None and type(tid) is not int:
            raise InvalidTypeError("tid is a transaction id (an int) or None, not %r" % (tid,))
        if tid is not None and tid < 0:
            raise InvalidValueError("a transaction id is never negative, not %d" % tid)
        self._register_thread()
        with self._state_lock:
            # A loaded state is the newest version, right for any snapshot
            # from its serial on; copying it costs less than reading and
            # unpickling its record again (a broker's loads do both).
            obj = self._cache.loaded.get(oid)
            if obj is not None and (tid is None or _serial_of(obj) <= tid):
                return _serial_of(obj), copy_state(_committed_state(obj))
        serial, data = version_data(self, oid, tid)
        return serial, self._load(data, oid)[1]

    def recent_transactions(self, limit=100):
        self.sync()
        return recent_transactions(self._log, limit)

    def close(self):
        if self.closed:
            return
        self.closed = True  # no commit begins from here on
        _open_databases.discard(self)
        if not self.in_this_process:
            # A forked child: its writers, its lock and its syncs are the
            # parent's (and their locks may be held, for ever here).
            self._log.close_inherited()
            return
        # One that another thread is writing holds the write lock: the file
        # must not close under its write (the descriptor could be reused).
        try:
            with self._lock.closing() as alone:
                try:
                    if alone and not self.read_only:
                        self._log.trim()  # closed, a database keeps no disk reserve
                finally:
                    self._log.close()
        except LockTimeoutError:
            if self._log.fd is not None:
                self.closed = False  # still open: close() may be tried again
            raise

    # -- loading -----------------------------------------------------------

    def _register_thread(self):
        # Every entry point into the database calls this (attribute reads
        # of loaded objects can't: that path must stay cheap); see the
        # user's guide.  Synchronizers are per thread, held weakly by the
        # manager.
        if not getattr(self._threads, "registered", False):
            self._threads.registered = True
            transaction.manager.registerSynch(self._synchronizer)

    _p_register_thread = _register_thread

    def _p_activate(self, obj):
        """Load a ghost's state from its latest record."""
        self._register_thread()
        with self._state_lock:
            if not obj._p_ghost:
                return
            oid = obj._p_oid
            offset = self._index.offset_of(oid)
            if not offset:
                raise DobbinError("oid %d has no stored state in %s" % (oid, self.path))
            tid, _previous, data = self._log.read_object(offset, oid)
            self._install_loaded(obj, oid, tid, data)

    def _install_loaded(self, obj, oid, tid, data):
        """Load `data` as `obj`'s state; the ghosts it makes are billed to it."""
        _cls, state, made = self._load_billed(data, oid)
        self._cache.install(obj, state, tid, len(data), made)

    def _load_billed(self, data, oid):
        """`(cls, state, ghosts)`: a record loaded, and the new ghosts it made."""
        made = self._cache.ghosts_made
        cls, state = self._load(data, oid)
        return cls, state, self._cache.ghosts_made - made

    def _load(self, data, oid):
        return load_state(data, self._persistent_load, "of oid %d in %s", oid, self.path)

    def _persistent_load(self, pid):
        if type(pid) is tuple and len(pid) == 2:
            key, value = pid
            if key == "S" and type(value) is int:
                return PersistentStream(self, value)
            if type(value) is BrokenClass:
                value = persistent_stand_in(value)  # a reference's class is persistent
            if type(key) is int and isinstance(value, type) and issubclass(value, Persistent):
                obj = self._cache.get(key)
                if obj is not None:
                    return obj
                with self._state_lock:
                    obj = self._cache.get(key)
                    return self._new_ghost(key, value) if obj is None else obj
        raise LoadError("bad reference %r in %s" % (pid, self.path))

    def _new_ghost(self, oid, cls):
        obj = new_ghost(cls, oid, self)
        self._cache.remember(obj)
        return obj

    def _maybe_checkpoint(self):
        """Append a checkpoint if the log outgrew the last one; lock held."""
        log = self._log
        index_bytes = self._index.size(log.oid_high)
        if log.end - log.checkpoint_end <= max(CHECKPOINT_MIN_BYTES, index_bytes):
            return
        try:
            # Only an index of durable records may be trusted on open: make
            # them durable first (the checkpoint then says lag 0).
            log.flush(log.end)
            log.append(CHECKPOINT, log.oid_high, [IndexEntry(self._index.payload(log.oid_high))],
                       wait=False)
        except StorageError:
            # The commit before it is durable already; only later writes
            # are refused (the log is marked broken).
            logger.exception("could not write an index checkpoint to %s", self.path)

    def _apply(self, record, reload=True, durable_at=None):
        """Take a record into the index; caller holds the state lock.

        Subscribers hear of it once the file is durable up to `durable_at`
        (given for our own commit, whose writer syncs it), or up to its
        end (another writer's record, or one already durable).
        """
        if record.status != COMMITTED:
            self._applied_tid = record.tid
            return
        changed = []
        for entry in record.entries:
            if entry.kind == KIND_OBJECT:
                self._index.set_offset(entry.oid, entry.offset)
                changed.append(entry.oid)
                if reload:
                    obj = self._cache.get(entry.oid)
                    if obj is not None and not obj._p_ghost:
                        self._reload(obj, entry, record.tid)
            elif entry.kind == KIND_ROOT:
                self._index.roots.append((record.tid, entry.oid))
        if durable_at is None:
            self._notifier.note(record.offset + record.length, record.tid, frozenset(changed),
                                ours=False)
        else:
            self._notifier.note(durable_at, record.tid, frozenset(changed))
        self._applied_tid = record.tid

    def _check_caught_up(self):
        """StorageError if a record the log read was never taken in: an
        exception raised asynchronously (KeyboardInterrupt, a timeout's)
        stopped it half-way, and the index and the objects lag the file
        for good (a commit would overwrite what it missed, a checkpoint
        would save the stale index)."""
        if self._applied_tid != self._log.last_tid:
            raise StorageError("%s: taking in transaction %d was interrupted, so this database "
                               "no longer shows its file; close it and open it again"
                               % (self.path, self._applied_tid + 1))

    def _reload(self, obj, entry, tid):
        """Load another writer's new state of a loaded object.

        One that fails to load (its class is missing here, say, in a
        rolling deploy) becomes a ghost of the new record: reading it then
        raises the LoadError, and a thread's commit over it conflicts.  A
        record is taken whole or the index goes stale, silently.
        """
        try:
            self._install_loaded(obj, entry.oid, tid, entry.data)
        except LoadError:
            logger.warning("oid %d of %s changed to a state this process cannot load",
                           entry.oid, self.path, exc_info=True)
            self._cache.unload(obj, tid)

    # -- committing ------------------------------------------------------

    def _check_writable(self):
        if self.closed:
            raise ReadOnlyError("%s is closed" % self.path)
        if self.read_only:
            raise ReadOnlyError("%s is open read-only" % self.path)
        if not self.in_this_process:
            raise self._inherited_error()
        if self._log.broken is not None:
            raise StorageError("%s refuses writes after an I/O error: %s"
                               % (self.path, self._log.broken))

    def _inherited_error(self):
        return DobbinError("%s was opened in process %d; open it anew in process %d"
                           % (self.path, self._pid, os.getpid()))

    def _p_commit_begin(self):
        """Lock and catch up; return the commit's bookkeeping."""
        self._check_writable()
        self._lock.acquire()
        try:
            if self.closed:  # while we waited for the lock
                raise ReadOnlyError("%s is closed" % self.path)
            with self._state_lock:
                self._check_caught_up()
                known = self._log.last_tid
                for record in self._log.recover():
                    self._apply(record)
            if not self._log.synced_end:
                # Our records will vouch for the ones before them (see
                # docs/format.txt): make sure what an earlier writer left is
                # durable first.  Once per database, at its first commit.
                self._log.flush(self._log.end)
        except BaseException:
            self._lock.release()
            self._notifier.flush()
            raise
        # Notes of what we caught up with wait until the session is done
        # (_p_commit_notify): subscribers run unlocked.
        return Commit(known, self._log.end, self._log.oid_high)

    def _p_commit_prepare(self, commit, session):
        """Check conflicts and lay out the record (nothing is written yet)."""
        # The reused writer: under the commit lock, one commit at a time.
        commit.lay_out(session, self, self._writer, self._index, self._log)

    def _p_commit_describe(self, commit):
        """Lay out the transaction's metadata, once every database in the
        transaction has given its new objects their oids."""
        commit.meta = meta_entry(commit.transaction, self, self._log.version)

    def _p_commit_vote(self, commit, several):
        """Claim the record's disk space: with fsync, or when other databases
        take part (a full disk must not half-apply them)."""
        if self.durability == "fsync" or several:
            self._log.claim(commit.offset, commit.record_length())

    def _p_record_failure(self, commit, error):
        """Append a failed record saying why; it is counted, never applied."""
        commit.unstage(self._log)  # the failed record goes where this one would have
        info = {"error": type(error).__name__, "message": message_of(error)[:1000]}
        if type(getattr(error, "oid", None)) is int:  # not another store's bytes oid
            info["oid"] = error.oid
        try:
            with self._state_lock:
                record = self._log.append(FAILED, commit.oid_high, [NoteEntry(info)])
                self._apply(record)
                self._maybe_checkpoint()  # failed records too are replayed on open
        except DobbinError:
            logger.exception("could not record the failed commit in %s", self.path)
        commit.offset = self._log.end

    def _p_commit_finish(self, commit):
        """Write and publish the record; release the lock.  Then
        `_p_commit_sync` makes it durable: a session publishes in every
        database of its transaction before it waits for any disk."""
        entries = list(commit.streams)
        entries.extend(entry for _obj, _state, entry in commit.stored)
        if commit.root_oid is not None:
            entries.append(RootEntry(commit.root_oid))
        if commit.meta is not None:
            entries.append(commit.meta)
        record = None
        try:
            with self._state_lock:
                record = self._log.append(COMMITTED, commit.oid_high, entries, wait=False)
                for obj, state, entry in commit.stored:
                    self._cache.install(obj, state, record.tid, len(entry.data))
                # Commit._stream_offset gives each file one owner; checked all the same.
                for owner, offset, size in commit.stream_owners:
                    if isinstance(owner, PersistentFile):
                        owner._p_become_stream(self, offset, size)
                commit.published = True
                self._apply(record, reload=False, durable_at=record.offset + record.length)
                self._maybe_checkpoint()
        finally:
            if record is None:
                commit.unstage(self._log)
            commit.resume_collector()
            commit.locked = False
            self._lock.release()
        commit.tid, commit.durable_at = record.tid, record.offset + record.length

    def _p_commit_sync(self, commit):
        """Wait until the published record is durable."""
        # Outside the lock: the next writer goes ahead while we wait, and
        # one fsync serves both.
        self._log.flush(commit.durable_at)
        self._threads.committed_tid = commit.tid

    def _p_commit_abort(self, commit):
        """Undo what a commit that won't happen gave to new objects."""
        commit.resume_collector()
        if not commit.published:
            for obj in commit.new:
                _set_oid(obj, None)
            for obj in commit.adopted:
                _set_jar(obj, None)
        if commit.locked:
            commit.unstage(self._log)
            commit.locked = False
            self._lock.release()

    def _p_commit_notify(self):
        """Call the subscribers for the commit and what catching up learned
        (the session calls this once it is released: see Session.tpc_finish)."""
        self._notifier.flush()

    # -- history, snapshot and verify ----------------------------------------

    def snapshot(self, target, until=None):
        snapshot(self, target, until)

    def verify(self):
        return verify(self)

