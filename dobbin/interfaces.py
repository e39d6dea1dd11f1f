"""The contracts of the Dobbin store.

Read top to bottom, this module describes the whole store: persistent
objects (`IPersistent`) live in a database (`IDatabase`), which keeps
them in a log file (`ILog`) guarded by a write lock (`IWriteLock`).  A
thread changes objects through checkouts that a session (`ISession`)
commits with the `transaction` package's two-phase commit.
"""

from transaction.interfaces import IDataManager, ISavepointDataManager
from zope.interface import Attribute, Interface


class IPersistent(Interface):
    """An object stored in a database, shared read-only between threads.

    Its committed state is shared by all threads and is never changed in
    place.  Setting or deleting an attribute raises ``RuntimeError``
    unless the calling thread has checked the object out
    (`dobbin.persistent.checkout`), or the object is new and its
    ``__init__`` is running.  A checked-out object shows the thread its
    own working copy until the thread's transaction ends.

    Its state is its instance ``__dict__``, stored and loaded as it is: a
    subclass that declares ``__slots__`` or has ``__getstate__`` or
    ``__setstate__`` (which would be ignored) raises ``TypeError`` when
    it is defined.  There is no ``_p_changed`` to set: a checked-out
    object is stored whole (setting it on one is harmless, on any other a
    ``RuntimeError`` asking for a checkout); other ``_p_`` names are the
    database's, and setting one raises ``AttributeError``.  ``copy.copy``
    and ``copy.deepcopy`` of a persistent object raise ``TypeError`` (a
    checkout's copy of a state keeps the objects it refers to).
    """

    _p_oid = Attribute(
        """The object id, an int unique for the life of the file, or None.

        Assigned by the database when the object is first committed;
        never reused, not even after a failed commit or a reopen.  Setting
        it raises AttributeError.
        """)

    _p_jar = Attribute(
        """The database the object belongs to, or None while it is new.""")

    _p_serial = Attribute(
        """The id of the transaction that committed the shared state; 0 if new.""")


class IPersistentDict(IPersistent):
    """A persistent mapping with the full `dict` API.

    Items and attributes are independent.  Reading needs nothing; every
    mutating method (``__setitem__``, ``__delitem__``, ``clear``, ``pop``,
    ``popitem``, ``setdefault``, ``update``) raises ``RuntimeError``
    unless the dict is checked out by the calling thread.  Changing one
    item rewrites the whole dict: for large or hot mappings use
    `dobbin.btree.OOBTree`.
    """


class IBroken(Interface):
    """A stand-in for an object whose class could not be imported when
    its record was loaded (`dobbin.broken`).

    Its stand-in class has the missing class's module and name, and its
    ``_p_broken`` says why the import failed.  A persistent stand-in
    (an `IPersistent`) reads as stored; checking it out raises
    `dobbin.exc.BrokenObjectError`.  A value stand-in shows the stored
    attributes of its state; changing it raises `BrokenObjectError`.
    Either is written back as it was loaded when a record holding it is
    stored again, naming the missing class, so restoring the class brings
    the objects back on the next open.
    """

    _p_broken = Attribute("Why the class could not be imported (text).")


class IPersistentFile(Interface):
    """A single-use wrapper storing an open file's remaining bytes.

    At commit its bytes, from the file's position when it was wrapped to
    the end, are written into the transaction, and the same object
    becomes an `IPersistentStream`.  A seekable binary file is copied
    block by block while the commit is prepared, never held whole in
    memory; if reading it fails (it ends short of its size when the
    commit began, say), the commit fails with `dobbin.exc.StreamError`
    and nothing is committed (a failed record says why; the blocks copied
    are cut back).  Anything else is read whole, once.
    The caller closes the file.
    """


class IPersistentStream(Interface):
    """Stored bytes, read back from the log chunk by checked chunk.

    Damaged bytes raise `dobbin.exc.CorruptionError`; they are never
    returned.  Iteration yields ``bytes`` chunks through a handle of its
    own, independent of the file-like methods.  Stored in another
    database (or copied by a snapshot), its bytes are copied there chunk
    by chunk, never whole in memory, and the object stored there reads
    the copy once committed.
    """

    size = Attribute("Number of bytes in the stream.")
    closed = Attribute("True unless the file-like view is open.")

    def open():
        """Open the file-like view at position 0."""

    def read(size=-1):
        """Return up to `size` bytes from the position (all if negative).

        Never reads past the end of the stream.  Raises
        `dobbin.exc.StreamError` if the view is closed.
        """

    def read_at(offset, size=-1):
        """Read up to `size` bytes from `offset` (all that remain if `size` is
        negative) without using or moving the shared position: safe from
        several threads.  A negative offset is a ValueError."""

    def seek(offset, whence=0):
        """Move the position as ``io.IOBase.seek`` would; clamp at the end."""

    def tell():
        """Return the position."""

    def close():
        """Close the file-like view."""

    def __iter__():
        """Yield the stream's bytes in chunks."""


class IDatabase(Interface):
    """Persistent objects connected to a root, kept in one log file.

    A database may be shared by any number of threads.  Several
    databases, in one process or several, may open one file: each sees
    the others' commits from its next transaction (it catches up when a
    thread that used it begins a transaction, and at every commit).
    """

    path = Attribute("The file's path.")
    root = Attribute("The root object, or None while there is none.")
    tx_count = Attribute(
        """Transaction records in the file, committed and failed.""")
    last_tid = Attribute("The id of the newest transaction known.")
    in_this_process = Attribute(
        """False in a child forked after opening: the database is its
        parent's; the child opens the file anew, and may only close this.""")

    def __len__():
        """Return the number of objects stored."""

    def elect(obj):
        """Make `obj` the root object when the current transaction commits.

        The object joins this database at once (``obj._p_jar``).  If
        another commit elects a root after this transaction first read
        ``root`` (or, had it not, after this call), the commit raises a
        `dobbin.exc.ConflictError`, which ``transaction.manager.attempts()``
        retries, rather than orphan that root.
        """

    def get(oid):
        """Return the object with id `oid`; raise ``KeyError`` if none."""

    def prefetch(objects):
        """Load the states of the ghosts of this database among `objects`
        now, together (one read for states stored close together).

        Anything else in `objects` is ignored.  A hint: the same states
        would load one by one on first access.
        """

    def await_publication():
        """Return once no commit is publishing its new states here.

        A commit replaces the shared states of its objects one by one;
        a reader that met part of its change (a B-tree bucket unlinked,
        its parent not yet; a state whose serial is not yet set) waits
        for the rest instead of reading again in vain.
        """

    committed_tid = Attribute(
        """The tid of the calling thread's latest successful commit, or None.""")

    def sync():
        """Catch up with other writers' commits now; return `last_tid`.

        When it returns T, the subscribers have been called for every
        committed transaction up to T that is durable.
        """

    def write_lock_busy():
        """True when a commit (of any thread or process) holds the file's
        write lock now: a hint, for callers that would rather not wait.
        `dobbin.exc.DobbinError` in a forked child (see `in_this_process`)."""

    def subscribe(callback):
        """Call ``callback(tid, oids)`` for each committed transaction learned.

        Called once per transaction, in order, after its changes are
        visible, for this database's commits and for other writers'
        commits found while catching up, once durable (another writer's,
        by an fdatasync of this database's own if its writer's has not
        returned yet); ``oids`` is a frozenset of the objects whose state
        changed.  A callback subscribed twice is called twice.  It runs
        in the thread that
        committed or caught up, never while the write lock is held, must
        be quick, and must not raise (errors are logged and dropped).

        A callback may read objects, call ``sync()`` (which then catches
        up but does not wait for the callbacks still to come: they run
        after this one) or ``last_tid``, and hand work to other threads
        (which may commit).  It must not
        commit, abort or begin a transaction in the thread it runs in:
        that thread may be in the middle of its own commit (the callback
        of its own transaction runs from inside ``transaction.commit()``,
        once the thread's checkouts are released; a checkout there raises
        DobbinError).  A callback that waits for another thread's
        callbacks deadlocks.
        """

    def unsubscribe(callback):
        """Stop calling `callback` (once, if subscribed twice); ValueError
        if it is not subscribed."""

    def load_state(oid, tid=None):
        """Return ``(serial, state)`` of `oid` as of transaction `tid`.

        ``tid`` None means the latest.  Raises
        `dobbin.exc.HistoryError` if the object had no committed state
        then.  References in the state are live objects of this
        database.
        """

    def recent_transactions(limit=100):
        """Return what the latest `limit` committed transactions recorded
        of themselves, newest first: `dobbin.meta.TransactionInfo` tuples
        ``(tid, time, user, description, extension)``.

        A commit records its `transaction`'s ``user``, ``description``
        and ``extension`` (JSON values; a stored persistent object in the
        extension is recorded as its oid).  Catches up first, like
        `sync`.  Reads at most 64 MiB of records back (a record bigger
        than what is left, a stored file, is skimmed: only its metadata is
        read).  It steps over a damaged checkpoint (only redundant); any
        other damage raises `dobbin.exc.DamagedHistoryError`, whose
        `found` holds the sound transactions after it.
        """

    def snapshot(target, until=None):
        """Write the state as of transaction `until` (default: now) into `target`.

        `target` must be an empty database.  It receives one transaction
        holding the full state of every object the root reached then,
        stream bytes copied (chunk by chunk), oids and the oid counter
        preserved.  Objects the root no longer reached are garbage and
        are left out: a snapshot is also how a database is packed.  It may
        run while other threads and processes commit, so it is also how
        a live database is backed up (a copy of the file made while it is
        written may be damaged).
        """

    def verify():
        """Check every record's checksums and the index; return a report dict.

        "ok" is false when "errors" lists damage.  Counts of records,
        commits, failed commits, checkpoints, objects and streams come
        with it.  What follows the last whole record is looked at again
        with the write lock held (waited for up to a second), so that a
        record being written is read once it is done.  A file that ends
        inside a record (a commit still being written, or one a crash
        tore before it was durable, which the next writer cuts back) is
        not damage: "incomplete_tail" then gives its offset and the bytes
        written of it.
        """

    def close():
        """Close the file.  Later reads of unloaded objects and commits fail."""


class ILog(Interface):
    """The file format layer: framed, checksummed transaction records.

    Appending, recovering and truncating require the write lock; reading
    does not.  See docs/format.txt for the byte layout.
    """

    path = Attribute("The file's path.")
    version = Attribute("The file's format version (see docs/format.txt).")
    end = Attribute("Offset just past the last record read or written.")
    last_tid = Attribute("Id of the last record read or written.")
    oid_high = Attribute("The next oid never handed out, per the records read.")
    broken = Attribute("The I/O error that made the log refuse writes, or None.")
    skipped = Attribute("""``(offset, reason)`` of each damaged index checkpoint read
        past: being redundant, one is stepped over, never trusted.""")

    def append(status, oid_high, entries, time_ns=None):
        """Write one record durably at the end and return it.

        Returns only once the record is written and, with ``fsync``
        durability, synced.  On an I/O error the record is cut off again,
        the log refuses further writes, and `dobbin.exc.StorageError` is
        raised.
        """

    def follow():
        """Yield the valid records after `end`, advancing; stop quietly
        before an incomplete or damaged one (it may still be being written)."""

    def records_before(end, max_bytes):
        """Yield the valid records ending at or before offset `end`, newest
        first (walking back by their trailers), reading at most `max_bytes`;
        stop at the first one that fails a check."""

    def recover(repair=False):
        """Yield the valid records after `end`, with the write lock held.

        A torn tail is cut back and its bytes saved beside the file.
        Damage followed by a valid record raises
        `dobbin.exc.CorruptionError`, or with `repair` is cut away too.
        """

    def trim():
        """Give the space reserved after the records back to the file
        system, with the write lock held; never past a record this log has
        not read."""

    def at_end():
        """Whether `end` is the end of the records: the end of the file, or
        only zero bytes of reserved space after it (see docs/format.txt)."""

    def read_object(offset, oid=None):
        """Return ``(tid, previous, data)`` of the checked object entry at
        `offset`; `CorruptionError` if it is not `oid`'s or fails its crc."""

    def read_objects(wanted):
        """Return ``{offset: (tid, previous, data)}`` for the ``(offset, oid)``
        pairs `wanted`, checked like `read_object`, with one read for
        entries that lie close together."""

    def open_stream(offset):
        """Return ``(size, chunk_crcs)`` of the checked stream entry at `offset`."""

    def read_stream_chunk(offset, chunk_crcs, size, index):
        """Return one checked chunk of a stream."""

    def stream_chunks(offset, chunk_crcs, size):
        """Yield every checked chunk of a stream, in order."""

    def close():
        """Close the file descriptor."""


class INotifier(Interface):
    """The subscribers of one database, told of each committed transaction
    in tid order, once its record is durable."""

    lock = Attribute(
        """A reentrant lock held while subscribers are told: whoever holds
        it sees no subscriber called meanwhile.""")

    def subscribe(callback):
        """Call `callback(tid, oids)` for each committed transaction from
        now on; TypeError if it cannot be called."""

    def unsubscribe(callback):
        """Stop calling `callback`; ValueError if it was not subscribed."""

    def note(durable_at, tid, oids, ours=True):
        """Queue the news of transaction `tid`, which changed `oids`, to be
        told once the file is durable up to `durable_at`, or once the log
        is broken (no fsync will tell; the database shows the change
        all the same).  Notes come in tid order.  A note not `ours` (a
        record another writer wrote, which this database caught up with)
        is made durable by `flush` itself, if a subscriber is to hear of
        it: its writer's fsync may not have returned yet."""

    def clear():
        """Drop the notes not yet told."""

    def flush(wait=False):
        """Tell the subscribers every note whose record is durable, in
        order; a subscriber that raises is logged.  Called by a
        subscriber, it returns at once.  With `wait`, it returns only once
        callbacks another thread is running have finished."""


class IWriteLock(Interface):
    """One writer at a time per file, across threads and processes.

    Released by the kernel when its holder dies, even by SIGKILL.  Every
    method but `held` raises `dobbin.exc.DobbinError` in a forked child
    of the process that made the lock: the child shares its parent's
    file lock, and would take or drop it.
    """

    held = Attribute("True when the calling thread holds the lock.")

    def acquire(timeout=None):
        """Take the lock, or raise `dobbin.exc.LockTimeoutError` after `timeout`.

        Waiting is never an error by itself: only the timeout is.
        """

    def release():
        """Give the lock up.  Only the holding thread may."""

    def busy():
        """True when any thread or process holds the lock or is taking it.

        A hint only (it may change at once); it never waits.
        """

    def closing(timeout=None):
        """A context manager for closing the file: it waits (up to
        `timeout`, then `LockTimeoutError`) for this process's writing
        thread, keeps the others out, and yields True if no other process
        held the lock either.  The caller closes the file inside it;
        afterwards `acquire` and `closing` raise ReadOnlyError and `busy`
        is False (the descriptor's number may name another file by then:
        no flock call is made on it again)."""


class ISession(IDataManager, ISavepointDataManager):
    """The data manager of one thread's transaction.

    It joins the transaction at the thread's first checkout (or elect).
    In ``tpc_begin`` it locks each database involved, in a fixed order,
    and each catches up; in ``commit`` each checks for conflicts (trying
    ``_p_resolve_conflict``, whose exceptions leave the conflict
    unresolved) and lays out its record; in ``tpc_vote``
    every checked-out object must have been found connected to a graph,
    and each database claims its record's disk space (a full disk fails
    the vote, not the finish);
    ``tpc_finish`` writes, syncs and publishes.  A failure once every
    database is locked and before the finish (ours, or another data
    manager's in the same transaction, which ``tpc_abort`` hears of)
    writes a failed record naming the error to each database, which is
    counted in ``tx_count`` and never applied; the checked-out objects
    then show the latest committed state until the transaction is
    aborted (by the application, or at once by the transaction package
    itself when the transaction has after-commit hooks, which it calls
    and then aborts every data manager).  Two Database objects open on
    one file cannot take part in one transaction (`DobbinError`).
    """

    checkouts = Attribute("id(obj) -> checkout record, for this thread.")

    def add(obj, old, serial):
        """Record that `obj` was checked out with shared state `old` at `serial`."""

    def elect(database, obj, seen):
        """Make `obj` the root of `database` at commit, if its root is
        then still `seen` (an oid, or None); else the commit conflicts."""

    def working_state(obj):
        """Return the state to store for `obj`."""
