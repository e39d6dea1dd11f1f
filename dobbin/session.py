"""A thread's checkouts in one transaction, and their two-phase commit.

`checkout` and `Database.elect` join the calling thread's transaction
through one `Session`, the data manager the `transaction` package
drives.  The session asks each database involved to lock, check for
conflicts and write; the databases know the file, the session knows
the thread.
"""

import copy
import logging
import sys
import threading
import weakref

import transaction
from transaction.interfaces import NoTransaction
from zope.interface import implementer

from dobbin.exc import (ConflictError, DobbinError, ObjectGraphError, ReadOnlyError,
                        StorageError)
from dobbin.interfaces import ISession

logger = logging.getLogger(__name__)
_threads = threading.local()
# The keys of the threads whose commit has laid out its record, until it
# ends: a change to a working copy then would be published unwritten.
committing_threads = set()
# Scratch pieces (see _scratch) whose working copy a session installs when
# it finishes: id(obj) -> (session, obj), from its vote to its end.
_scratch_claims = {}
_scratch_claims_lock = threading.Lock()
_object_getattribute = object.__getattribute__
_object_setattr = object.__setattr__


def thread_key():
    """A key for the calling thread's working copies (see `Persistent._p_local`).

    Not the thread's id: ids are reused as soon as a thread ends, and a
    new thread must never find a dead thread's checkouts.  This object is
    unique for as long as any table holds it.
    """
    key = getattr(_threads, "key", None)
    if key is None:
        key = _threads.key = object()
    return key


def current_thread_key():
    """The calling thread's key, or None if it never checked anything out."""
    return getattr(_threads, "key", None)


# Not frozenset or tuple: they may hold mutable objects (see copy_state).
_IMMUTABLE = frozenset((str, bytes, int, float, bool, type(None), complex))


class KeepPersistent(dict):
    """A `copy.deepcopy` memo under which persistent objects are kept, not
    copied (see Persistent.__deepcopy__)."""


def copy_state(state):
    """A deep copy of a state; persistent objects are kept, not copied."""
    copied = {}
    memo = None
    for name, value in state.items():
        if type(value) in _IMMUTABLE:
            copied[name] = value
            continue
        if memo is None:
            memo = KeepPersistent()  # one, so values shared inside the state stay shared
        copy_ = memo.get(id(value))
        if copy_ is None:
            kind = type(value)
            if kind is list and all(map(_kept_as_is, value)):
                # A list of plain values and references, like a B-tree
                # bucket's: deepcopy would visit every item in Python.
                copy_ = memo[id(value)] = value[:]
            elif (kind is tuple or kind is frozenset) and all(map(_kept_as_is, value)):
                copy_ = value  # nothing in it can change: shared
            else:
                try:
                    copy_ = copy.deepcopy(value, memo)
                except RecursionError:
                    raise DobbinError("the value of %r nests too deeply to be copied here "
                                      "(Python's recursion limit)" % (name,)) from None
                except Exception as error:  # a value's own __deepcopy__ or __reduce__
                    raise DobbinError("the value of %r cannot be copied: %s: %s"
                                      % (name, type(error).__name__, error)) from error
        copied[name] = copy_
    return copied


def _kept_as_is(value):
    # Immutable, or persistent (only Persistent has a _p_oid slot), which
    # copies keep by identity.
    kind = type(value)
    return kind in _IMMUTABLE or hasattr(kind, "_p_oid")


def named(obj):
    """Persistent `obj` named in an error message: its class, id and oid,
    not its repr (a mapping's shows every item, loading the objects in them)."""
    oid = _object_getattribute(obj, "_p_oid")
    return object.__repr__(obj) if oid is None else "%s (oid %d)" % (object.__repr__(obj), oid)


def checkout_base(obj):
    """The state the calling thread's checkout of `obj` started from, or
    None if the thread has not checked `obj` out."""
    session = getattr(_threads, "session", None)
    if session is None or session.finished:
        return None
    entry = session.checkouts.get(id(obj))
    return None if entry is None or entry.obj is not obj else entry.old


def note_root_seen(threads, oid):
    """Remember `oid` as the root the calling thread's transaction saw
    first in the database whose thread-local data `threads` is."""
    try:
        txn = transaction.get()
    except NoTransaction:  # an explicit manager outside a transaction
        return
    if getattr(threads, "root_txn", None) is not txn:
        threads.root_txn = txn
        threads.root_seen = oid


def root_seen(threads, oid):
    """The root the calling thread's transaction saw first, or `oid` now."""
    if getattr(threads, "root_txn", None) is transaction.get():
        return threads.root_seen
    return oid


class Synchronizer:
    """Catches its database up whenever a thread that used it begins."""

    def __init__(self, database):
        self._database = weakref.ref(database)

    def beforeCompletion(self, txn):
        pass

    def afterCompletion(self, txn):
        pass

    def newTransaction(self, txn):
        database = self._database()
        # Not one a forked child inherited: its locks may be held by the
        # parent's threads, for ever here.
        if database is not None and not database.closed and database.in_this_process:
            try:
                database.sync()
            except ReadOnlyError:
                if not database.closed:
                    raise  # closing it meanwhile is no error of the new transaction


def current_session():
    """The session of the calling thread's current transaction, joined."""
    txn = transaction.get()
    session = getattr(_threads, "session", None)
    if session is None or session.transaction is not txn or session.finished:
        if txn.status not in _JOINABLE:
            # From a subscriber or an after-commit hook run by commit():
            # nothing could store the change.
            raise DobbinError("this thread's transaction is %s: objects can be checked out "
                              "once it has ended (after commit() returns) or in another "
                              "thread" % txn.status.lower())
        session = Session(txn)
        txn.join(session)
        _threads.session = session
    return session


def session_hints():
    """A dict for shortcuts that hold within the calling thread's current
    transaction only (where a B-tree's last insert went, say), emptied
    when it ends, so that it keeps nothing alive; None before any.
    Consult it after a checkout, which joins the current transaction."""
    session = getattr(_threads, "session", None)
    return None if session is None else session.hints


def transaction_checkouts(database):
    """The checkouts (obj, old, serial) of the calling thread's current
    transaction whose object belongs to `database`, in checkout order;
    none before its first checkout.  Unlike `current_session`, never
    joins the transaction."""
    session = getattr(_threads, "session", None)
    if session is None or session.finished or session.transaction is not transaction.get():
        return []
    return session.objects_of(database)


def serial_at_checkout(obj):
    """The serial `obj` had when the calling thread's current transaction
    checked it out (compare its `_p_serial`: another thread's commit of it
    since changes that), or None if not checked out in it."""
    session = getattr(_threads, "session", None)
    entry = None if session is None else session.checkouts.get(id(obj))
    return entry.serial if entry is not None and entry.obj is obj else None


# The statuses in which a transaction takes new data managers (the
# transaction package's Status.ACTIVE and Status.DOOMED).
_JOINABLE = frozenset({"Active", "Doomed"})


def _scratch(obj):
    """Whether `obj`, new and unconnected at commit, is a scratch object:
    one of the B-tree's pieces, which its own methods check out (so none
    was left out by mistake).  Its changes stay its own."""
    return getattr(type(obj), "_p_checks_itself_out", False)


class _Checkout:
    """One checked-out object: its state and serial when checked out."""

    __slots__ = ("obj", "old", "serial")

    def __init__(self, obj, old, serial):
        self.obj = obj
        self.old = old
        self.serial = serial


@implementer(ISession)
class Session:
    """The data manager of one thread's transaction."""

    def __init__(self, txn):
        self.transaction = txn
        self.transaction_manager = transaction.manager
        self.thread = thread_key()
        self.checkouts = {}   # id(obj) -> _Checkout, in checkout order
        self.elected = {}     # database -> new root object
        self.root_seen = {}   # database -> root oid this transaction saw first
        self._adopted = []    # objects given a jar by elect(), undone on abort
        self._commits = []    # (database, commit) pairs, locked, in lock order
        self._committing = False
        self._failure_recorded = False
        self._locked_all = False
        # Shortcuts valid within this transaction only (see session_hints).
        self.hints = {}
        # Set once the session has left its transaction (committed,
        # aborted, or unjoined by a savepoint rollback): a later checkout
        # in the same transaction joins a new session.
        self.finished = False

    # -- building the transaction --------------------------------------

    def __del__(self):
        # A thread that died inside its transaction never ends it: free
        # what it had checked out when its session goes.
        if not self.finished:
            self._release()

    def add(self, obj, old, serial):
        """Record that `obj` was checked out with state `old` at `serial`."""
        self.checkouts[id(obj)] = _Checkout(obj, old, serial)

    def elect(self, database, obj, seen):
        """Make `obj` the root of `database` when this transaction commits,
        if its root is then still `seen` (an oid, or None)."""
        self.root_seen.setdefault(database, seen)
        before = self.elected.get(database)
        if obj._p_jar is None:
            object.__setattr__(obj, "_p_jar", database)  # the slot: __setattr__ refuses
            self._adopted.append(obj)
        self.elected[database] = obj
        if before is not None and before is not obj:
            self._unadopt()

    def working_state(self, obj):
        """The state to store for `obj`: our copy if checked out, else shared."""
        table = _object_getattribute(obj, "_p_local")
        if table:
            state = table.get(self.thread)
            if state is not None:
                return state
        return _object_getattribute(obj, "__dict__")

    def objects_of(self, database):
        """The checkouts whose object belongs to `database`."""
        return [entry for entry in self.checkouts.values() if entry.obj._p_jar is database]

    # -- IDataManager --------------------------------------------------

    def sortKey(self):
        return "dobbin.session:%d" % id(self)

    def abort(self, txn):
        if self._committing:
            return  # a failed commit: tpc_abort follows and keeps the checkouts
        self._release()
        self.finished = True

    def tpc_begin(self, txn):
        self._committing = True
        self._failure_recorded = False
        self._locked_all = False
        databases = {entry.obj._p_jar for entry in self.checkouts.values()}
        databases.update(self.elected)
        databases.discard(None)
        if len(databases) > 1:
            # A fixed order, so two threads or processes locking two
            # databases can't deadlock: by file identity, which every
            # process sees alike, however it spells the paths.
            identities = _distinct_files(databases)
            databases = sorted(databases, key=lambda db: identities[db])
        for database in databases:
            pending = database._p_commit_begin()
            pending.transaction = txn
            self._commits.append((database, pending))
        self._locked_all = True

    def commit(self, txn):
        try:
            for database, pending in self._commits:
                database._p_commit_prepare(pending, self)
            # Metadata may name objects of any of the databases.
            for database, pending in self._commits:
                database._p_commit_describe(pending)
        except Exception as error:  # an unpicklable state fails the commit too
            self._record_failure(error)
            raise
        # The states are pickled: what another data manager or hook changes
        # from now on could not be stored (persistent.refuse_late_change).
        committing_threads.add(self.thread)
        self.hints = {}  # they shortcut B-tree inserts past checkout()

    def tpc_vote(self, txn):
        scratch = []
        for entry in self.checkouts.values():
            if entry.obj._p_oid is None:
                if not _scratch(entry.obj):
                    error = ObjectGraphError("%s not connected to graph." % named(entry.obj),
                                             entry.obj)
                    self._record_failure(error)
                    raise error
                scratch.append(entry)
        try:
            if scratch:
                self._claim_scratch(scratch)
            for database, pending in self._commits:
                database._p_commit_vote(pending, len(self._commits) > 1)
        except (ConflictError, StorageError) as error:
            self._record_failure(error)
            raise

    def tpc_finish(self, txn):
        commits, self._commits = self._commits, []
        try:
            _finish(commits)
            for entry in self.checkouts.values():
                if entry.obj._p_oid is None:  # a scratch piece (the vote checked)
                    _object_setattr(entry.obj, "__dict__", self.working_state(entry.obj))
        finally:
            committing_threads.discard(self.thread)
            self._release_scratch()
            self._committing = False
            self._release()
            self.finished = True
            # Only now: a subscriber run in this thread finds it released.
            _notify(commits)

    def tpc_abort(self, txn):
        try:
            if self._commits and self._locked_all and not self._failure_recorded:
                # Every database locked, none finished, no failure of ours:
                # another data manager of the transaction failed (the
                # transaction package calls us while handling its
                # exception), or the application aborted in the middle.
                # Our commit failed too.  An interrupt (KeyboardInterrupt,
                # SystemExit) only aborts.
                error = sys.exc_info()[1] or DobbinError(
                    "the transaction was aborted during its two-phase commit")
                if isinstance(error, Exception):
                    self._record_failure(error)
        finally:  # whatever recording did: unlock, and show the latest states
            committing_threads.discard(self.thread)
            self._release_scratch()
            commits, self._commits = self._commits, []
            try:
                for database, pending in commits:
                    database._p_commit_abort(pending)
                self._committing = False
                self._refresh()
            finally:
                _notify(commits)

    def savepoint(self):
        return _Savepoint(self)

    # -- helpers -------------------------------------------------------

    def _claim_scratch(self, pieces):
        """Claim the scratch pieces (checkouts) this commit will install, or
        raise ConflictError if another thread's commit installed one since
        we checked it out, or is about to: ours would overwrite its changes
        piece by piece (a B-tree's keys lost, its length wrong)."""
        with _scratch_claims_lock:
            for entry in pieces:
                claim = _scratch_claims.get(id(entry.obj))
                if ((claim is not None and claim[0] is not self)
                        or _object_getattribute(entry.obj, "__dict__") is not entry.old):
                    raise ConflictError(
                        "another thread committed changes to the never-stored %s since this "
                        "transaction changed it" % type(entry.obj).__name__,
                        class_name=type(entry.obj).__qualname__)
            for entry in pieces:
                _scratch_claims[id(entry.obj)] = (self, entry.obj)

    def _release_scratch(self):
        if not _scratch_claims:  # the usual case: no lock taken per commit
            return
        with _scratch_claims_lock:
            for key in [key for key, claim in _scratch_claims.items() if claim[0] is self]:
                del _scratch_claims[key]

    def _record_failure(self, error):
        self._failure_recorded = True
        for database, pending in self._commits:
            database._p_record_failure(pending, error)

    def _refresh(self):
        # After a failed commit the working copies show the latest
        # committed state, still checked out until the transaction ends.
        for entry in self.checkouts.values():
            obj = entry.obj
            if obj._p_oid is None or obj._p_jar is None:
                continue
            if obj._p_ghost:
                obj._p_jar._p_activate(obj)
            entry.serial = obj._p_serial
            entry.old = _object_getattribute(obj, "__dict__")  # the shared state
            obj._p_local[self.thread] = copy_state(entry.old)

    def _release(self):
        for entry in self.checkouts.values():
            entry.obj._p_local.pop(self.thread, None)
        self.checkouts = {}
        self.elected = {}
        self._unadopt()
        self.hints = {}

    def _unadopt(self):
        """Give back the database of each object elect() gave one that is
        no longer elected and still unstored: an object no root reaches is
        no database's (ObjectGraphError), and may go to another database."""
        elected = {id(obj) for obj in self.elected.values()}
        kept = []
        for obj in self._adopted:
            if id(obj) in elected:
                kept.append(obj)
            elif obj._p_oid is None:
                object.__setattr__(obj, "_p_jar", None)
        self._adopted = kept


def _finish(commits):
    """Publish each database's commit, then wait for each to be durable.

    If the first fails, none is published: the transaction failed.  Once
    one is published, every thread reads it: the others are published all
    the same (a database that fails then misses the transaction, which is
    logged), and the first error is raised once every disk was waited for.
    """
    published, error = [], None
    for database, pending in commits:
        if error is not None and not published:
            database._p_commit_abort(pending)  # unlock; its new objects' oids go back
            continue
        try:
            database._p_commit_finish(pending)
            published.append((database, pending))
        except BaseException as failure:
            database._p_commit_abort(pending)
            if error is None:
                error = failure
            if published:
                logger.critical("%s did not take the transaction that %s took: %s",
                                database.path, ", ".join(db.path for db, _ in published),
                                failure)
    for database, pending in published:
        try:
            database._p_commit_sync(pending)
        except BaseException as failure:
            if error is None:
                error = failure
    if error is not None:
        raise error


def _notify(commits):
    """Tell the subscribers of each database of `commits` what it learned."""
    for database, _pending in commits:
        database._p_commit_notify()


def _distinct_files(databases):
    """{database: (device, inode, path)} of each database's file.

    Two Database objects on one file can't share a transaction: the
    second would wait for the write lock the first holds.
    """
    identities, seen = {}, {}
    for database in databases:
        if database.closed:
            # Its own commit begin says so; until then it sorts by path.
            identities[database] = (-1, -1, database.path)
            continue
        identity = database._log.identity()
        other = seen.setdefault(identity, database)
        if other is not database:
            raise DobbinError("one transaction changes objects of two Database objects open "
                              "on the same file, %s: commit to one of them" % database.path)
        identities[database] = identity + (database.path,)
    return identities


class _Savepoint:
    """A copy of a session's working states, to roll back to."""

    def __init__(self, session):
        self.session = session
        self.checkouts = {key: (entry, copy_state(session.working_state(entry.obj)))
                          for key, entry in session.checkouts.items()}
        self.elected = dict(session.elected)

    def rollback(self):
        session = self.session
        for key, entry in list(session.checkouts.items()):
            if key not in self.checkouts:
                entry.obj._p_local.pop(session.thread, None)
                del session.checkouts[key]
        for key, (entry, state) in self.checkouts.items():
            session.checkouts[key] = entry
            entry.obj._p_local[session.thread] = copy_state(state)
        session.elected = dict(self.elected)
        session._unadopt()
