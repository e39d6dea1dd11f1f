"""The contracts of the broker's parts.

Read this module first: it says who calls what, when, and what must never
fail.  The broker serves a Dobbin database to remote clients over ZeroMQ:

    client code -> IProxy -> IBrokerClient --request--> IBrokerServer -> Database
                                 ^                            |
                                 +------ broadcasts ----------+

Requests and replies are maps encoded by an ICodec (msgpack); objects are
named by keys that an IKeyRing signs and checks; what a client may read,
write and call is decided by the IExportRegistry.  The message schema is in
broker.protocol and docs/protocol.txt.
"""

from zope.interface import Attribute, Interface


class ICodec(Interface):
    """Turns message values into bytes and back.

    One codec belongs to one side of one connection (its hooks know that
    side's objects).  Encoding is called by whoever sends, decoding by the
    thread that received; a codec holds no state between calls and may be
    used by several threads at once.
    """

    default = Attribute(
        """Called with any value the codec cannot send as is, or None.

        Must return a Key naming that value, or raise EncodeError.  The
        server uses it for persistent objects, the client for proxies.
        """)

    on_key = Attribute(
        """Called with every Key decoded from a message, or None.

        Its result replaces the key in the decoded value.  The server checks
        the MAC here (raising AccessDenied for a forged key); the client
        returns the proxy for the key.  It must not do I/O.
        """)

    def encode(value):
        """Return the bytes of `value`.

        Shared and cyclic containers are carried by reference.  Raises
        EncodeError for a value of an unsupported type, a cycle through a
        tuple or frozenset, or a message over the size or depth limits; no
        other error escapes.
        """

    def decode(data):
        """Return the value encoded in `data` (bytes from the network).

        Raises DecodeError for anything that is not a valid message within
        the limits, and AccessDenied when `on_key` refuses a key; no other
        error escapes, whatever the bytes.  Never runs code chosen by the
        sender.
        """


class IKeyRing(Interface):
    """Signs object keys and checks them, under one server secret.

    Called by the server only: `sign` when it sends a reference to an
    object, `verify` for every key it receives.  Both are pure functions of
    the secret, so every server sharing the secret file agrees on every key,
    across restarts.
    """

    def sign(kind, ident):
        """Return the Key of (kind, ident) with its MAC."""

    def verify(key, kinds="osf"):
        """Return `key.ident` if `key` is a Key of one of `kinds` with a valid MAC.

        Raises AccessDenied otherwise.  Compares MACs in constant time.
        """


class IClassExport(Interface):
    """The export rules of one class, decided once by the server's setup code.

    Consulted by the server for every object it reads or changes for a
    client.  Never changes after the server has started.
    """

    name = Attribute("The class's wire name, 'module.QualName'.")
    cls = Attribute("The class itself.")
    fields = Attribute("frozenset of readable attribute names, or None for every public one.")
    refs = Attribute("frozenset of readable attributes that hold references.")
    callables = Attribute("frozenset of method names clients may call.")
    hidden = Attribute("frozenset of names never sent, read, written or called.")
    readonly = Attribute("True (nothing writable) or a frozenset of read-only names.")
    creatable = Attribute("True if clients may create instances in a commit.")
    extent = Attribute(
        """None, or a callable returning the instances to search when a client
        searches this class by name.  Called by the server in a worker thread.
        Without it a class search walks the object graph from the root.""")
    mapping = Attribute("True if instances have the Mapping protocol (items are served).")

    def readable(name):
        """Return True if clients may read attribute `name`."""

    def writable(name):
        """Return True if clients may set or delete attribute `name`: readable,
        not read-only, and not a method or property of the class."""

    def behaviour(name):
        """Return True if `name` is a method or property of the class (a
        value stored under it would replace the class's behaviour)."""

    def callable(name):
        """Return True if clients may call method `name`."""

    def filter_state(state):
        """Return the readable part of a state dict (never a hidden name)."""

    def value_seen(state, name):
        """Return the value of `name` clients see in `state` (as in
        filter_state, class defaults included), or ABSENT, also for a name
        they cannot see.  Commits check clients' old values against it."""

    def meta():
        """Return the description sent to clients (plain values, no hidden names)."""


class IExportRegistry(Interface):
    """Every class's export rules.  Filled by the application before start()."""

    def export_class(cls, **options):
        """Set the rules of `cls` (and its subclasses) and return its IClassExport.

        Options: fields, refs, callables, hidden, readonly, creatable, extent;
        see broker.export.  Raises ExportError for an inconsistent option.
        """

    def lookup(cls):
        """Return the IClassExport for `cls`: its own, inherited, or the default."""

    def by_name(name):
        """Return the IClassExport with wire name `name`, or None if not seen yet."""


class ICommitOutcomes(Interface):
    """The outcomes of recent commits, so that a resent commit runs once.

    Keys are (token, request id) of commit requests; used by the server's
    front thread (start) and by whichever thread ran the commit (finish),
    so every method is thread-safe.
    """

    def recall(transactions):
        """Take the commit marks recorded in `transactions` (what
        `dobbin.interfaces.IDatabase.recent_transactions` returns): the
        commits an earlier server on the file ran, perhaps unanswered."""

    def start(key, routing):
        """Return RUN if the caller is to run the commit, WAIT if a copy is
        running (`routing` is then answered when it finishes), the encoded
        reply of the finished commit, to send to `routing` as it is, or the
        `broker.outcomes.Recorded` commit that an earlier server ran, which
        the caller answers (and `finish`es) as if it had run it."""

    def finish(key, reply, recorded=None):
        """Remember the encoded `reply` of a request that committed, whose
        `broker.outcomes.Recorded` form is `recorded` (None: it did not
        commit, and a copy may run again); return the routing ids of the
        copies that waited for it.  An outcome is kept while a client may
        still resend its request, however many others finish meanwhile;
        past a hard bound in bytes only its record is kept, and `start`
        hands that out as it does a recalled commit."""

    def abandon(key, recorded=None):
        """Forget a started request that will not run here (the server is
        stopping, or too busy); `recorded`, the `Recorded` commit `start`
        returned for it, is kept for the next copy."""


class IReplyBacklog(Interface):
    """The replies a server handed to ZeroMQ and ZeroMQ has not yet
    sent, in bytes per connection and in all; used by one thread only."""

    max_bytes = Attribute("Bytes that may be pending, all connections together.")
    max_peer_bytes = Attribute("Bytes that may be pending for one connection.")
    reserve_bytes = Attribute("Bytes past `max_bytes` that small replies to "
                              "connections with nothing pending may take.")
    pending_bytes = Attribute("Bytes pending now (as of the last `admits`).")
    dropped = Attribute("How many replies were dropped past the bounds, ever.")

    def send(router, frames):
        """Send reply `frames` ([routing id, b"", MAGIC, body]) on the
        ROUTER socket `router`: counted until ZeroMQ is done with it, or
        dropped past the bounds (its client asks again after its timeout)."""

    def admits(routing, size):
        """Return True if a reply of `size` bytes to connection
        `routing` may be sent now: it keeps that connection and all of
        them within their bounds, or that connection has nothing pending
        and all of them are within their bound, or (a small reply) that
        connection has nothing pending and the reserve has room."""

    def track(routing, size, tracker):
        """Count a reply of `size` bytes sent to `routing` until `tracker`
        (a pyzmq MessageTracker) is done."""


class ISnapshot(Interface):
    """The states of a database's objects as of one transaction, as a
    client's snapshot reads them: live while unchanged since, else from
    the log's older versions."""

    db = Attribute("The Dobbin database read.")
    tid = Attribute("The transaction as of which states are read.")

    def run(read):
        """Return `read()`, every state it took through `state` being the
        one as of `tid`; `read` may be called more than once."""

    def state(obj):
        """The state of persistent `obj` as of `tid` (not to be changed);
        the snapshot's conflict error if it has no version then."""

    def oids():
        """The oids of the objects the last `run` read."""

    def mapping(obj, state=None):
        """The items of persistent mapping `obj` as of `tid`."""

    def contents(obj, rules):
        """What a walk of the object graph goes on into from `obj`, whose
        class is exported with `rules`, as of `tid`."""


class IInvalidationHistory(Interface):
    """The oids each of a server's latest committed transactions changed.

    Fed by the database's commit callback in whichever thread committed or
    caught up, read by request handlers: every method is thread-safe.  It
    knows every committed tid in (floor, top].
    """

    floor = Attribute("The newest tid it no longer knows the changes of.")
    top = Attribute("The newest tid it knows.")
    size = Attribute("How many transactions it keeps at most.")
    max_oids = Attribute("How many oids, all transactions together, it keeps at most.")

    def add(tid, oids):
        """Record that transaction `tid` changed the oids in `oids`.

        Tids come in increasing order; one not above `top` is a duplicate
        notification and is ignored.  The oldest transactions go when more
        than `size` are held or more than `max_oids` oids, which moves
        `floor` up."""

    def changes(since, upto):
        """The sorted oids changed by the transactions in (since, upto], or
        None when some of them are no longer known (`since` is None or
        below `floor`): the asking client must then flush its cache."""


class IBrokerServer(Interface):
    """Serves one Dobbin database to remote clients.

    The application builds it, configures exports and statics, then calls
    start().  Requests are served by background threads: a front thread owns
    the ROUTER socket and answers cheap reads itself; worker threads run
    commits, calls and searches, each in its own Dobbin transaction (several
    commits at once, so the database syncs them to disk together); a poller
    thread calls db.sync() every `poll_interval` seconds to notice other
    writers.  Every committed transaction the database reports is broadcast
    at once, from the thread that committed or caught up, with the sealed
    states of the objects of small transactions.  Application methods named
    do_NAME on a subclass are callable by clients as client.call("NAME",
    ...); they run in a worker thread inside a transaction that commits when
    they return.
    """

    db = Attribute("The Database served.")
    address = Attribute(
        """The bound request endpoint, e.g. "tcp://127.0.0.1:53121".

        Valid after start(); a "*" port in the constructor's address is
        replaced by the actual port.""")
    broadcast_address = Attribute("The bound PUB endpoint; clients learn it from hello.")
    instance = Attribute("A random number naming this server process' run; changes on restart.")
    exports = Attribute("The IExportRegistry.")
    keyring = Attribute("The IKeyRing.")
    requests = Attribute(
        """A collections.Counter of the valid requests received, by op.

        Counted by the front thread as each request arrives; for monitoring
        and tests.""")

    def start():
        """Bind the sockets, start the threads, and return self.

        Raises broker.exc.AddressError if an address cannot be bound, with
        nothing left running.
        """

    def stop():
        """Stop serving: stop and join every thread, close every socket.

        Idempotent.  Requests in flight are answered or dropped; clients
        retry them against the next server on the address.  Called by a
        method the server runs (a do_NAME), it returns at once, and another
        thread stops the server once that method has returned.
        """

    def export_class(cls, **options):
        """Shorthand for exports.export_class; before start() (or after
        stop()), else broker.exc.ExportError."""

    def add_static(obj, *path):
        """Serve `obj` under the application-chosen key path: 1 to 16 parts,
        each a str of at most 256 characters or a 64-bit int (else
        broker.exc.ExportError).

        Clients get it with client.static(*path); the key is stable across
        restarts as long as the application registers the same path.  An
        object may have several paths; replacing the object at a path is
        broadcast like a change of it.
        """

    def del_static(*path):
        """Stop serving the static object at `path` (KeyError if none), and
        broadcast it."""

    def key_for(obj):
        """Return the signed Key of a persistent (stored) or static object."""

    def obj_new(cls, **fields):
        """Create an instance of `cls`, check it out in the calling thread and set fields.

        __init__ is not run (the fields are the whole state), as for objects
        clients create; a PersistentDict's or OOBTree's base __init__ is.
        It is stored by the next commit that makes it reachable (obj_update).
        """

    def obj_update(obj, **fields):
        """Set fields of `obj` and commit the calling thread's transaction.

        For a persistent object this is one Dobbin transaction (which clients
        learn of through the usual invalidation broadcast), refused like a
        client's commit (ProtocolError) if it would store what clients could
        not be sent; for a static object, the attributes are set and a
        static invalidation is broadcast.  Returns the new tid (None for
        statics, and inside a request).  All or nothing: a change refused
        (before committing) leaves the transaction as it was before the
        call; a commit that fails (a conflict, say) aborts the transaction,
        as ``transaction.commit()`` does.  Private names (a
        leading "_") are an ExportError.  Called while the server runs a
        method for a client (do_NAME or an exported method), the change
        joins that request's transaction, which commits when it returns.
        """

    def obj_delete(container, name):
        """Delete item `name` of a mapping or attribute `name` of an object,
        and commit, as obj_update does."""


class IStatics(Interface):
    """The non-persistent objects a server exports, by key path.

    Thread-safe.  An object may be registered at several paths; it is
    known by its first while it has any (then it may go, and its id() be
    another object's).
    """

    def add(obj, path):
        """Serve `obj` at tuple `path`; return the object replaced there, or None."""

    def remove(path):
        """Stop serving the object at `path` and return it; KeyError if none."""

    def get(path):
        """The object at `path`; KeyError if none."""

    def path_of(obj):
        """The first path `obj` is served at, or None."""


class IBinding(Interface):
    """An endpoint a server's socket was bound to (see broker.endpoints).

    For ipc://PATH it holds PATH and an exclusive lock on PATH.lock from
    before the bind, so that no other server binds the path meanwhile.
    """

    endpoint = Attribute("The endpoint bound, with the port chosen for a '*'.")

    def release():
        """Once the socket is closed: remove PATH and PATH.lock and give the
        lock up (nothing to do for other transports); later calls do nothing."""


class IBrokerClient(Interface):
    """A connection to a broker server, with one client transaction at a time.

    Thread-safe: every method may be called from any thread; requests are
    serialized.  The client transaction is shared by the client's threads.
    """

    address = Attribute("The server's request endpoint.")
    root = Attribute("The proxy of db.root as of the current transaction (None if no root).")
    tid = Attribute("The tid of the snapshot the current transaction reads.")

    def begin():
        """Start a new transaction that sees everything committed before this call.

        Drops local changes, asks the server to sync, and applies every
        invalidation up to the new snapshot (or flushes the cache when it
        cannot prove it has them all).  A cached object changed by a
        broadcast transaction takes the new state the broadcast carried,
        if the client holds every broadcast up to the new snapshot; other
        changed objects are loaded again when next read.
        """

    def commit():
        """Send the local changes as one verified update; return the new tid.

        The server applies all of them in one Dobbin transaction or none.
        Raises ConflictError (naming key and field) if a value this client
        read has changed meanwhile; the local changes are then rolled back.
        Either way the next transaction starts at once, with the written
        objects' new states (from the reply) in the cache.
        """

    def abort():
        """Drop local changes and apply the invalidations received so far."""

    def call(name, *args, **kwargs):
        """Call the server's do_NAME(*args, **kwargs) and return its result."""

    def static(*path):
        """Return the proxy of the static object the server registered at `path`."""

    def new(class_name, **fields):
        """Return a proxy of a new object of an exported, creatable class.

        It is created on the server by the commit that includes it, if it is
        then reachable from a stored object.
        """

    def get(target, where=None, /, **fields):
        """Return the one object in `target` whose fields equal the query.

        `target` is a mapping proxy, or an exported class name.  The query
        is `where` (a dict: for fields named like a parameter, "target" or
        "limit") and `fields`.  Raises NoResultError or
        MultipleResultsError unless exactly one object matches.
        """

    def find(target, where=None, /, *, limit=None, **fields):
        """Return a list of the objects in `target` matching the query (see
        `get`), at most `limit` of them."""

    def count(target, where=None, /, **fields):
        """Return how many objects in `target` match the query (see `get`)."""

    def close():
        """Close the sockets; the client cannot be used afterwards.  Idempotent.

        A request that another thread is waiting for ends within 0.1 s
        with `broker.exc.ClientClosed`; what it did on the server is then
        unknown (a commit may have been applied)."""


class IProxy(Interface):
    """The client-side stand-in of one server object.

    Made by the client, one per key while cached.  Attribute reads come from
    the object's state at the transaction's snapshot (loaded on first use);
    writes are recorded in the client transaction; exported methods are
    called remotely.  Mapping objects also support the mapping protocol.
    """

    _key = Attribute("The object's Key.")
    _client = Attribute("The owning IBrokerClient.")


class IRemoteStream(Interface):
    """A file-like view of a PersistentStream attribute, read in chunks."""

    size = Attribute("Total size in bytes.")

    def read(size=-1):
        """Return up to `size` bytes (all remaining if negative) from the position."""

    def seek(offset, whence=0):
        """Move the position, like io.RawIOBase.seek; return the new position."""

    def tell():
        """Return the position."""

    def close():
        """Close the view; further reads and iteration raise ValueError."""

    def __iter__():
        """Yield the stream's bytes in chunks from the start, whatever the
        position; ValueError if the view is closed, also mid-way."""
